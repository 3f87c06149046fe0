"""The suite's targets: what async_llm must achieve against each peer (and against itself without
the prefix cache), each ratio taken round by round where the rounds pair up.

Ratios are always "async_llm's advantage": above 1 means async_llm is better. For throughput that is
async_llm / system; for latencies and memory it is system / async_llm.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any, TypeGuard

from async_llm.bench.metrics import HIGHER_IS_BETTER

__all__ = ["BASE", "FEATURE_TARGETS", "TARGETS", "advantage", "evaluate_targets", "figure_of", "paired_ratio"]

#: The system every ratio is taken against.
BASE = "async_llm"

#: (label, workload, figure, peer, goal): async_llm's advantage on ``figure`` over ``peer`` must be >= goal
#: (``> 1`` for "lower than"). The roofline target is handled apart (an overhead ratio, <= its goal).
TARGETS: tuple[tuple[str, str, str, str, float], ...] = (
    ("burst N=16: tokens/s vs sequential generate", "burst-16", "output_tokens_per_s", "transformers-sequential", 6.0),
    ("burst N=16: tokens/s vs static batching", "burst-16", "output_tokens_per_s", "transformers-static", 1.0),
    ("mixed: tokens/s vs static batching", "mixed", "output_tokens_per_s", "transformers-static", 1.5),
    ("mixed: tokens/s vs transformers CB", "mixed", "output_tokens_per_s", "transformers-cb", 1.0),
    ("mixed: TTFT p99 lower than static batching", "mixed", "ttft_p99_ms", "transformers-static", 1.0),
    ("mixed: TTFT p99 lower than transformers CB", "mixed", "ttft_p99_ms", "transformers-cb", 1.0),
    # Against the peers people pick for speed (vLLM's CPU build, llama.cpp), on the same weights.
    ("burst N=16: tokens/s twice static batching's", "burst-16", "output_tokens_per_s", "transformers-static", 2.0),
    ("burst N=1: tokens/s vs sequential generate", "burst-1", "output_tokens_per_s", "transformers-sequential", 1.5),
    ("burst N=16: tokens/s vs vLLM CPU", "burst-16", "output_tokens_per_s", "vllm-cpu", 1.3),
    ("burst N=64: tokens/s vs vLLM CPU", "burst-64", "output_tokens_per_s", "vllm-cpu", 1.3),
    ("burst N=16: tokens/s vs llama.cpp F32", "burst-16", "output_tokens_per_s", "llama.cpp-f32", 1.3),
    ("burst N=64: tokens/s vs llama.cpp F32", "burst-64", "output_tokens_per_s", "llama.cpp-f32", 1.3),
    ("burst N=1: tokens/s vs llama.cpp F32", "burst-1", "output_tokens_per_s", "llama.cpp-f32", 1.0),
    ("mixed: tokens/s vs vLLM CPU", "mixed", "output_tokens_per_s", "vllm-cpu", 1.0),
    ("mixed: TTFT p99 lower than vLLM CPU", "mixed", "ttft_p99_ms", "vllm-cpu", 1.0),
    ("burst N=16: TTFT p50 lower than vLLM CPU", "burst-16", "ttft_p50_ms", "vllm-cpu", 1.0),
    ("burst N=64: peak RSS half of vLLM CPU's", "burst-64", "peak_rss_mib", "vllm-cpu", 2.0),
)
#: What the prefix cache and chunked prefill must give (issue targets): (label, workload, figure, peer, goal)
#: as in TARGETS, async_llm against itself without the cache.
NO_CACHE = "async_llm-no-prefix-cache"
PREFILL_TARGETS: tuple[tuple[str, str, str, str, float], ...] = (
    ("chat: last-turn TTFT p50, <= 0.25x without the prefix cache", "chat", "last_turn_ttft_p50_ms", NO_CACHE, 4.0),
    ("shared-prefix: TTFT p50, <= 0.3x without the prefix cache", "shared-prefix", "ttft_p50_ms", NO_CACHE, 1 / 0.3),
    (
        "shared-prefix: prompt tokens computed, <= 1/8 of those without the cache",
        "shared-prefix",
        "prefill_computed_tokens",
        NO_CACHE,
        8.0,
    ),
)
#: The same workloads against vLLM's CPU build (prefix caching and chunked prefill on by default).
PREFILL_PEER_TARGETS: tuple[tuple[str, str, str, str, float], ...] = (
    ("chat: last-turn TTFT p50 vs vLLM CPU", "chat", "last_turn_ttft_p50_ms", "vllm-cpu", 1.0),
    ("shared-prefix: TTFT p50 vs vLLM CPU", "shared-prefix", "ttft_p50_ms", "vllm-cpu", 1.0),
    (
        "long-prompt: streams' ITL p99 during the long prefill vs vLLM CPU",
        "long-prompt",
        "itl_during_p99_ms",
        "vllm-cpu",
        1.0,
    ),
)
#: Running streams while a long prompt is prefilled: their ITL p99 meanwhile over their ITL p50 before.
INTERFERENCE_TARGET = (
    "long-prompt: streams' ITL p99 during the long prefill / their ITL p50 before",
    "long-prompt",
    2.0,
)
#: The opt-in features against their peers and against async_llm without them: (label, workload, figure,
#: system, peer, goal), the ratio being ``system``'s advantage over ``peer``.
INT8, NGRAM = "async_llm-int8", "async_llm-ngram"
PYTHON_STEP, PY_INT8 = "async_llm-python-step", "async_llm-int8-python-step"
FEATURE_TARGETS: tuple[tuple[str, str, str, str, str, float], ...] = (
    ("int8 burst N=1: tokens/s vs llama.cpp Q8_0", "burst-1", "output_tokens_per_s", INT8, "llama.cpp-q8_0", 1.0),
    ("int8 burst N=16: tokens/s vs llama.cpp Q8_0", "burst-16", "output_tokens_per_s", INT8, "llama.cpp-q8_0", 1.3),
    ("int8 burst N=64: tokens/s vs llama.cpp Q8_0", "burst-64", "output_tokens_per_s", INT8, "llama.cpp-q8_0", 1.3),
    ("int8 burst N=16: tokens/s vs vLLM CPU", "burst-16", "output_tokens_per_s", INT8, "vllm-cpu", 1.3),
    ("int8 burst N=64: tokens/s vs vLLM CPU", "burst-64", "output_tokens_per_s", INT8, "vllm-cpu", 1.3),
    ("ngram grounded N=1: tokens/s vs without", "grounded-1", "output_tokens_per_s", NGRAM, BASE, 1.8),
    ("ngram grounded N=1: tokens/s vs llama.cpp F32", "grounded-1", "output_tokens_per_s", NGRAM, "llama.cpp-f32", 1.0),
    ("ngram grounded N=1: tokens/s vs vLLM's ngram", "grounded-1", "output_tokens_per_s", NGRAM, "vllm-cpu-ngram", 1.0),
    ("ngram burst N=1: tokens/s vs without", "burst-1", "output_tokens_per_s", NGRAM, BASE, 0.97),
    ("ngram burst N=16: tokens/s vs without", "burst-16", "output_tokens_per_s", NGRAM, BASE, 0.97),
    ("ngram burst N=64: tokens/s vs without", "burst-64", "output_tokens_per_s", NGRAM, BASE, 0.97),
    ("native step burst N=1: tokens/s vs the Python step", "burst-1", "output_tokens_per_s", BASE, PYTHON_STEP, 1.0),
    ("native step burst N=16: tokens/s vs the Python step", "burst-16", "output_tokens_per_s", BASE, PYTHON_STEP, 1.0),
    ("native step burst N=64: tokens/s vs the Python step", "burst-64", "output_tokens_per_s", BASE, PYTHON_STEP, 1.0),
    ("int8 native step burst N=1: tokens/s vs the Python step", "burst-1", "output_tokens_per_s", INT8, PY_INT8, 1.0),
    ("int8 native step burst N=16: tokens/s vs the Python step", "burst-16", "output_tokens_per_s", INT8, PY_INT8, 1.0),
)

#: ITL p99 over ITL p50 of async_llm itself (no spikes), at most this.
SPIKE_TARGETS: tuple[tuple[str, str, float], ...] = (
    ("burst N=16: ITL p99 / ITL p50", "burst-16", 1.3),
    ("burst N=1: ITL p99 / ITL p50", "burst-1", 1.3),
)
ROOFLINE_TARGET = ("burst N=16: decode step (TPOT p50) / roofline decode step", "burst-16", 1.15)


def advantage(figure: str, base: float | None, other: float | None) -> float | None:
    """async_llm's advantage on ``figure``: > 1 means async_llm is better; ``None`` when undefined."""
    if base is None or other is None or base <= 0 or other <= 0:
        return None
    return base / other if figure in HIGHER_IS_BETTER else other / base


def figure_of(results: dict[str, Any], workload: str, system: str, figure: str) -> float | None:
    """One figure of ``results`` (workload -> system -> figure), ``None`` unless a finite number."""
    value = results.get(workload, {}).get(system, {}).get(figure)
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _positive(value: object) -> TypeGuard[float]:
    """A measured figure: a finite number above zero."""
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _rounds(entry: dict[str, Any], figure: str) -> list[float] | None:
    values: list[float] | None = entry.get("per_round", {}).get(figure)
    if not values or not all(_positive(v) for v in values):
        return None
    return values


def paired_ratio(
    base: dict[str, Any],
    other: dict[str, Any],
    figure: str,
    other_figure: str | None = None,
    ratio: Callable[[float, float], float | None] | None = None,
) -> tuple[float | None, str]:
    """The median over rounds of the round-by-round ratio of ``base`` to ``other`` (both ran in the
    same round, minutes apart at most), or the ratio of their medians when rounds cannot be paired.

    Returns:
        (ratio, how it was taken).
    """
    ratio = ratio or (lambda b, o: advantage(figure, b, o))
    b, o = _rounds(base, figure), _rounds(other, other_figure or figure)
    if b and o and len(b) == len(o) and len(b) > 1:
        values = [ratio(x, y) for x, y in zip(b, o, strict=True)]
        paired = [v for v in values if v is not None]
        if len(paired) == len(values):
            return statistics.median(paired), f"median of {len(b)} paired rounds"
    bv, ov = base.get(figure), other.get(other_figure or figure)
    if not (_positive(bv) and _positive(ov)):
        return None, "not measured"
    return ratio(bv, ov), "ratio of medians" if base.get("rounds", 1) > 1 else "one round"


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target with its measured ratio and whether it is met (``None``: could not be measured)."""
    results, roofline = report["results"], report.get("roofline", {})
    return [
        *_peer_targets(results),
        *_roofline_targets(results, roofline),
        *_own_targets(results),
        *_feature_targets(results),
        *_vllm_reported(results),
    ]


def _row(target: str, measured: float | None, goal: str, met: bool | None, how: str) -> dict[str, Any]:
    return {"target": target, "measured": measured, "goal": goal, "met": met, "how": how}


def _peer_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """async_llm against each peer (and against itself without the prefix cache)."""
    rows = []
    for label, workload, figure, peer, goal in TARGETS + PREFILL_TARGETS + PREFILL_PEER_TARGETS:
        by_system = results.get(workload, {})
        ratio, how = paired_ratio(by_system.get(BASE, {}), by_system.get(peer, {}), figure)
        # "lower than": strictly better; the prefill targets are "at most x times".
        strict = figure != "output_tokens_per_s" and peer != NO_CACHE
        met = None if ratio is None else (ratio > goal if strict else ratio >= goal)
        rows.append(_row(label, ratio, f"{'>' if strict else '>='} {goal}", met, how))
    return rows


def _feature_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The opt-in features (int8, n-gram speculation) against their peers (where both ran)."""
    rows = []
    for label, workload, figure, system, peer, goal in FEATURE_TARGETS:
        by_system = results.get(workload, {})
        if system not in by_system:
            continue
        ratio, how = paired_ratio(by_system[system], by_system.get(peer, {}), figure)
        rows.append(_row(label, ratio, f">= {goal}", None if ratio is None else ratio >= goal, how))
    return rows


def _roofline_targets(results: dict[str, Any], roofline: dict[str, Any]) -> list[dict[str, Any]]:
    """async_llm's decode step against the bare forwards, and against the matrix products alone."""
    label, workload, goal = ROOFLINE_TARGET
    ratio, how = paired_ratio(
        results.get(workload, {}).get(BASE, {}),
        roofline.get(workload, {}),
        "tpot_p50_ms",
        "decode_step_ms",
        ratio=lambda step, bare: step / bare,
    )
    rows = [_row(label, ratio, f"<= {goal}", None if ratio is None else ratio <= goal, how)]
    for workload, goal in (("burst-16", 1 / 0.6),):
        ratio, how = paired_ratio(
            results.get(workload, {}).get(BASE, {}),
            roofline.get(workload, {}),
            "tpot_p50_ms",
            "matmul_step_ms",
            ratio=lambda step, limit: step / limit,
        )
        met = None if ratio is None else ratio <= goal
        label = f"burst N=16: decode step / matrix products alone (>= 60% of their FLOP/s: <= {goal:.2f})"
        rows.append(_row(label, ratio, f"<= {goal:.2f}", met, how))
    return rows


def _own_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """async_llm against itself: no spikes in its inter-token latency, little interference."""
    label, workload, goal = INTERFERENCE_TARGET
    ratio = figure_of(results, workload, BASE, "interference")
    rows = [_row(label, ratio, f"<= {goal}", None if ratio is None else ratio <= goal, "one round")]
    for label, workload, goal in SPIKE_TARGETS:
        p99, p50 = (figure_of(results, workload, BASE, f) for f in ("itl_p99_ms", "itl_p50_ms"))
        ratio = None if p99 is None or p50 is None or p50 <= 0 else p99 / p50
        rows.append(_row(label, ratio, f"<= {goal}", None if ratio is None else ratio <= goal, "median run"))
    return rows


def _vllm_reported(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Tokens/s against vLLM's CUDA build where it ran: reported, with no goal."""
    rows = []
    for workload in results:
        ratio = advantage(
            "output_tokens_per_s",
            figure_of(results, workload, BASE, "output_tokens_per_s"),
            figure_of(results, workload, "vllm", "output_tokens_per_s"),
        )
        if ratio is not None:
            target = f"{workload}: tokens/s vs vLLM (reported, no goal)"
            rows.append({"target": target, "measured": ratio, "goal": "report", "met": None})
    return rows
