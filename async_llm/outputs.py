"""What callers get back: :class:`TokenStream` (the per-request async iterator of text deltas),
:class:`Completion` (a finished request) and :class:`FinishReason`.

A stream lives on the event loop of the caller that submitted the request. The engine thread never
touches it: the front end's sink (``async_llm.llm.frontend``) receives a step's outputs and runs
:meth:`TokenStream._put` on the loop, with one ``loop.call_soon_threadsafe`` per loop per step.

Deltas that arrive while the consumer is busy are coalesced into one string, so a slow consumer
costs at most the request's own text in memory (bounded by ``max_tokens``) and never stalls the batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from async_llm.engine.request import FinishReason

__all__ = ["Completion", "FinishReason", "TokenStream"]


class TokenStream:
    """Async iterator over one request's text deltas; closing it aborts the request.

    Iterating yields ``str`` deltas whose concatenation is the full output text. When the request
    fails, the pending text is yielded first and then the error is raised. Leaving an ``async for``
    early, calling :meth:`aclose`, or cancelling the task that awaits the stream (inside ``async with``)
    aborts the request; the engine frees its batch row at the next step.
    """

    def __init__(
        self,
        request_id: str,
        loop: asyncio.AbstractEventLoop,
        abort: Callable[[str], None],
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        self.request_id = request_id
        self.loop = loop
        self.prompt_token_ids: list[int] = prompt_token_ids or []
        self._abort = abort
        self._pending: list[str] = []
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self.token_ids: list[int] = []  # every generated token id, eos included
        # When each token reached this stream's loop (perf_counter), text or not: a token whose text
        # is held back (a special token, part of a character) still arrived on time.
        self.token_times: list[float] = []
        self.finish_reason: FinishReason | None = None
        # Timings as the consumer sees them (perf_counter on the loop, delivery included).
        self.created_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    @property
    def finished(self) -> bool:
        """The engine is done with this request (finished, failed or aborted)."""
        return self.finish_reason is not None

    # -- engine side (runs on self.loop through call_soon_threadsafe) -----------------------------
    def _put(
        self,
        text: str,
        token_ids: list[int],
        finish_reason: FinishReason | None,
        error: BaseException | None,
    ) -> None:
        if self.finish_reason is not None:
            return  # already ended (e.g. closed by the consumer before the engine noticed)
        if text:
            self._pending.append(text)
        if token_ids:
            now = time.perf_counter()
            if self.first_token_at is None:
                self.first_token_at = now
            self.token_ids.extend(token_ids)
            self.token_times.extend([now] * len(token_ids))
        if finish_reason is not None:
            self.finish_reason = finish_reason
            self.finished_at = time.perf_counter()
            self._error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- consumer side ------------------------------------------------------------------------------
    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> str:
        while not self._pending:
            if self.finish_reason is not None or self._closed:
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
                raise StopAsyncIteration
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        text = "".join(self._pending)
        self._pending.clear()
        return text

    async def aclose(self) -> None:
        """Stop consuming; aborts the request if it is still running. Idempotent."""
        self.close()

    def close(self) -> None:
        """Synchronous form of :meth:`aclose` (safe from a ``finally`` or a callback)."""
        if self._closed:
            return
        self._closed = True
        if self.finish_reason is None:
            self._abort(self.request_id)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def __aenter__(self) -> TokenStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True)
class Completion:
    """A finished request: its text, tokens and timings (seconds, as the caller saw them)."""

    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids, the eos token included when generation stopped on it
    finish_reason: str  # "stop" (eos or stop string) or "length" (max_tokens / max_length)
    time_to_first_token: float | None
    latency: float
