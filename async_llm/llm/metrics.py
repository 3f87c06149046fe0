"""Per-request and aggregated generation metrics, and process resource utilisation.

An LLM records each finished request as its stream timed it (``async_llm.llm.measuring``).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch


@dataclass(frozen=True)
class RequestMetrics:
    """One finished request, timed as its caller saw it (seconds)."""

    prompt_tokens: int
    output_tokens: int
    time_to_first_token: float | None
    latency: float

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.latency if self.latency > 0 else 0.0


class MetricsRecorder:
    """Keeps the last ``window`` requests' metrics and running totals. Thread-safe."""

    def __init__(self, window: int = 1000) -> None:
        self._lock = threading.Lock()
        self._recent: deque[RequestMetrics] = deque(maxlen=window)
        self.requests = 0
        self.output_tokens = 0
        self.prompt_tokens = 0

    def record(self, metrics: RequestMetrics) -> None:
        with self._lock:
            self._recent.append(metrics)
            self.requests += 1
            self.output_tokens += metrics.output_tokens
            self.prompt_tokens += metrics.prompt_tokens

    @property
    def last(self) -> RequestMetrics | None:
        with self._lock:
            return self._recent[-1] if self._recent else None

    def summary(self) -> dict[str, Any]:
        """Totals, plus means and percentiles over the recent window."""
        with self._lock:
            recent = list(self._recent)
            totals = {
                "requests": self.requests,
                "prompt_tokens": self.prompt_tokens,
                "output_tokens": self.output_tokens,
            }
        if not recent:
            return totals
        ttfts = [m.time_to_first_token for m in recent if m.time_to_first_token is not None]
        latencies = [m.latency for m in recent]
        return {
            **totals,
            "mean_tokens_per_second": statistics.fmean(m.tokens_per_second for m in recent),
            "ttft_p50": percentile(ttfts, 50),
            "ttft_p95": percentile(ttfts, 95),
            "latency_p50": percentile(latencies, 50),
            "latency_p95": percentile(latencies, 95),
            "last": asdict(recent[-1]),
        }

    def restore(self, totals: dict[str, Any]) -> None:
        """Restore the running totals of a checkpoint (the window of recent requests starts empty)."""
        with self._lock:
            self.requests = int(totals.get("requests", 0))
            self.prompt_tokens = int(totals.get("prompt_tokens", 0))
            self.output_tokens = int(totals.get("output_tokens", 0))


def percentile(values: Sequence[float], pct: float) -> float | None:
    """The ``pct``-th percentile of ``values`` (linear interpolation between the closest ranks, as
    numpy's default), or None when there are none. The one definition the library and the benchmark
    suite share."""
    if not values:
        return None
    ordered = sorted(values)
    rank = pct / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


async def time_call(fn: Callable[[], Awaitable[Any]]) -> tuple[Any, float]:
    """Await ``fn()``; return its result and the seconds it took."""
    start = time.perf_counter()
    result = await fn()
    return result, time.perf_counter() - start


def resource_utilization(device: torch.device | None = None) -> dict[str, Any]:
    """CPU and memory of this process (and allocated/reserved memory of a CUDA device).

    ``cpu_percent`` is measured since the previous call in this process (0.0 the first time), as
    psutil defines it: it never sleeps, so it is safe to call from async code.
    """
    process = psutil.Process()
    with process.oneshot():
        memory = process.memory_info()
        usage: dict[str, Any] = {
            "cpu_percent": process.cpu_percent(interval=None),
            "num_threads": process.num_threads(),
            "rss_bytes": memory.rss,
            "vms_bytes": memory.vms,
        }
    usage["system_memory_percent"] = psutil.virtual_memory().percent
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        usage["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
        usage["cuda_reserved_bytes"] = torch.cuda.memory_reserved(device)
        usage["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return usage
