"""The suite's outputs: one JSON file, one Markdown file (every figure and its ratio to async_llm,
the targets, the roofline) and PNG plots.

Ratios are always "async_llm's advantage": above 1 means async_llm is better. For throughput that is
async_llm / system; for latencies and memory it is system / async_llm. The targets are in
:mod:`.targets`, the Markdown in :mod:`.markdown`, the plots in :mod:`.plots`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from async_llm.bench.markdown import to_markdown
from async_llm.bench.metrics import FIGURES
from async_llm.bench.plots import plot
from async_llm.bench.targets import BASE, advantage, evaluate_targets

__all__ = ["build_report", "evaluate_targets", "plot", "to_markdown", "write_all"]


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


def write_all(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and the plots into ``out_dir`` (created if missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    md_path = out_dir / "results.md"
    md_path.write_text(to_markdown(report))
    plots = plot(report, out_dir)
    return {"json": json_path, "markdown": md_path, **{p.stem: p for p in plots}}
