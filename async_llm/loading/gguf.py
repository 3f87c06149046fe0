"""Convert a GGUF file, once, into a plain transformers model folder.

Loading a ``.gguf`` with transformers dequantizes every tensor, which takes tens of seconds for
even a small model. Doing that on every start would make a CLI or a test run feel broken, so the
dequantized model is saved once as a regular safetensors folder under :func:`cache_root` and later
loads read that folder like any other. The conversion draws no progress bars (see
:mod:`async_llm.loading.quiet`); a failed one raises and logs nothing above info (the caller reports it).

Cache layout::

    <cache_root>/gguf/<stem>-<key>/          finished folder; only ever created by os.replace
    <cache_root>/gguf/<stem>-<key>.lock      filelock guarding the conversion
    <cache_root>/gguf/.<stem>-<key>.tmp-*    conversion in progress (or left by a crash)

``key`` hashes the file's resolved path, size and mtime, so editing or replacing the file gives a
new folder instead of silently reusing stale weights.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any

from filelock import FileLock, Timeout

from async_llm.cache import CACHE_ENV_VAR, cache_root
from async_llm.errors import ModelNotAvailableError
from async_llm.loading.quiet import GGUF_READER_MODULE, quiet_progress
from async_llm.log import get_logger

__all__ = ["CACHE_ENV_VAR", "GGUFReadError", "cache_root", "cached_conversion", "convert_gguf"]

# structlog events through the stdlib logger of this module (see async_llm.log): never printed.
logger = get_logger(__name__)

# Bump when the conversion changes in a way that makes old cached folders wrong.
_FORMAT_VERSION = "1"
# Module classes that would mean weights were kept packed in GGUF blocks; save_pretrained would
# write them in a layout no plain model can load.
_PACKED_MODULE_MARKERS = ("Gguf", "GGUF", "Ggml", "GGML")


class GGUFReadError(ModelNotAvailableError, ValueError):
    """transformers cannot read a ``.gguf`` file as a model: it is truncated or corrupt, or holds an
    architecture transformers does not load from GGUF. Nothing is left in the cache."""


def _check_gguf_path(gguf_path: str | os.PathLike[str]) -> pathlib.Path:
    """Validate ``gguf_path`` and return it resolved.

    Raises:
        ValueError: the name does not end in ``.gguf``.
        FileNotFoundError: there is no regular file at that path.
    """
    path = pathlib.Path(gguf_path).expanduser()
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"not a GGUF file (expected a name ending in .gguf): {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {str(path)!r}")
    return path.resolve()


def _target_dir(path: pathlib.Path) -> pathlib.Path:
    """Folder a resolved GGUF file converts into (see the module docstring for the key)."""
    stat = path.stat()
    fingerprint = f"{_FORMAT_VERSION}\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}"
    key = hashlib.sha256(fingerprint.encode("utf-8")).hexdigest()[:12]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def cached_conversion(gguf_path: str | os.PathLike[str]) -> pathlib.Path | None:
    """Return the converted folder for ``gguf_path`` if it exists, without converting.

    Useful to warn a user before a slow first conversion.

    Args:
        gguf_path: path to a ``.gguf`` file.

    Returns:
        The finished folder, or ``None`` when :func:`convert_gguf` would have to convert.

    Raises:
        ValueError: the name does not end in ``.gguf``.
        FileNotFoundError: the file does not exist.
    """
    target = _target_dir(_check_gguf_path(gguf_path))
    return target if target.is_dir() else None


def convert_gguf(gguf_path: str | os.PathLike[str]) -> pathlib.Path:
    """Convert a GGUF file into a transformers model folder, once, and return that folder.

    The first call dequantizes the weights (float32) and saves model, config, generation config
    and tokenizer (with its chat template) with ``save_pretrained``. Later calls, from this or any
    other process, return the cached folder at once. Two processes converting the same file at the
    same time do not collide: the second waits on a file lock and then reuses the first's result.
    The folder appears atomically, so a crash mid-conversion never leaves a folder that looks
    finished.

    Args:
        gguf_path: path to a ``.gguf`` file.

    Returns:
        Path of the converted folder, loadable with ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.

    Raises:
        ValueError: the name does not end in ``.gguf``.
        GGUFReadError: transformers cannot read the file (truncated, corrupt, or an unsupported
            architecture); also a ``ValueError``.
        FileNotFoundError: the file does not exist.
    """
    path = _check_gguf_path(gguf_path)
    target = _target_dir(path)
    # Fast path without the lock: the folder only ever appears complete (os.replace).
    if target.is_dir():
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f"{target.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("gguf.waiting_for_other_conversion", gguf=str(path), target=str(target))
        lock.acquire()
    try:
        # Another process may have finished while we waited for the lock.
        if target.is_dir():
            logger.info("gguf.reusing_conversion", target=str(target))
            return target
        _remove_stale_temp_dirs(target)
        _convert_into(path, target)
        return target
    finally:
        lock.release()


def _remove_stale_temp_dirs(target: pathlib.Path) -> None:
    """Delete temp folders a crashed conversion of ``target`` left behind.

    Safe only while holding ``target``'s lock: any live conversion of this target holds it too.
    """
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        logger.info("gguf.removing_stale_temp", path=str(stale))
        shutil.rmtree(stale, ignore_errors=True)


def _convert_into(path: pathlib.Path, target: pathlib.Path) -> None:
    """Convert ``path`` into a temp folder beside ``target``, then rename it to ``target``."""
    start = time.perf_counter()
    logger.info("gguf.conversion_started", gguf=str(path), target=str(target))
    # Same parent as the target so os.replace is a rename on one filesystem (atomic).
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _save_converted(path, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the finished folder should read like any other
        os.replace(tmp, target)
    except BaseException:
        # BaseException too: a Ctrl-C mid-save must not leave the temp folder behind either.
        shutil.rmtree(tmp, ignore_errors=True)
        # info, not warning: the exception tells the caller; a warning would print it a second time.
        logger.info("gguf.conversion_failed", gguf=str(path), seconds=round(time.perf_counter() - start, 2))
        raise
    logger.info("gguf.conversion_finished", target=str(target), seconds=round(time.perf_counter() - start, 2))


def _save_converted(path: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Load ``path`` with transformers, dequantized, and save model and tokenizer into ``out_dir``."""
    # Imported here so that finding a cached folder never pays for importing transformers.
    import importlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    importlib.import_module(GGUF_READER_MODULE)  # before quiet_progress, which silences its bar once imported
    parent, name = str(path.parent), path.name
    with quiet_progress():
        try:
            tokenizer = AutoTokenizer.from_pretrained(parent, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(parent, gguf_file=name, **_dequantize_kwargs())
        except (OSError, MemoryError):
            raise  # about the machine, not the file's contents
        except Exception as exc:  # a bad file fails anywhere in the reader (struct.error, KeyError...)
            raise GGUFReadError(
                f"cannot read {name!r} as a model ({type(exc).__name__}: {exc}); the file may be truncated or "
                "corrupt, or hold an architecture transformers cannot load from GGUF"
            ) from exc
        _drop_quantizer_marker(model)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)


def _dequantize_kwargs() -> dict[str, Any]:
    """Ask transformers for plain dense weights even where it could keep them packed.

    Recent transformers can keep GGUF weights in their blocks (``GgufLinear``) when the
    ``kernels`` package is installed; those modules cannot be saved as a plain checkpoint.
    """
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers 5.x: GGUF loading always dequantizes
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_quantizer_marker(model: Any) -> None:
    """Make ``save_pretrained`` treat the (already dense) model as an ordinary one.

    transformers attaches the GGUF quantizer to the model and its config; ``save_pretrained``
    then refuses ("quantized with gguf and is not serializable"), and a saved
    ``quantization_config`` would make every later load go through the GGUF quantizer again.
    This mirrors ``HfQuantizer.remove_quantization_config`` in transformers 5.x.

    Raises:
        RuntimeError: some weights are still packed in GGUF blocks, so saving would be wrong.
    """
    packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith(_PACKED_MODULE_MARKERS)})
    if packed:
        raise RuntimeError(f"GGUF weights were kept packed ({', '.join(packed)}); cannot save a dense copy")
    model.hf_quantizer = None
    model.is_quantized = False
    if "quantization_method" in vars(model):
        del model.quantization_method
    sub_names = getattr(model.config, "sub_configs", None) or {}
    for config in [model.config, *(getattr(model.config, name, None) for name in sub_names)]:
        if config is None:
            continue
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        if getattr(config, "_is_quantized", False):
            config._is_quantized = False
