"""A request as the engine sees it, and its lifecycle states."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from async_llm.engine.finish import end_ids

if TYPE_CHECKING:
    from async_llm.engine.controls import RowControls
    from async_llm.engine.detokenizer import Detokenizer
    from async_llm.engine.output import FinishReason, OutputSink
    from async_llm.engine.speculative import RowSpeculation
    from async_llm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """Where a request is. Only the scheduler changes it."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One generation request.

    ``prompt_ids``, ``params`` and ``sink`` are fixed at submission; everything below them is
    written only by the engine thread while the request is alive. The engine reports the request's
    outputs to ``sink`` (see :mod:`async_llm.engine.output`) and knows nothing else of its caller.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: OutputSink
    detokenizer: Detokenizer
    eos_token_ids: frozenset[int]
    controls: RowControls | None = None  # grammar, masks, biases, processors; None for a plain row
    arrival_time: float = field(default_factory=time.perf_counter)

    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    # Random draws (engine.draws): the n-th uniform is a pure function of (draw_seed, n). The seed is
    # `params.seed`, or one drawn from the engine's generator when the request first samples; `draws`
    # counts the draws made, so a preempted request continues its sequence when it resumes.
    draw_seed: int | None = None
    draws: int = 0
    prompt_logprobs_sent: bool = False
    cached_tokens: int | None = None  # prompt tokens its first prefill took from the prefix cache
    speculation: RowSpeculation | None = None  # its n-gram drafts' state, once it speculates
    # Scheduling (engine.scheduler): when it last started waiting, the seconds it waited before
    # that, how often it was preempted, and when it last made progress (admitted, or a token).
    queued_at: float = 0.0
    waited: float = 0.0
    preemptions: int = 0
    last_progress: float = 0.0
    end_ids: frozenset[int] = field(init=False, repr=False)  # see engine.finish.end_ids

    def __post_init__(self) -> None:
        self.end_ids = end_ids(self.eos_token_ids, self.params)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def context_ids(self) -> list[int]:
        """What a prefill of this request feeds: the prompt, plus the tokens generated before a
        preemption (a resumed request recomputes its cache and continues where it stopped)."""
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
