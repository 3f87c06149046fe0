"""Engines shared by the adapters' models: one per ``(model, engine options)`` in a process.

Framework objects (a LangChain chat model, a LlamaIndex LLM) are created often and cheaply, and
several may name the same model; loading an engine for each would load the weights again. They ask
:func:`shared_engine` instead, which loads once (blocking, so callers run it off the event loop) and
hands the same engine to every asker, until :func:`close_shared_engines` closes them all.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from async_llm.llm.huggingface import HuggingFaceLLM

__all__ = ["aclose_shared_engines", "close_shared_engines", "shared_engine"]

_engines: dict[str, HuggingFaceLLM] = {}
_lock = threading.Lock()


def shared_engine(model: str | None, engine_kwargs: dict[str, Any]) -> HuggingFaceLLM:
    """The engine of ``(model, engine_kwargs)``, loaded on first use (blocks while loading)."""
    key = json.dumps([model, engine_kwargs], sort_keys=True, default=str)
    with _lock:  # one load per key, even when two models ask at once
        llm = _engines.get(key)
        if llm is None or llm.closed:
            llm = _engines[key] = HuggingFaceLLM(model, **engine_kwargs)
        return llm


def _take_all() -> list[HuggingFaceLLM]:
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
    return engines


def close_shared_engines() -> None:
    """Close every shared engine (the next use loads again)."""
    for llm in _take_all():
        llm.close()


async def aclose_shared_engines() -> None:
    """Async :func:`close_shared_engines`."""
    for llm in _take_all():
        await llm.aclose()
