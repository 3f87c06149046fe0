"""Verdicts of the engine's start-up checks, kept on disk per set of model files.

Before its first step the engine runs the model on a few probe prompts to decide whether its fast
paths give this model's logits (:mod:`async_llm.engine.runners`). The verdict depends on the
architecture, the weights' dtype, the device and the library versions, not on the run, so a model
loaded from files (a folder, a converted GGUF file, a hub snapshot) keeps it here and later starts
skip those forwards. Models passed in as objects have no files to key on: they are always checked.

Layout::

    <cache_root>/checks/<key>.json      {"format", "version", "check", "verdict"}

``key`` hashes the model files' identity (``config.json``'s bytes; each weights file's name, size
and mtime), the load options, the torch, transformers and async_llm versions, the check's name and
what the engine adds (device, dtype, attention implementation...). Files are written to a temporary
name and renamed, so a reader sees a whole file or none; an unreadable or malformed file is a miss,
and the check runs as if there were no cache.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from async_llm.loading.gguf import cache_root
from async_llm.log import get_logger

__all__ = ["FORMAT", "CheckCache", "folder_identity"]

log = get_logger(__name__)

FORMAT = "async_llm.check"
_VERSION = 1
# Weights files (any name with these endings; sharded checkpoints have several) and their indexes.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
_VERDICT_TYPES = (str, bool, type(None))


def folder_identity(folder: Path) -> str | None:
    """A digest of what makes ``folder``'s model: ``config.json``'s bytes, and the name, size and
    modification time of each weights file (reading gigabytes of weights to hash them would cost
    more than the checks it saves). None when the folder cannot be read."""
    try:
        digest = hashlib.sha256((folder / "config.json").read_bytes())
        for path in sorted(folder.iterdir()):
            if path.name.endswith(_WEIGHT_SUFFIXES):
                stat = path.stat()  # follows the hub cache's symlinks to the blobs
                digest.update(f"\0{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    except OSError:
        return None
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    versions = {}
    for name in ("torch", "transformers", "async-llm"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


class CheckCache:
    """The check store the loader hands the engine with a model loaded from files (see
    ``async_llm.engine.start_checks.CheckStore``).

    Args:
        identity: The model files' identity (:func:`folder_identity`) and the load options that change
            the model (JSON-serialisable).
        root: The folder of the verdict files; default ``<cache_root>/checks`` (``$ASYNC_LLM_CACHE``).
    """

    def __init__(self, identity: Mapping[str, Any], root: Path | None = None) -> None:
        self._identity = {**identity, "versions": _versions()}
        self.root = root if root is not None else cache_root() / "checks"

    def path(self, check: str, context: Mapping[str, str]) -> Path:
        """The file that holds the verdict of ``check`` in ``context``."""
        text = json.dumps({"model": self._identity, "check": check, "context": dict(context)}, sort_keys=True)
        return self.root / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"

    def get(self, check: str, context: Mapping[str, str]) -> dict[str, Any] | None:
        """``{"verdict": value}`` as stored, or None when there is none (or it is unreadable or
        malformed: the check then runs again and overwrites it)."""
        path = self.path(check, context)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # missing, unreadable, not JSON (UnicodeDecodeError is a ValueError)
            return None
        if not (
            isinstance(record, dict)
            and record.get("format") == FORMAT
            and record.get("version") == _VERSION
            and record.get("check") == check
            and isinstance(record.get("verdict", 0), _VERDICT_TYPES)
        ):
            log.debug("check cache entry malformed; checking again", path=str(path))
            return None
        return {"verdict": record["verdict"]}

    def put(self, check: str, context: Mapping[str, str], verdict: str | bool | None) -> None:
        """Store ``verdict``; failures (a read-only cache folder...) only cost the next start a check."""
        path = self.path(check, context)
        record = {"format": FORMAT, "version": _VERSION, "check": check, "verdict": verdict}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(record, f)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.debug("check cache not written", path=str(path), error=repr(exc))
