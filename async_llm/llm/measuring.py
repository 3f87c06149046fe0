"""How an LLM records its finished requests and measures calls (:class:`MetricsMixin`).

Each finished request is recorded as its stream timed it, and a measurement (the seed documents'
``time_to_first_token``...) collects the requests it made through a context variable rather than
re-running a prompt to time it.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable
from typing import Any

from async_llm.llm.metrics import RequestMetrics
from async_llm.llm.parts import LLMParts

# The requests a measuring method (time_to_first_token, throughput...) made, as (metrics,
# perf_counter time it finished): tasks started inside the measurement inherit the list.
_MEASURED: contextvars.ContextVar[list[tuple[RequestMetrics, float]] | None] = contextvars.ContextVar(
    "async_llm_measured", default=None
)


class MetricsMixin(LLMParts):
    """Records an LLM's finished requests and reports them (:meth:`metrics`)."""

    def _record(self, metrics: RequestMetrics, finished_at: float | None = None) -> None:
        """Record a finished request (``finished_at``: its ``perf_counter`` time, default now) and set
        ``start_time``/``end_time`` to its wall-clock submission and finish."""
        self.metrics_recorder.record(metrics)
        now = time.perf_counter()
        finished = now if finished_at is None else finished_at
        self.end_time = time.time() - (now - finished)
        self.start_time = self.end_time - metrics.latency
        measured = _MEASURED.get()
        if measured is not None:
            measured.append((metrics, finished))

    async def _measure(self, call: Callable[[], Awaitable[Any]]) -> list[tuple[RequestMetrics, float]]:
        """Run ``call()``; the metrics of the requests it made, as their streams timed them."""
        measured: list[tuple[RequestMetrics, float]] = []
        token = _MEASURED.set(measured)
        try:
            await call()
        finally:
            _MEASURED.reset(token)
        return measured

    def metrics(self) -> dict[str, Any]:
        """Per-request aggregates (totals, tokens/s, time to first token and latency percentiles)
        and the engine's counters."""
        return {**self.metrics_recorder.summary(), "engine": self.stats()}
