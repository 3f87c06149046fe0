"""Per-request records and the figures computed from them (throughput, latency percentiles).

Every system produces the same :class:`RequestRecord` per request: when it was sent and when each of
its tokens became visible to the consumer (all times are ``time.perf_counter()`` seconds in the
process that ran the system). Tokens that arrive together (one text delta carrying two tokens, say)
share a timestamp, so inter-token latency is measured as the consumer sees it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

from async_llm.llm.metrics import percentile

#: The figures every system reports for every workload (the JSON and the tests rely on this list).
FIGURES: tuple[str, ...] = (
    "output_tokens_per_s",
    "requests_per_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "itl_p50_ms",
    "itl_p99_ms",
    "tpot_p50_ms",
    "e2e_p50_ms",
    "e2e_p99_ms",
    "peak_rss_mib",
    "peak_gpu_mib",
)

#: Figures where higher is better (the rest are latencies or memory: lower is better).
HIGHER_IS_BETTER: frozenset[str] = frozenset({"output_tokens_per_s", "requests_per_s"})


@dataclass
class RequestRecord:
    """What one request looked like from the consumer's side.

    Attributes:
        index: The request's index in its workload.
        arrival: When it was sent (its scheduled arrival; queueing before the system starts it counts).
        token_times: One timestamp per generated token, in order.
        prompt_tokens: Prompt length as the system saw it.
        expected_tokens: ``max_new_tokens`` of the spec (output is checked against it).
        tag: The spec's tag (its part in the workload's own figures, see :func:`tagged_figures`).
    """

    index: int
    arrival: float
    token_times: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    expected_tokens: int = 0
    tag: str = ""

    @property
    def output_tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def e2e(self) -> float | None:
        return self.token_times[-1] - self.arrival if self.token_times else None

    def add_tokens(self, count: int, when: float) -> None:
        """Record ``count`` tokens seen at ``when`` (a delta carrying several tokens)."""
        self.token_times.extend([when] * count)


def _pct(values: Sequence[float], q: float) -> float | None:
    value = percentile(values, q)
    return None if value is None else value * 1000.0


def summarise(
    records: Sequence[RequestRecord],
    start: float,
    peak_rss_mib: float | None,
    peak_gpu_mib: float | None,
) -> dict[str, Any]:
    """The figures of one system on one workload.

    Args:
        records: One per request of the workload.
        start: perf_counter at t=0 of the run (arrivals are offsets from it).
        peak_rss_mib, peak_gpu_mib: Memory peaks measured while the workload ran.

    Returns:
        Every name in :data:`FIGURES` (``None`` where it cannot be measured) plus counts: num_requests,
        output_tokens, expected_output_tokens, makespan_s, complete (every request got all its tokens).
    """
    ends = [r.token_times[-1] for r in records if r.token_times]
    makespan = (max(ends) - start) if ends else 0.0
    tokens = sum(r.output_tokens for r in records)
    ttfts = [r.ttft for r in records if r.ttft is not None]
    e2es = [r.e2e for r in records if r.e2e is not None]
    itls: list[float] = []
    tpots: list[float] = []
    for r in records:
        times = r.token_times
        itls.extend(b - a for a, b in zip(times, times[1:]))
        if len(times) > 1:
            tpots.append((times[-1] - times[0]) / (len(times) - 1))
    return {
        "output_tokens_per_s": tokens / makespan if makespan > 0 else None,
        "requests_per_s": len(ends) / makespan if makespan > 0 else None,
        "ttft_p50_ms": _pct(ttfts, 50),
        "ttft_p99_ms": _pct(ttfts, 99),
        "itl_p50_ms": _pct(itls, 50),
        "itl_p99_ms": _pct(itls, 99),
        "tpot_p50_ms": _pct(tpots, 50),
        "e2e_p50_ms": _pct(e2es, 50),
        "e2e_p99_ms": _pct(e2es, 99),
        "peak_rss_mib": peak_rss_mib,
        "peak_gpu_mib": peak_gpu_mib,
        "num_requests": len(records),
        "output_tokens": tokens,
        "expected_output_tokens": sum(r.expected_tokens for r in records),
        "makespan_s": makespan,
        "complete": all(r.output_tokens == r.expected_tokens for r in records),
        **tagged_figures(records),
    }


def tagged_figures(records: Sequence[RequestRecord]) -> dict[str, float | None]:
    """The prefill workloads' own figures, from their tagged requests:

    * ``last_turn_ttft_p50_ms``: time to first token of the conversations' last turns (``"last"``);
    * with one ``"long"`` request among ``"stream"`` ones: ``itl_before_p50_ms``, the streams' ITL
      p50 before the long prompt was sent; ``itl_during_p99_ms`` (and ``_p50_``), their gaps that
      overlap the time from its sending to its first token; ``interference``: during p99 over
      before p50 (1 = the streams kept their pace).
    """
    figures: dict[str, float | None] = {}
    last = [r.ttft for r in records if r.tag == "last" and r.ttft is not None]
    if last:
        figures["last_turn_ttft_p50_ms"] = _pct(last, 50)
    long = [r for r in records if r.tag == "long"]
    if len(long) == 1 and long[0].token_times:
        sent, first = long[0].arrival, long[0].token_times[0]
        before: list[float] = []
        during: list[float] = []
        for r in records:
            if r.tag == "stream":
                for a, b in zip(r.token_times, r.token_times[1:]):
                    if b < sent:
                        before.append(b - a)
                    elif a < first:
                        during.append(b - a)
        figures["itl_before_p50_ms"] = _pct(before, 50)
        figures["itl_during_p50_ms"] = _pct(during, 50)
        figures["itl_during_p99_ms"] = _pct(during, 99)
        b50, d99 = figures["itl_before_p50_ms"], figures["itl_during_p99_ms"]
        figures["interference"] = d99 / b50 if b50 and d99 is not None else None
    return figures


class PeakMemory:
    """Samples the RSS of this process and its children (and CUDA's allocator peak) while a workload runs.

    RSS is polled every ``interval`` seconds on a daemon thread (psutil reads /proc: cheap, and the
    thread sleeps between samples, so it does not compete for the 2 cores in any measurable way).
    """

    def __init__(self, device: str, interval: float = 0.02) -> None:
        self._device = device
        self._interval = interval
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._children: list[psutil.Process] = []
        self._children_due = 0.0
        self.peak_rss = 0

    def __enter__(self) -> PeakMemory:
        self.peak_rss = self._tree_rss()
        if self._device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._poll, name="bench-rss", daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak_rss = max(self.peak_rss, self._tree_rss())

    def _tree_rss(self) -> int:
        """RSS of this process and its children (a peer that runs in processes of its own, as vLLM's
        engine core and the peers' worker interpreters do, counts whole). Listing the children scans
        every process on the machine, so the list is refreshed once a second, not at every sample:
        the poller must not take the GIL from the system it measures for milliseconds at a time."""
        now = time.monotonic()
        if now >= self._children_due:
            with contextlib.suppress(psutil.Error):
                self._children = self._process.children(recursive=True)
            self._children_due = now + 1.0
        total = self._process.memory_info().rss
        for child in self._children:
            with contextlib.suppress(psutil.Error):  # a child that exited since the list was taken
                total += child.memory_info().rss
        return total

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)

    @property
    def rss_mib(self) -> float:
        return self.peak_rss / 2**20

    @property
    def gpu_mib(self) -> float | None:
        if not self._device.startswith("cuda"):
            return None
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
