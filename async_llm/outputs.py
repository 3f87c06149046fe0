"""What callers get back: :class:`TokenStream` (the per-request async iterator of text deltas),
:class:`RequestStream` (what ``astream`` returns: a stream opened at its first read),
:class:`Completion` (a finished request), :class:`Usage` and :class:`FinishReason`.

A stream lives on the event loop of the caller that submitted the request. The engine thread never
touches it: the front end's sink (``async_llm.llm.frontend``) receives a step's outputs and hands
each to :meth:`TokenStream.put` on the loop, with one ``loop.call_soon_threadsafe`` per loop per step.

Deltas that arrive while the consumer is busy are coalesced into one string, so a slow consumer
costs at most the request's own text in memory (bounded by ``max_tokens``) and never stalls the batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from async_llm.engine.output import FinishReason, RequestOutput, TokenLogprob
from async_llm.errors import GenerationError

__all__ = [
    "Completion", "FinishReason", "Logprob", "RequestStream", "StreamDelta", "TokenStream", "TopLogprob", "Usage",
]  # fmt: skip


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
class Usage:
    """A request's token counts (OpenAI's ``usage``): the prompt's and the generated ones (eos
    included), and how many of the prompt's were taken from the prefix cache instead of computed."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class StreamDelta:
    """What one read of :meth:`TokenStream.deltas` returns: new text, its tokens and their logprobs
    (``None`` unless asked for)."""

    text: str
    token_ids: list[int]
    logprobs: list[Logprob] | None = None


_Stream = TypeVar("_Stream", bound="_ClosedOnExit")


class _ClosedOnExit:
    """``async with stream:`` closes it on the way out (aborting its request if still running)."""

    if TYPE_CHECKING:  # each stream's own

        def close(self) -> None: ...

    async def __aenter__(self: _Stream) -> _Stream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class TokenStream(_ClosedOnExit):
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
        self._listeners: list[Callable[[], None]] = []
        self._error: BaseException | None = None
        self._closed = False
        self.token_ids: list[int] = []  # every generated token id, eos included
        # When each token reached this stream's loop (perf_counter), text or not: a token whose text
        # is held back (a special token, part of a character) still arrived on time.
        self.token_times: list[float] = []
        self.finish_reason: FinishReason | None = None
        self.cached_tokens = 0  # prompt tokens taken from the prefix cache, known at the end
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

    @property
    def usage(self) -> Usage | None:
        """The request's token counts once it has ended (None before): readable after the last delta."""
        if self.finish_reason is None:
            return None
        return Usage(len(self.prompt_token_ids), len(self.token_ids), self.cached_tokens)

    # -- the front end's sink (runs on self.loop, through call_soon_threadsafe) -----------------------
    def put(self, output: RequestOutput) -> None:
        """Take one step's output of this request: its text, tokens and logprobs, and how it ended.

        Called by the front end's sink (:class:`~async_llm.llm.frontend.LoopSink`) on :attr:`loop`,
        never by a consumer. Outputs after the end (the consumer closed the stream before the engine
        noticed) are dropped.
        """
        if self.finish_reason is not None:
            return
        if output.text:
            self._pending.append(output.text)
        self._pending_tokens.extend(output.token_ids)
        if output.logprobs:
            converted = [to_logprob(entry, self._token_text) for entry in output.logprobs]
            self._pending_logprobs.extend(converted)
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(converted)  # grows in place: a long output is not copied every step
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = [
                None if e is None else to_logprob(e, self._token_text) for e in output.prompt_logprobs
            ]
        if output.token_ids:
            now = time.perf_counter()
            if self.first_token_at is None:
                self.first_token_at = now
            self.token_ids.extend(output.token_ids)
            self.token_times.extend([now] * len(output.token_ids))
        if output.finish_reason is not None:
            self.finish_reason = output.finish_reason
            self.cached_tokens = output.cached_tokens
            self.finished_at = time.perf_counter()
            self._error = output.error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        for listener in self._listeners:
            listener()

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

    def listen(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on :attr:`loop` after each output reaches the stream (to read several
        streams with :meth:`poll` and one wake-up, without a task per stream)."""
        self._listeners.append(callback)

    def poll(self) -> StreamDelta | None:
        """The delta ready now, or None when nothing is (without waiting).

        Raises:
            StopAsyncIteration: The stream has ended and everything was read.
            Exception: The request's error, once, after its last text.
        """
        if not (self._pending or self._pending_tokens):
            if self.finish_reason is not None or self._closed:
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
                raise StopAsyncIteration
            return None
        delta = StreamDelta(
            "".join(self._pending), self._pending_tokens, self._pending_logprobs if self.logprobs is not None else None
        )
        self._pending, self._pending_tokens, self._pending_logprobs = [], [], []
        return delta

    async def _next_delta(self) -> StreamDelta:
        while (delta := self.poll()) is None:
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return delta

    def fail(self, exc: BaseException) -> None:
        """End the stream with :class:`~async_llm.errors.GenerationError` (from ``exc``) because its
        output could not be taken (on :attr:`loop`, by the front end's sink): the consumer gets the
        error instead of waiting for an output that will never come, and the request is aborted so
        that its row is freed. Nothing happens to a stream that has already ended."""
        if self.finish_reason is not None:
            return
        error = GenerationError(f"the request's output could not be delivered: {exc!r}")
        error.__cause__ = exc
        if not self._closed:
            self._abort(self.request_id)
        self.put(RequestOutput(self.request_id, finish_reason=FinishReason.ERROR, error=error))

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


class RequestStream(_ClosedOnExit):
    """The text deltas of one request that is submitted at the first read (what ``astream`` returns).

    Iterate it as a :class:`TokenStream`; once the last delta is read, :attr:`finish_reason` and
    :attr:`usage` say how the request ended and what it cost (both None until then). Leaving the
    loop early, :meth:`aclose`, or cancelling the consuming task aborts the request.

    Args:
        open_stream: Submits the request and returns its stream (awaited at the first read).
    """

    def __init__(self, open_stream: Callable[[], Awaitable[TokenStream]]) -> None:
        self._open: Callable[[], Awaitable[TokenStream]] | None = open_stream
        #: The request's :class:`TokenStream` once it is submitted (None before the first read).
        self.stream: TokenStream | None = None

    @property
    def finish_reason(self) -> FinishReason | None:
        return None if self.stream is None else self.stream.finish_reason

    @property
    def usage(self) -> Usage | None:
        return None if self.stream is None else self.stream.usage

    @property
    def token_ids(self) -> list[int]:
        return [] if self.stream is None else self.stream.token_ids

    @property
    def prompt_token_ids(self) -> list[int]:
        return [] if self.stream is None else self.stream.prompt_token_ids

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> str:
        if self.stream is None:
            if self._open is None:  # closed before the first read: nothing was submitted
                raise StopAsyncIteration
            open_stream, self._open = self._open, None
            self.stream = await open_stream()
        try:
            return await self.stream.__anext__()
        except StopAsyncIteration:
            raise
        except BaseException:  # a failure or a cancelled consumer: the request is aborted
            self.stream.close()
            raise

    async def aclose(self) -> None:
        """Stop consuming: aborts the request if it is still running. Idempotent."""
        self.close()

    def close(self) -> None:
        """Synchronous form of :meth:`aclose`."""
        self._open = None
        if self.stream is not None:
            self.stream.close()

    def __del__(self) -> None:
        # An `async for` left with `break` drops the stream without closing it: the request is
        # aborted here, as an async generator's finaliser would do.
        if self.stream is not None and not self.stream.finished:
            self.stream.close()


@dataclass(frozen=True)
class Completion:
    """A finished request: its text, tokens and timings (seconds, as the caller saw them).

    ``logprobs`` holds one :class:`Logprob` per generated token when asked for (``logprobs=True``),
    ``prompt_logprobs`` one per prompt token (``prompt_logprobs=k``; ``None`` for the first).
    With ``tools``, ``tool_calls`` holds the calls parsed from the text in OpenAI's shape
    (``{"id", "type": "function", "function": {"name", "arguments"}}``), ``content`` the text
    outside them, and ``finish_reason`` is ``"tool_calls"``. With a pydantic class as
    ``response_format``, ``parsed`` is the text validated into an instance of it (None when it does
    not validate, for example an output cut off by ``max_tokens``, and without such a class).
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
    parsed: Any = None
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache

    @property
    def usage(self) -> Usage:
        """The request's token counts."""
        return Usage(len(self.prompt_token_ids), len(self.token_ids), self.cached_tokens)
