"""The finish rule: when a request's output ends, and why. One rule for the engine's step, beam
search, the row controls (``min_tokens`` masks the same ids) and the streamers (which hide them)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from async_llm.engine.output import FinishReason
from async_llm.sampling_params import SamplingParams


class _StopWatcher(Protocol):
    def add_token(self, token_id: int) -> bool: ...


class Finishing(Protocol):
    """What the rule reads of a request (an engine :class:`~async_llm.engine.request.Request`)."""

    end_ids: frozenset[int]
    output_ids: list[int]

    @property
    def params(self) -> SamplingParams: ...

    @property
    def detokenizer(self) -> _StopWatcher: ...


def end_ids(eos_token_ids: Iterable[int], params: SamplingParams) -> frozenset[int]:
    """The ids that end a request: the model's eos ids unless ``ignore_eos``, and ``stop_token_ids``.
    Such a token ends the text and is not part of it."""
    eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
    return eos | frozenset(params.stop_token_ids)


def finish_reason(request: Finishing, token: int, grammar_done: bool = False) -> FinishReason | None:
    """Why ``request`` ends with ``token`` (already appended to its output), or None when it goes on.

    Feeds ``token`` to the request's detokenizer (which watches for stop strings), so call it once
    per token, in order: an end id, a stop string or a complete grammar is ``STOP``; ``max_tokens``
    output tokens is ``LENGTH``.
    """
    if token in request.end_ids:
        return FinishReason.STOP
    if request.detokenizer.add_token(token) or grammar_done:
        return FinishReason.STOP
    if len(request.output_ids) >= request.params.max_tokens:
        return FinishReason.LENGTH
    return None
