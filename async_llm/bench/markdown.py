"""``results.md``: the targets, a throughput summary, one table of figures and one of ratios per
workload, the roofline and the systems, from the suite's JSON document (see :mod:`.report`)."""

from __future__ import annotations

import math
from typing import Any

from async_llm.bench.targets import BASE, advantage, figure_of

__all__ = ["COLUMNS", "PREFILL_COLUMNS", "to_markdown"]

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
    meta = report["meta"]
    columns = [c for c in COLUMNS if c[0] != "peak_gpu_mib" or meta.get("device", "cpu").startswith("cuda")]
    out = ["# async_llm benchmark results", ""]
    out.append(
        f"Model `{meta.get('model')}` ({meta.get('dtype')}) on {meta.get('device')}, {meta.get('threads')} torch "
        f"threads, {meta.get('cpu_count')} CPUs; torch {meta.get('torch')}, transformers {meta.get('transformers')}; "
        f"{meta.get('date')}{' (--quick)' if meta.get('quick') else ''}. Ratios are async_llm's advantage "
        "(> 1: async_llm better): tokens/s and req/s are async_llm ÷ system, latencies and memory system ÷ async_llm."
    )
    out += _targets_section(report)
    out += _throughput_section(report)
    for workload in report["results"]:
        out += _workload_section(report, workload, columns)
    if report.get("roofline", {}):
        out += _roofline_section(report)
    out += _systems_section(report)
    return "\n".join(out) + "\n"


def _targets_section(report: dict[str, Any]) -> list[str]:
    out = ["", "## Targets", ""]
    marks = {True: "met", False: "**not met**", None: "n/a"}
    return out + _table(
        ["Target", "Measured", "Goal", "Met", "How"],
        [[t["target"], _ratio(t["measured"]), t["goal"], marks[t["met"]], t.get("how", "")] for t in report["targets"]],
    )


def _throughput_section(report: dict[str, Any]) -> list[str]:
    """Output tokens/s of every system on every workload, with the bare forwards' where measured."""
    results, ratios = report["results"], report["ratios_vs_async_llm"]
    out = [
        "",
        "## Output tokens/s (ratio = async_llm ÷ system)",
        "",
        "Medians over rounds; (min–max over rounds) where a workload ran more than once.",
        "",
    ]
    header = ["System"] + [h for w in results for h in (w, f"{w} ratio")]
    rows = []
    for system in report["systems"]:
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
        row = ["roofline (bare forwards)"]
        for w in results:
            bare = roof.get(w, {}).get("output_tokens_per_s")
            ratio = advantage("output_tokens_per_s", figure_of(results, w, BASE, "output_tokens_per_s"), bare)
            row += [_fmt(bare, 1), _ratio(ratio)]
        rows.append(row)
    return out + _table(header, rows)


def _workload_section(report: dict[str, Any], workload: str, columns: list[tuple[str, str, int]]) -> list[str]:
    """One workload: its description, every system's figures and their ratios, its own figures."""
    results, ratios, systems = report["results"], report["ratios_vs_async_llm"], list(report["systems"])
    by_system = results[workload]
    description: dict[str, Any] = next((w for w in report["workloads"] if w["name"] == workload), {})
    out = ["", f"## {workload}", "", _describe(description), ""]
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
    own = [c for c in PREFILL_COLUMNS if any(figure_of(results, workload, s, c[0]) is not None for s in systems)]
    if own:
        out += ["", "This workload's own figures:", ""]
        rows = [
            [s] + [_fmt(by_system.get(s, {}).get(f), d) for f, _, d in own]
            for s in systems
            if by_system.get(s) and "skipped" not in by_system[s]
        ]
        out += _table(["System"] + [h for _, h, _ in own], rows)
    return out


def _roofline_section(report: dict[str, Any]) -> list[str]:
    """The bare batched forwards of each burst against async_llm's decode step."""
    out = ["", "## Roofline: bare batched forwards vs async_llm's step", ""]
    rows = []
    for workload, r in report["roofline"].items():
        step = figure_of(report["results"], workload, BASE, "tpot_p50_ms")
        bare = r.get("decode_step_ms")
        overhead = "n/a" if not (step and bare) else f"{step / bare:.2f}×"
        rows.append(
            [workload, str(r["batch"]), str(r["prompt_width"]), _fmt(r["prefill_ms"], 1), _fmt(bare, 2),
             _fmt(step, 2), overhead, _fmt(r["output_tokens_per_s"], 1)]
        )  # fmt: skip
    header = ["Workload", "Batch", "Prompt width", "Prefill ms", "Decode step ms", "async_llm TPOT p50 ms",
              "Overhead", "Roofline tok/s"]  # fmt: skip
    return out + _table(header, rows)


def _systems_section(report: dict[str, Any]) -> list[str]:
    """Each system: skipped (why) or how long it ran and how busy the machine was meanwhile."""
    out = ["", "## Systems", ""]
    for name, info in report["systems"].items():
        state = (
            f"skipped: {info['skipped']}"
            if info.get("skipped")
            else f"ran in {info.get('seconds', 0):.0f} s while other processes used "
            f"{100 * info.get('other_cpu_share', 0.0):.0f}% of a core"
        )
        out.append(f"- **{name}** ({state}): {info.get('description', '')}")
    results = report["results"]
    incomplete = [f"{s} on {w}" for w, by in results.items() for s, f in by.items() if f.get("complete") is False]
    if incomplete:
        out += ["", "Incomplete outputs (fewer tokens than asked): " + ", ".join(incomplete)]
    return out


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
