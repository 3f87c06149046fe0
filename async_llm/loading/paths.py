"""What a ``model_id`` names, checked before anything loads.

A ``model_id`` is the default model (``None``), a ``.gguf`` file, a local transformers folder or a
Hugging Face hub id. Handed to transformers unchecked, a mistyped path comes back as a message about
hub repo ids, and a folder without a tokenizer as a truncated tokenizer message; here each mistake
says what was looked for and where, before a progress line or a slow import starts.
"""

from __future__ import annotations

import os
from pathlib import Path

from async_llm.errors import InvalidParameterError, ModelNotAvailableError

__all__ = ["GGUF_MAGIC", "TOKENIZER_FILES", "ModelNotFoundError", "check_model_id", "is_hub_id"]

#: Files that hold a tokenizer (any one is enough), as transformers' tokenizer classes name them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tekken.json",
)
#: The first bytes of every GGUF file.
GGUF_MAGIC = b"GGUF"
_EXPECTED = "a local folder, a .gguf file, or a Hugging Face hub id like 'org/name' was expected"


class ModelNotFoundError(ModelNotAvailableError, InvalidParameterError):
    """``model_id`` names no loadable model: a path that does not exist, a file or folder that is not
    a model, or a model folder without a tokenizer.

    Catch it as :class:`~async_llm.errors.ModelNotAvailableError` or as a ``ValueError``;
    :attr:`param` is ``"model_id"``.
    """

    def __init__(self, message: str) -> None:
        super().__init__("model_id", message)


def is_hub_id(text: str) -> bool:
    """Whether ``text`` has the shape of a hub repo id (``name`` or ``org/name``), by the hub's rules."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def check_model_id(model_id: str | os.PathLike[str]) -> None:
    """Check that ``model_id`` can name a model, without loading or converting anything.

    Hub ids (strings that are no existing path and look like ``org/name``) pass unchecked: only the
    hub can say whether they exist.

    Args:
        model_id: A local folder, a ``.gguf`` file or a hub id.

    Raises:
        ModelNotFoundError: the path does not exist and is no hub id; it is a file that is not a
            ``.gguf`` (or a ``.gguf`` without GGUF's magic bytes); a folder without
            ``config.json``; or a model folder without a tokenizer. The message names the path and
            what was looked for.
    """
    path = Path(model_id).expanduser()
    if path.suffix.lower() == ".gguf":
        _check_gguf(path)
    elif path.is_dir():
        _check_folder(path)
    elif path.exists():
        raise ModelNotFoundError(f"{str(path)!r} is not a model: expected a folder with config.json, or a .gguf file")
    elif not is_hub_id(str(model_id)):
        raise ModelNotFoundError(f"no model at {str(model_id)!r}: the path does not exist ({_EXPECTED})")


def _check_gguf(path: Path) -> None:
    if not path.exists():
        raise ModelNotFoundError(f"no model at {str(path)!r}: the file does not exist")
    if not path.is_file():
        raise ModelNotFoundError(f"{str(path)!r} is not a model: a .gguf name, but not a file")
    with path.open("rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ModelNotFoundError(f"{str(path)!r} is not a GGUF file: it does not start with the GGUF magic bytes")


def _check_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds {ggufs[0]!r}: pass that file" if len(ggufs) == 1 else ""
        raise ModelNotFoundError(
            f"{str(path)!r} is not a model: expected a folder with config.json, or a .gguf file (it has no "
            f"config.json{hint})"
        )
    if not any(_is_tokenizer_file(p.name) for p in path.iterdir()):
        raise ModelNotFoundError(
            f"{str(path)!r} has a model but no tokenizer (looked for {', '.join(TOKENIZER_FILES)} there); "
            "save one beside it with tokenizer.save_pretrained(folder)"
        )


def _is_tokenizer_file(name: str) -> bool:
    # Generous on purpose: a folder wrongly refused here could not be loaded at all, while one wrongly
    # accepted only fails later, with transformers' own message.
    return name in TOKENIZER_FILES or name.startswith("tokenizer") or name.endswith((".tiktoken", ".model"))
