"""The suite's PNG plots: throughput and tail latencies against concurrency (the bursts), and the
latency percentiles of one workload (mixed, else the largest burst)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from async_llm.bench.targets import figure_of

__all__ = ["plot"]


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
        ys = [figure_of(results, w["name"], system, "output_tokens_per_s") for w in bursts]
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
    _legend(ax)
    paths.append(_save(fig, out_dir / "throughput_vs_concurrency.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, figure, label in ((axes[0], "ttft_p99_ms", "TTFT p99 (ms)"), (axes[1], "itl_p99_ms", "ITL p99 (ms)")):
        for system in systems:
            ys = [figure_of(results, w["name"], system, figure) for w in bursts]
            if any(y is not None for y in ys):
                ax.plot(xs, [math.nan if y is None else y for y in ys], marker="o", label=system)
        ax.set(xscale="log", yscale="log", xlabel="concurrent requests (burst)", ylabel=label, title=label)
        if xs:
            ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(True, which="both", alpha=0.3)
    _legend(axes[0])
    paths.append(_save(fig, out_dir / "latency_vs_concurrency.png"))

    target: str | None = next(
        (w["name"] for w in report["workloads"] if w["kind"] == "mixed"), bursts[-1]["name"] if bursts else None
    )
    fig, ax = plt.subplots(figsize=(8, 4.5))
    figures = ["ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms"]
    present = [s for s in systems if target and figure_of(results, target, s, "e2e_p50_ms") is not None]
    width = 0.8 / max(1, len(present))
    for i, system in enumerate(present):
        assert target is not None  # present is empty without a target
        values = [figure_of(results, target, system, f) or math.nan for f in figures]
        ax.bar([j + i * width for j in range(len(figures))], values, width, label=system)
    ax.set_xticks(
        [j + width * (len(present) - 1) / 2 for j in range(len(figures))],
        ["TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "E2E p50", "E2E p99"],
    )
    ax.set(yscale="log", ylabel="ms (log scale)", title=f"Latency percentiles: {target}")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    _legend(ax)
    paths.append(_save(fig, out_dir / "latency_percentiles.png"))
    return paths


def _legend(ax: Any) -> None:
    """A legend when something was plotted (every system skipped: an empty plot, and no warning)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
