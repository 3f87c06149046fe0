"""What the framework adapters share: their engines, and the way they drive them.

Framework objects (a LangChain chat model, a LlamaIndex LLM) are created often and cheaply, and
several may name the same model; loading an engine for each would load the weights again. They ask
:func:`shared_engine` instead, which loads once (blocking, so callers run it off the event loop) and
hands the same engine to every asker, until :func:`close_shared_engines` closes them all.
:class:`EngineRef` is an adapter object's engine and the serving layer over it;
:func:`iterate_sync` gives their sync streaming forms; :func:`api_error_cause` their typed errors.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Generator
from typing import Any, TypeVar

from async_llm.errors import AsyncLLMError
from async_llm.llm.huggingface import HuggingFaceLLM
from async_llm.serve.errors import APIError
from async_llm.serve.serving import OpenAIServing

__all__ = [
    "EngineRef", "aclose_shared_engines", "api_error_cause", "close_shared_engines", "iterate_sync", "shared_engine",
]  # fmt: skip

T = TypeVar("T")

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


class EngineRef:
    """An adapter object's engine: the one it was given (``llm=``, the caller's), or the shared one
    of its model and options; and the serving layer over it, made again if the engine changed or
    was closed (a shared engine closed and loaded anew)."""

    def __init__(self, given: HuggingFaceLLM | None, model: str | None, engine_kwargs: dict[str, Any]) -> None:
        self.given, self._model, self._kwargs = given, model, engine_kwargs
        self._serving: OpenAIServing | None = None

    def engine(self) -> HuggingFaceLLM:
        """The engine (blocks while a shared one loads)."""
        return self.given if self.given is not None else shared_engine(self._model, self._kwargs)

    async def aengine(self) -> HuggingFaceLLM:
        """The engine, a shared one loaded in a worker thread."""
        return self.given if self.given is not None else await asyncio.to_thread(self.engine)

    def _over(self, llm: HuggingFaceLLM) -> OpenAIServing:
        if self._serving is None or self._serving.llm is not llm or llm.closed:
            self._serving = OpenAIServing(llm)
        return self._serving

    def serving(self) -> OpenAIServing:
        return self._over(self.engine())

    async def aserving(self) -> OpenAIServing:
        return self._over(await self.aengine())


def api_error_cause(exc: APIError) -> BaseException:
    """The library's own error behind an API error (a typed error naming the parameter), if any:
    in process, callers get the exception the engine raised rather than its HTTP form."""
    cause = exc.__cause__
    return cause if isinstance(cause, AsyncLLMError) else exc


async def _anext(iterator: AsyncIterator[T]) -> T:
    return await iterator.__anext__()


def iterate_sync(llm: HuggingFaceLLM, iterator: AsyncIterator[T]) -> Generator[T, None, None]:
    """``iterator``'s items, each awaited on ``llm``'s sync loop (works inside a running loop too);
    leaving early closes it there (which aborts the request it streams)."""
    try:
        while True:
            try:
                item = llm._call_sync(_anext, iterator)
            except StopAsyncIteration:
                return
            yield item
    finally:
        close = getattr(iterator, "aclose", None)
        if close is not None:
            llm._call_sync(close)
