"""The plan of one engine step: which requests start, which prompt chunks prefill and which rows
decode, in which forwards. Pure policy, no torch.

:func:`plan_step` is the one place this is decided. It asks the scheduler which waiting requests
start (rows and prefill budget), the prefiller which chunks of the prompts being prefilled to
compute (oldest first, within :class:`ChunkBudget`), and the model runner how it puts them in
forwards (the fast runner: one forward with the decode rows; the transformers runner: prompts
padded or packed as its cost model finds cheapest, then the decode step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from async_llm.engine.prefill import Forward, Prefiller
    from async_llm.engine.request import Request
    from async_llm.engine.runners import ModelRunner
    from async_llm.engine.scheduler import Scheduler


@dataclass
class StepPlan:
    """What one step runs: the forwards in order (the last decodes the batch's rows, if any by then),
    and the requests it started."""

    admitted: list[Request] = field(default_factory=list)
    forwards: list[Forward] = field(default_factory=list)


def plan_step(
    scheduler: Scheduler,
    prefiller: Prefiller,
    budget: ChunkBudget,
    runner: ModelRunner,
    decoding: bool,
    admit: bool = True,
) -> StepPlan:
    """Plan one step.

    Args:
        scheduler, prefiller, budget, runner: The engine's parts (see the module's docstring).
        decoding: Whether rows are decoding: a long prompt then goes in chunks between their steps
            (``budget``); with none, a step prefills up to ``scheduler.max_prefill_tokens``.
        admit: Start waiting requests (False while a call waits for the engine to be idle).
    """
    admitted = scheduler.admit() if admit else []
    prefiller.add(admitted)
    if decoding:
        items = prefiller.take(budget.tokens(), budget.whole())
    else:
        items = prefiller.take(scheduler.max_prefill_tokens)
    return StepPlan(admitted, runner.forwards(items, decoding))


#: The chunk of a prefill that runs as a forward of its own (the transformers path), when not fixed.
UNFUSED_CHUNK_TOKENS = 256
#: Prompts (or the rests of long ones) up to this many tokens are prefilled in one step even while
#: rows decode (see ChunkBudget.whole), unless the chunk size is fixed.
WHOLE_PROMPT_TOKENS = 256


class ChunkBudget:
    """How many prompt tokens a step prefills while rows are decoding.

    Fixed (``tokens``; :data:`UNFUSED_CHUNK_TOKENS` by default where a chunk is a forward of its
    own), or, by default with the fast step, sized so that a step's prefill takes about ``share`` of one
    decode step of the running batch: running streams then keep at least ``1 / (1 + share)`` of
    their pace whatever the prompt, and a long prompt still makes progress every step. Both times
    are measured as the engine runs (exponential averages); the cost of a prompt token grows with
    the context before it (attention), and the last chunks measured are those of the same prompt.

    Args:
        tokens: A fixed budget, or None for the measured one.
        share: The measured budget's prefill time per decode time.
        smallest, largest: Bounds of the measured budget (a prompt always progresses).
    """

    def __init__(self, tokens: int | None = None, share: float = 0.25, smallest: int = 2, largest: int = 2048) -> None:
        self.fixed = tokens
        self.fused = True  # chunks run in the decode step's forward (else: UNFUSED_CHUNK_TOKENS)
        self.share, self.smallest, self.largest = share, smallest, largest
        self._decode_s: float | None = None  # one decode step of the running batch
        self._token_s: float | None = None  # one prefill token

    def tokens(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if not self.fused:
            return UNFUSED_CHUNK_TOKENS
        if self._decode_s is None or self._token_s is None:
            return 4 * self.smallest  # nothing measured yet
        return int(min(self.largest, max(self.smallest, self.share * self._decode_s / self._token_s)))

    def whole(self) -> int:
        """Tokens of prompts (or their rests) finished in one step however long it takes: a short
        prompt costs the running streams one longer step rather than many slower ones."""
        return self.fixed if self.fixed is not None else WHOLE_PROMPT_TOKENS

    def record_decode(self, seconds: float) -> None:
        self._decode_s = seconds if self._decode_s is None else 0.8 * self._decode_s + 0.2 * seconds

    def record_prefill(self, tokens: int, seconds: float, with_decode: bool = False) -> None:
        """A forward that prefilled ``tokens`` in ``seconds`` (with the decode rows: only the time
        beyond a decode step counts)."""
        if with_decode:
            if self._decode_s is None:
                return
            seconds = max(seconds - self._decode_s, 0.1 * seconds)
        if tokens > 0:
            rate = seconds / tokens
            self._token_s = rate if self._token_s is None else 0.5 * self._token_s + 0.5 * rate
