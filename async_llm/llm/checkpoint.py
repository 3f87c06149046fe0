"""Checkpoints of an LLM's settings, history and metrics: JSON, written atomically.

Layout of a checkpoint folder::

    checkpoint.json     {"format": "async_llm.checkpoint", "version": 1, "model_name", "settings",
                         "history", "metrics", "weights"}
    model/              optional: save_pretrained weights and tokenizer

The JSON is written to a temporary file in the same folder and renamed over the old one, so a
crash never leaves a half-written checkpoint. Reading validates everything before anything is
applied: a corrupt checkpoint raises :class:`CheckpointError` and changes nothing.

Each of :func:`write` and :func:`read` is a handful of small blocking file operations (a temporary
file, a write, an fsync, a rename; or stat, read, stat): they run together in one worker thread,
one hop off the event loop, rather than one hop per operation as aiofiles or ``anyio.Path`` would.
:class:`CheckpointMixin` gives an LLM its ``save_checkpoint``/``load_checkpoint`` methods.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import anyio

from async_llm.errors import AsyncLLMError
from async_llm.llm.chat import ROLES
from async_llm.llm.parts import LLMParts
from async_llm.sampling_params import SamplingParams

FORMAT = "async_llm.checkpoint"
VERSION = 1
FILENAME = "checkpoint.json"
WEIGHTS_DIR = "model"


class CheckpointError(AsyncLLMError, ValueError):
    """A checkpoint is missing pieces, malformed, or from an unknown format version."""


async def write(folder: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write ``payload`` as ``folder/checkpoint.json`` atomically; returns the file's path."""
    text = json.dumps({"format": FORMAT, "version": VERSION, **payload}, indent=2)
    return await anyio.to_thread.run_sync(_write, Path(folder), text)


def _write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / FILENAME
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


async def read(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a checkpoint (a folder or its ``checkpoint.json``).

    Returns:
        The payload with ``settings`` turned into a validated :class:`SamplingParams` under
        ``"params"``, and ``"weights"`` as an absolute path or None.

    Raises:
        FileNotFoundError: No checkpoint there.
        CheckpointError: Not valid JSON, wrong format/version, or invalid fields.
    """
    return await anyio.to_thread.run_sync(_read, Path(path))


def _read(path: Path) -> dict[str, Any]:
    file = path / FILENAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r} (expected {FILENAME})")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {str(file)!r} is not valid JSON: {exc}") from None
    return _validate(data, file)


def _validate(data: Any, file: Path) -> dict[str, Any]:
    def fail(why: str) -> CheckpointError:
        return CheckpointError(f"invalid checkpoint {str(file)!r}: {why}")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise fail(f"not an {FORMAT} file")
    if data.get("version") != VERSION:
        raise fail(f"unsupported version {data.get('version')!r} (this library reads version {VERSION})")
    settings = data.get("settings")
    if not isinstance(settings, dict) or not isinstance(settings.get("sampling"), dict):
        raise fail("'settings.sampling' is missing")
    try:
        params = SamplingParams(**settings["sampling"])
    except (TypeError, ValueError) as exc:
        raise fail(f"bad sampling settings: {exc}") from None
    for key in ("system_prompt", "role"):
        if settings.get(key) is not None and not isinstance(settings[key], str):
            raise fail(f"'settings.{key}' must be a string")
    history = data.get("history", [])
    if not isinstance(history, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in history
    ):
        raise fail("'history' must be a list of {role, content} messages")
    metrics = data.get("metrics", {})
    if not isinstance(metrics, dict):
        raise fail("'metrics' must be an object")
    weights = data.get("weights")
    if weights is not None:
        weights = (file.parent / weights).resolve()
        if not (weights / "config.json").is_file():
            raise fail(f"weights folder {str(weights)!r} has no config.json")
    return {**data, "params": params, "history": history, "metrics": metrics, "weights": weights}


class CheckpointMixin(LLMParts):
    """Settings, history and metric totals saved as JSON and restored (and optionally the weights)."""

    async def asave_checkpoint(
        self, checkpoint_dir: str | os.PathLike[str] = "checkpoints", save_weights: bool = False
    ) -> Path:
        """Save settings, history and metric totals as JSON (atomically), and optionally the weights.

        Returns:
            The path of ``checkpoint.json``.
        """
        folder = Path(checkpoint_dir)
        weights = None
        if save_weights:
            await anyio.to_thread.run_sync(self._save_weights, folder / WEIGHTS_DIR)
            weights = WEIGHTS_DIR
        payload = {
            "model_name": getattr(self, "model_name", None),
            "settings": {
                "sampling": self.sampling_defaults.to_dict(),
                "system_prompt": self.system_prompt,
                "role": self.role,
                "chat_template": self.chat_template,
            },
            "history": list(self.history),
            "metrics": self.metrics_recorder.summary(),
            "weights": weights,
        }
        return await write(folder, payload)

    async def aload_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore a checkpoint written by :meth:`asave_checkpoint` (and its weights, if saved).

        Raises:
            FileNotFoundError: Nothing there. :class:`CheckpointError`: corrupt or invalid; in both
            cases nothing is changed.
        """
        data = await read(path)
        settings = data["settings"]
        role = settings.get("role") or "user"
        if role not in ROLES:
            raise CheckpointError(f"invalid checkpoint {str(path)!r}: unknown role {role!r}")
        if data["weights"] is not None:
            await anyio.to_thread.run_sync(self.set_model_name, str(data["weights"]))
        self.sampling_defaults = data["params"]
        self.system_prompt = settings.get("system_prompt")
        self.role = role
        self.chat_template = bool(settings.get("chat_template", True))
        self.history = [dict(m) for m in data["history"]]
        self.metrics_recorder.restore(data["metrics"])

    def save_checkpoint(
        self, checkpoint_dir: str | os.PathLike[str] = "checkpoints", save_weights: bool = False
    ) -> Path:
        """Blocking :meth:`asave_checkpoint`."""
        return self._call_sync(self.asave_checkpoint, checkpoint_dir, save_weights)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Blocking :meth:`aload_checkpoint`."""
        self._call_sync(self.aload_checkpoint, path)
