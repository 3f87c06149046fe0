"""The suite's outputs: one JSON file, one Markdown file (every figure and its ratio to async_llm,
the targets, the roofline) and PNG plots.

Ratios are always "async_llm's advantage": above 1 means async_llm is better. For throughput that is
async_llm / system; for latencies and memory it is system / async_llm.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeGuard

from async_llm.bench.metrics import FIGURES, HIGHER_IS_BETTER

BASE = "async_llm"

#: Markdown columns: (figure, header, decimals).
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("output_tokens_per_s", "tok/s", 1),
    ("requests_per_s", "req/s", 2),
    ("ttft_p50_ms", "TTFT p50 ms", 1),
    ("ttft_p99_ms", "TTFT p99 ms", 1),
    ("itl_p50_ms", "ITL p50 ms", 1),
    ("itl_p99_ms", "ITL p99 ms", 1),
    ("tpot_p50_ms", "TPOT p50 ms", 1),
    ("e2e_p50_ms", "E2E p50 ms", 0),
    ("e2e_p99_ms", "E2E p99 ms", 0),
    ("peak_rss_mib", "peak RSS MiB", 0),
    ("peak_gpu_mib", "peak GPU MiB", 0),
)

#: The prefill workloads' own figures (see ``metrics.tagged_figures``), in their tables.
PREFILL_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("last_turn_ttft_p50_ms", "last-turn TTFT p50 ms", 1),
    ("prefill_computed_tokens", "prompt tokens computed", 0),
    ("prefix_cache_hit_tokens", "prompt tokens from the cache", 0),
    ("itl_before_p50_ms", "streams' ITL p50 before ms", 1),
    ("itl_during_p50_ms", "ITL p50 during the long prefill ms", 1),
    ("itl_during_p99_ms", "ITL p99 during ms", 1),
    ("interference", "p99 during / p50 before", 2),
)

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


def _figure(results: dict[str, Any], workload: str, system: str, figure: str) -> float | None:
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
    results = report["results"]
    rows = []
    for label, workload, figure, peer, goal in TARGETS + PREFILL_TARGETS + PREFILL_PEER_TARGETS:
        by_system = results.get(workload, {})
        ratio, how = paired_ratio(by_system.get(BASE, {}), by_system.get(peer, {}), figure)
        # "lower than": strictly better; the prefill targets are "at most x times".
        strict = figure != "output_tokens_per_s" and peer != NO_CACHE
        met = None if ratio is None else (ratio > goal if strict else ratio >= goal)
        rows.append(
            {"target": label, "measured": ratio, "goal": f"{'>' if strict else '>='} {goal}", "met": met, "how": how}
        )
    label, workload, goal = ROOFLINE_TARGET
    ratio, how = paired_ratio(
        results.get(workload, {}).get(BASE, {}),
        report.get("roofline", {}).get(workload, {}),
        "tpot_p50_ms",
        "decode_step_ms",
        ratio=lambda step, bare: step / bare,
    )
    rows.append(
        {
            "target": label,
            "measured": ratio,
            "goal": f"<= {goal}",
            "met": None if ratio is None else ratio <= goal,
            "how": how,
        }
    )
    for workload, goal in (("burst-16", 1 / 0.6),):
        ratio, how = paired_ratio(
            results.get(workload, {}).get(BASE, {}),
            report.get("roofline", {}).get(workload, {}),
            "tpot_p50_ms",
            "matmul_step_ms",
            ratio=lambda step, limit: step / limit,
        )
        met = None if ratio is None else ratio <= goal
        rows.append(
            {
                "target": f"burst N=16: decode step / matrix products alone (>= 60% of their FLOP/s: <= {goal:.2f})",
                "measured": ratio,
                "goal": f"<= {goal:.2f}",
                "met": met,
                "how": how,
            }
        )
    label, workload, goal = INTERFERENCE_TARGET
    ratio = _figure(results, workload, BASE, "interference")
    met = None if ratio is None else ratio <= goal
    rows.append({"target": label, "measured": ratio, "goal": f"<= {goal}", "met": met, "how": "one round"})
    for label, workload, goal in SPIKE_TARGETS:
        p99, p50 = (_figure(results, workload, BASE, f) for f in ("itl_p99_ms", "itl_p50_ms"))
        ratio = None if p99 is None or p50 is None or p50 <= 0 else p99 / p50
        met = None if ratio is None else ratio <= goal
        rows.append({"target": label, "measured": ratio, "goal": f"<= {goal}", "met": met, "how": "median run"})
    for workload in results:
        ratio = advantage(
            "output_tokens_per_s",
            _figure(results, workload, BASE, "output_tokens_per_s"),
            _figure(results, workload, "vllm", "output_tokens_per_s"),
        )
        if ratio is not None:
            rows.append(
                {
                    "target": f"{workload}: tokens/s vs vLLM (reported, no goal)",
                    "measured": ratio,
                    "goal": "report",
                    "met": None,
                }
            )
    return rows


def build_report(
    meta: dict[str, Any],
    workloads: list[dict[str, Any]],
    systems: dict[str, dict[str, Any]],
    results: dict[str, dict[str, dict[str, Any]]],
    roofline: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Assemble the JSON document (ratios and targets included)."""
    ratios: dict[str, dict[str, dict[str, float | None]]] = {}
    for workload, by_system in results.items():
        base = by_system.get(BASE, {})
        ratios[workload] = {
            system: {f: advantage(f, base.get(f), figures.get(f)) for f in FIGURES}
            for system, figures in by_system.items()
            if "skipped" not in figures
        }
    report = {
        "meta": meta,
        "workloads": workloads,
        "systems": systems,
        "results": results,
        "ratios_vs_async_llm": ratios,
        "roofline": roofline,
    }
    report["targets"] = evaluate_targets(report)
    return report


def _fmt(value: Any, decimals: int) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:,.{decimals}f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def to_markdown(report: dict[str, Any]) -> str:
    """Targets, a throughput summary, one table of figures and one of ratios per workload, the roofline."""
    meta, results, ratios = report["meta"], report["results"], report["ratios_vs_async_llm"]
    columns = [c for c in COLUMNS if c[0] != "peak_gpu_mib" or meta.get("device", "cpu").startswith("cuda")]
    systems = list(report["systems"])
    out = ["# async_llm benchmark results", ""]
    out.append(
        f"Model `{meta.get('model')}` ({meta.get('dtype')}) on {meta.get('device')}, {meta.get('threads')} torch "
        f"threads, {meta.get('cpu_count')} CPUs; torch {meta.get('torch')}, transformers {meta.get('transformers')}; "
        f"{meta.get('date')}{' (--quick)' if meta.get('quick') else ''}. Ratios are async_llm's advantage "
        "(> 1: async_llm better): tokens/s and req/s are async_llm ÷ system, latencies and memory system ÷ async_llm."
    )
    out += ["", "## Targets", ""]
    marks = {True: "met", False: "**not met**", None: "n/a"}
    out += _table(
        ["Target", "Measured", "Goal", "Met", "How"],
        [[t["target"], _ratio(t["measured"]), t["goal"], marks[t["met"]], t.get("how", "")] for t in report["targets"]],
    )
    out += [
        "",
        "## Output tokens/s (ratio = async_llm ÷ system)",
        "",
        "Medians over rounds; (min–max over rounds) where a workload ran more than once.",
        "",
    ]
    header = ["System"] + [h for w in results for h in (w, f"{w} ratio")]
    rows = []
    for system in systems:
        row = [system]
        for workload, by_system in results.items():
            figures = by_system.get(system, {})
            spread = figures.get("spread", {}).get("output_tokens_per_s")
            value = _fmt(figures.get("output_tokens_per_s"), 1)
            if spread:
                value += f" ({spread[0]:.0f}–{spread[1]:.0f})"
            row += [value, _ratio(ratios.get(workload, {}).get(system, {}).get("output_tokens_per_s"))]
        rows.append(row)
    roof = report.get("roofline", {})
    if roof:
        rows.append(
            ["roofline (bare forwards)"]
            + [
                c
                for w in results
                for c in (
                    _fmt(roof.get(w, {}).get("output_tokens_per_s"), 1),
                    _ratio(
                        advantage(
                            "output_tokens_per_s",
                            _figure(results, w, BASE, "output_tokens_per_s"),
                            roof.get(w, {}).get("output_tokens_per_s"),
                        )
                    ),
                )
            ]
        )
    out += _table(header, rows)
    for workload, by_system in results.items():
        description: dict[str, Any] = next((w for w in report["workloads"] if w["name"] == workload), {})
        out += ["", f"## {workload}", "", _describe(description), ""]
        value_rows, ratio_rows = [], []
        for system in systems:
            figures = by_system.get(system, {})
            if "skipped" in figures or not figures:
                value_rows.append([system] + ["n/a"] * len(columns))
                continue
            value_rows.append([system] + [_fmt(figures.get(f), d) for f, _, d in columns])
            ratio_rows.append([system] + [_ratio(ratios[workload][system].get(f)) for f, _, _ in columns])
        out += _table(["System"] + [h for _, h, _ in columns], value_rows)
        out += ["", "Ratios vs async_llm (> 1: async_llm better):", ""]
        out += _table(["System"] + [f"{h} ratio" for _, h, _ in columns], ratio_rows)
        own = [c for c in PREFILL_COLUMNS if any(_figure(results, workload, s, c[0]) is not None for s in systems)]
        if own:
            out += ["", "This workload's own figures:", ""]
            rows = [
                [s] + [_fmt(by_system.get(s, {}).get(f), d) for f, _, d in own]
                for s in systems
                if by_system.get(s) and "skipped" not in by_system[s]
            ]
            out += _table(["System"] + [h for _, h, _ in own], rows)
    if roof:
        out += ["", "## Roofline: bare batched forwards vs async_llm's step", ""]
        rows = []
        for workload, r in roof.items():
            step = _figure(results, workload, BASE, "tpot_p50_ms")
            bare = r.get("decode_step_ms")
            rows.append(
                [
                    workload,
                    str(r["batch"]),
                    str(r["prompt_width"]),
                    _fmt(r["prefill_ms"], 1),
                    _fmt(bare, 2),
                    _fmt(step, 2),
                    "n/a" if not (step and bare) else f"{step / bare:.2f}×",
                    _fmt(r["output_tokens_per_s"], 1),
                ]
            )
        out += _table(
            [
                "Workload",
                "Batch",
                "Prompt width",
                "Prefill ms",
                "Decode step ms",
                "async_llm TPOT p50 ms",
                "Overhead",
                "Roofline tok/s",
            ],
            rows,
        )
    out += ["", "## Systems", ""]
    for name, info in report["systems"].items():
        state = (
            f"skipped: {info['skipped']}"
            if info.get("skipped")
            else f"ran in {info.get('seconds', 0):.0f} s while other processes used "
            f"{100 * info.get('other_cpu_share', 0.0):.0f}% of a core"
        )
        out.append(f"- **{name}** ({state}): {info.get('description', '')}")
    incomplete = [f"{s} on {w}" for w, by in results.items() for s, f in by.items() if f.get("complete") is False]
    if incomplete:
        out += ["", "Incomplete outputs (fewer tokens than asked): " + ", ".join(incomplete)]
    return "\n".join(out) + "\n"


def _describe(w: dict[str, Any]) -> str:
    if not w:
        return ""
    p, o = w["prompt_tokens"], w["output_tokens"]
    heads = {
        "burst": f"{w['num_requests']} requests at once",
        "mixed": (
            f"{w['num_requests']} requests, Poisson arrivals at {w.get('rate')}/s ({w.get('length_distribution')})"
        ),
        "chat": (
            f"{w.get('conversations')} conversations of {w.get('turns')} turns, each turn resending the whole "
            "history and sent when the previous one finished"
        ),
        "shared-prefix": (
            f"{w['num_requests']} requests at once behind one {w.get('prefix_tokens')}-token system prompt"
        ),
        "long-prompt": (
            f"{w.get('streams')} streams decoding from t=0, a {w.get('long_prompt_tokens')}-token prompt "
            f"arriving at {w.get('long_prompt_arrival_s')} s"
        ),
    }
    head = heads.get(w["kind"], f"{w['num_requests']} requests")
    return (
        f"{head}; prompt tokens {p['min']}..{p['max']} (median {p['median']}), output tokens "
        f"{o['min']}..{o['max']} (median {o['median']}), {w['total_output_tokens']} output tokens in all."
    )


def plot(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Throughput and tail latencies vs concurrency (bursts), latency percentiles (mixed, else the largest burst)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, systems = report["results"], list(report["systems"])
    bursts = sorted((w for w in report["workloads"] if w["kind"] == "burst"), key=lambda w: w["concurrency"])
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [w["concurrency"] for w in bursts]
    for system in systems:
        ys = [_figure(results, w["name"], system, "output_tokens_per_s") for w in bursts]
        if any(y is not None for y in ys):
            ax.plot(xs, [math.nan if y is None else y for y in ys], marker="o", label=system)
    roof = [report.get("roofline", {}).get(w["name"], {}).get("output_tokens_per_s") for w in bursts]
    if any(r is not None for r in roof):
        ax.plot(xs, [math.nan if r is None else r for r in roof], "k--", marker="x", label="roofline (bare forwards)")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent requests (burst)",
        ylabel="output tokens/s",
        title=f"Throughput vs concurrency ({report['meta'].get('device')})",
    )
    if xs:
        ax.set_xticks(xs, [str(x) for x in xs])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "throughput_vs_concurrency.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, figure, label in ((axes[0], "ttft_p99_ms", "TTFT p99 (ms)"), (axes[1], "itl_p99_ms", "ITL p99 (ms)")):
        for system in systems:
            ys = [_figure(results, w["name"], system, figure) for w in bursts]
            if any(y is not None for y in ys):
                ax.plot(xs, [math.nan if y is None else y for y in ys], marker="o", label=system)
        ax.set(xscale="log", yscale="log", xlabel="concurrent requests (burst)", ylabel=label, title=label)
        if xs:
            ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    paths.append(_save(fig, out_dir / "latency_vs_concurrency.png"))

    target: str | None = next(
        (w["name"] for w in report["workloads"] if w["kind"] == "mixed"), bursts[-1]["name"] if bursts else None
    )
    fig, ax = plt.subplots(figsize=(8, 4.5))
    figures = ["ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms"]
    present = [s for s in systems if target and _figure(results, target, s, "e2e_p50_ms") is not None]
    width = 0.8 / max(1, len(present))
    for i, system in enumerate(present):
        assert target is not None  # present is empty without a target
        values = [_figure(results, target, system, f) or math.nan for f in figures]
        ax.bar([j + i * width for j in range(len(figures))], values, width, label=system)
    ax.set_xticks(
        [j + width * (len(present) - 1) / 2 for j in range(len(figures))],
        ["TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "E2E p50", "E2E p99"],
    )
    ax.set(yscale="log", ylabel="ms (log scale)", title=f"Latency percentiles: {target}")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "latency_percentiles.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and the plots into ``out_dir`` (created if missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    md_path = out_dir / "results.md"
    md_path.write_text(to_markdown(report))
    plots = plot(report, out_dir)
    return {"json": json_path, "markdown": md_path, **{p.stem: p for p in plots}}
