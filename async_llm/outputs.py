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
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from async_llm.engine.output import FinishReason, TokenLogprob

__all__ = ["Completion", "FinishReason", "Logprob", "StreamDelta", "TokenStream", "TopLogprob"]


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One of the most likely tokens at a position (OpenAI's ``top_logprobs`` item)."""

    token: str
    token_id: int
    logprob: float
    bytes: list[int]


@dataclass(frozen=True, slots=True)
class Logprob:
    """A token's log-probability under the model's raw distribution, with the most likely tokens
    at its position (OpenAI's ``logprobs.content`` item)."""

    token: str
    token_id: int
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob] = field(default_factory=list)

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's chat shape: ``{"token", "logprob", "bytes", "top_logprobs": [...]}``."""
        return {
            "token": self.token, "logprob": self.logprob, "bytes": self.bytes,
            "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in self.top_logprobs],
        }  # fmt: skip


#: A token's text and its own bytes (which, for a token holding part of a character, are not its
#: text's: the text shows U+FFFD, the bytes join with the next tokens' into the character).
TokenText = Callable[[int], tuple[str, list[int]]]


def _plain_text(token_id: int) -> tuple[str, list[int]]:
    return str(token_id), list(str(token_id).encode())


def to_logprob(entry: TokenLogprob, token_text: TokenText) -> Logprob:
    """The public form of an engine entry, with the tokens' texts and bytes."""
    text = token_text
    token, raw = text(entry.token_id)
    top = []
    for token_id, logprob in entry.top:
        piece, piece_bytes = text(token_id)
        top.append(TopLogprob(piece, token_id, logprob, piece_bytes))
    return Logprob(token, entry.token_id, entry.logprob, raw, top)


@dataclass(frozen=True, slots=True)
class StreamDelta:
    """What one read of :meth:`TokenStream.deltas` returns: new text, its tokens and their logprobs
    (``None`` unless asked for)."""

    text: str
    token_ids: list[int]
    logprobs: list[Logprob] | None = None


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
        token_text: TokenText | None = None,
    ) -> None:
        self.request_id = request_id
        self.loop = loop
        self.prompt_token_ids: list[int] = prompt_token_ids or []
        self._abort = abort
        self._token_text = token_text or _plain_text
        #: The request's checked tools (``async_llm.llm.tool_use.ToolUse``), for parsing its calls.
        self.tool_use: Any = None
        self._pending: list[str] = []
        self._pending_tokens: list[int] = []
        self._pending_logprobs: list[Logprob] = []
        #: Every generated token's logprob, when the request asked for them.
        self.logprobs: list[Logprob] | None = None
        #: The prompt tokens' logprobs (``None`` for the first), when asked for.
        self.prompt_logprobs: list[Logprob | None] | None = None
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

    def token_text(self, token_id: int) -> str:
        """A token's text, as its logprobs show it."""
        return self._token_text(token_id)[0]

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
        logprobs: Sequence[TokenLogprob] | None = None,
        prompt_logprobs: Sequence[TokenLogprob | None] | None = None,
    ) -> None:
        if self.finish_reason is not None:
            return  # already ended (e.g. closed by the consumer before the engine noticed)
        if text:
            self._pending.append(text)
        self._pending_tokens.extend(token_ids)
        if logprobs:
            converted = [to_logprob(entry, self._token_text) for entry in logprobs]
            self._pending_logprobs.extend(converted)
            self.logprobs = (self.logprobs or []) + converted
        if prompt_logprobs is not None:
            self.prompt_logprobs = [None if e is None else to_logprob(e, self._token_text) for e in prompt_logprobs]
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
        while True:  # tokens without text (held back, special) are not a text delta
            delta = await self._next_delta()
            if delta.text:
                return delta.text

    def deltas(self) -> AsyncIterator[StreamDelta]:
        """Iterate :class:`StreamDelta` items (text, token ids, logprobs) instead of bare text.

        A delta may carry tokens and no text (a special token, part of a character, text held back
        by a stop string). Use one way of iterating per stream.
        """
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[StreamDelta]:
        while True:
            try:
                yield await self._next_delta()
            except StopAsyncIteration:
                return

    async def _next_delta(self) -> StreamDelta:
        while not (self._pending or self._pending_tokens):
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
        delta = StreamDelta(
            "".join(self._pending), self._pending_tokens, self._pending_logprobs if self.logprobs is not None else None
        )
        self._pending, self._pending_tokens, self._pending_logprobs = [], [], []
        return delta

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
    """A finished request: its text, tokens and timings (seconds, as the caller saw them).

    ``logprobs`` holds one :class:`Logprob` per generated token when asked for (``logprobs=True``),
    ``prompt_logprobs`` one per prompt token (``prompt_logprobs=k``; ``None`` for the first).
    With ``tools``, ``tool_calls`` holds the calls parsed from the text in OpenAI's shape
    (``{"id", "type": "function", "function": {"name", "arguments"}}``), ``content`` the text
    outside them, and ``finish_reason`` is ``"tool_calls"``.
    """

    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids, the eos token included when generation stopped on it
    finish_reason: str  # "stop" (eos, stop string or token, complete grammar), "length" or "tool_calls"
    time_to_first_token: float | None
    latency: float
    logprobs: list[Logprob] | None = None
    prompt_logprobs: list[Logprob | None] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    content: str | None = None
