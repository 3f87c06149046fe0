"""The narrow interface through which the engine hands results to a front end.

The engine knows request ids and an :class:`OutputSink` per request, nothing of the callers: no
stream, no event loop, no HTTP. It collects one step's results in :class:`StepOutputs` and hands each
sink its batch of :class:`RequestOutput` once per step (not per token). The front end implements
the sink (``async_llm.llm.frontend`` puts them on the caller's event loop with one
``call_soon_threadsafe`` per loop per step).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from async_llm.log import get_logger

log = get_logger("async_llm.engine.output")


class FinishReason(str, enum.Enum):
    """Why a request ended (OpenAI's names where they exist)."""

    STOP = "stop"  # eos token or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # stream closed / task cancelled / engine closed
    ERROR = "error"  # a model step failed


@dataclass(slots=True)
class TokenLogprob:
    """One position: the chosen token's log-probability and the ``k`` most likely tokens there."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass(slots=True)
class RequestOutput:
    """What one request produced in one step.

    ``text`` is the new text safe to show (stop strings held back); ``token_ids`` the new token
    ids (eos included); ``logprobs`` one entry per new token when the request asked for them;
    ``prompt_logprobs`` on the first output when asked (``None`` for the first prompt token);
    ``finish_reason`` is set on the request's last output, with ``error`` when it failed or was
    aborted, and ``cached_tokens`` (the prompt tokens taken from the prefix cache).
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class OutputSink(Protocol):
    """Where a request's outputs go; implemented by the front end.

    :meth:`deliver` runs on the engine thread, once per step per sink, and must not block (hand
    the outputs over to where they are consumed, and return).
    """

    def deliver(self, outputs: list[RequestOutput]) -> bool:
        """Take one step's outputs of this sink's requests.

        Returns:
            False when nobody will read them any more (the consumer is gone): the engine then
            aborts those requests.
        """
        ...


class Routed(Protocol):
    """What :meth:`StepOutputs.add` needs of a request: its id and its sink."""

    @property
    def request_id(self) -> str: ...

    @property
    def sink(self) -> OutputSink: ...

    @property
    def cached_tokens(self) -> int | None: ...


class StepOutputs:
    """One step's outputs, grouped per sink (engine thread only)."""

    def __init__(self) -> None:
        self._by_sink: dict[OutputSink, dict[str, RequestOutput]] = {}

    def add(
        self,
        request: Routed,
        text: str = "",
        tokens: tuple[int, ...] | list[int] = (),
        reason: FinishReason | None = None,
        error: BaseException | None = None,
        logprob: TokenLogprob | None = None,
        prompt_logprobs: list[TokenLogprob | None] | None = None,
    ) -> None:
        """Record new text/tokens of ``request`` (with the new token's logprob when asked for), and
        its end when ``reason`` is given."""
        outputs = self._by_sink.setdefault(request.sink, {})
        output = outputs.get(request.request_id)
        if output is None:
            output = outputs[request.request_id] = RequestOutput(request.request_id)
        output.text += text
        output.token_ids.extend(tokens)
        if logprob is not None:
            if output.logprobs is None:
                output.logprobs = []
            output.logprobs.append(logprob)
        if prompt_logprobs is not None:
            output.prompt_logprobs = prompt_logprobs
        if reason is not None:
            output.finish_reason, output.error = reason, error
            output.cached_tokens = request.cached_tokens or 0

    def __bool__(self) -> bool:
        return bool(self._by_sink)

    def flush(self) -> list[str]:
        """Hand every sink its outputs; returns the ids of requests nobody will read (to abort)."""
        by_sink, self._by_sink = self._by_sink, {}
        orphans: list[str] = []
        for sink, outputs in by_sink.items():
            batch = list(outputs.values())
            try:
                delivered = sink.deliver(batch)
            except Exception as exc:  # a broken sink loses its own requests, never the step
                log.exception("output sink failed", error=repr(exc))
                delivered = False
            if not delivered:
                orphans.extend(o.request_id for o in batch if not o.finished)
        return orphans
