"""Soak: a steady mixed load for a given time, sampled into a CSV and a PNG.

    python -m tests.stress.soak [--minutes 30] [--interval 10] [--clients 12] [--model MODEL]
                                [--out benchmarks/results/soak]

Every client loops forever over random requests: greedy or sampled, 8..96 new tokens, some with
stop strings or penalties, one in ten abandoned after its first delta. Every ``--interval``
seconds a row is written: elapsed seconds, RSS, running, waiting, tokens/s over the interval, and
totals. At the end: a PNG of RSS, tokens/s and running/waiting over time, and a JSON summary with
the RSS growth after warm-up (the first tenth of the run, at least one interval).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gc
import json
import random
import time
from pathlib import Path
from typing import Any

import psutil

from async_llm import HuggingFaceLLM

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Explain how a bicycle works.",
    "List five fruits.",
    "Tell me a joke about computers.",
    "What is 12 times 7?",
    "Describe the ocean at night.",
    "Give me three tips for learning Python.",
]


async def _client(llm: HuggingFaceLLM, rng: random.Random, stop: asyncio.Event) -> None:
    while not stop.is_set():
        params: dict[str, Any] = {"max_tokens": rng.randint(8, 96)}
        if rng.random() < 0.5:
            params.update(temperature=rng.uniform(0.3, 1.2), top_p=rng.uniform(0.5, 1.0), seed=rng.randint(0, 10**6))
        if rng.random() < 0.2:
            params["stop"] = [rng.choice([".", "\n", " the"])]
        if rng.random() < 0.2:
            params["repetition_penalty"] = rng.uniform(1.0, 1.5)
        abandon = rng.random() < 0.1  # its consumer walks away after the first delta
        stream = await llm.submit(rng.choice(PROMPTS), **params)
        async with stream:
            async for _ in stream:
                if abandon:
                    break  # the engine must free the row


async def run_soak(
    llm: HuggingFaceLLM, seconds: float, interval: float, clients: int, out: Path, seed: int = 0
) -> dict[str, Any]:
    """Run the load for ``seconds``; write ``soak.csv``, ``soak.png`` and ``soak.json`` into ``out``."""
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    rng = random.Random(seed)
    process = psutil.Process()
    stop = asyncio.Event()
    workers = [asyncio.ensure_future(_client(llm, random.Random(rng.random()), stop)) for _ in range(clients)]
    rows: list[dict[str, float]] = []
    csv_path = out / "soak.csv"
    start = time.perf_counter()
    last_tokens, last_time = llm.stats()["tokens_generated"], start
    try:
        while (now := time.perf_counter()) - start < seconds:
            await asyncio.sleep(min(interval, max(0.0, seconds - (now - start))))
            gc.collect()
            stats, now = llm.stats(), time.perf_counter()
            row = {
                "elapsed_s": round(now - start, 2),
                "rss_mib": round(process.memory_info().rss / 2**20, 2),
                "running": stats["num_running"],
                "waiting": stats["num_waiting"],
                "tokens_per_s": round((stats["tokens_generated"] - last_tokens) / (now - last_time), 2),
                "finished": stats["num_finished"],
                "aborted": stats["num_aborted"],
                "failed": stats["num_failed"],
            }
            rows.append(row)
            _append_row(csv_path, row)  # written as sampled: a crash keeps everything up to here
            last_tokens, last_time = stats["tokens_generated"], now
    finally:
        stop.set()
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    warm = max(1, len(rows) // 10)
    base, final = rows[warm - 1]["rss_mib"], rows[-1]["rss_mib"]
    summary = {
        "seconds": round(rows[-1]["elapsed_s"], 1),
        "samples": len(rows),
        "clients": clients,
        "rss_after_warmup_mib": base,
        "rss_final_mib": final,
        "rss_peak_mib": max(r["rss_mib"] for r in rows),
        "rss_growth_after_warmup": round((final - base) / base, 4),
        "mean_tokens_per_s": round(sum(r["tokens_per_s"] for r in rows) / len(rows), 1),
        "finished": rows[-1]["finished"],
        "aborted": rows[-1]["aborted"],
        "failed": rows[-1]["failed"],
    }
    await asyncio.to_thread(_write_summary, out / "soak.json", summary)
    _plot(rows, out / "soak.png", summary)
    return summary


def _write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))


def _append_row(path: Path, row: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _plot(rows: list[dict[str, float]], path: Path, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [r["elapsed_s"] / 60 for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(minutes, [r["rss_mib"] for r in rows])
    axes[0].set_ylabel("RSS (MiB)")
    axes[0].set_title(
        f"soak: {summary['clients']} clients, RSS growth after warm-up {summary['rss_growth_after_warmup']:.2%}"
    )
    axes[1].plot(minutes, [r["tokens_per_s"] for r in rows], color="tab:green")
    axes[1].set_ylabel("tokens/s")
    axes[2].plot(minutes, [r["running"] for r in rows], label="running")
    axes[2].plot(minutes, [r["waiting"] for r in rows], label="waiting")
    axes[2].set_ylabel("requests")
    axes[2].set_xlabel("minutes")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak"))
    args = parser.parse_args()
    async with HuggingFaceLLM(args.model, max_batch_size=max(args.clients, 1)) as llm:
        summary = await run_soak(llm, args.minutes * 60, args.interval, args.clients, args.out)
    print(json.dumps(summary))


if __name__ == "__main__":
    asyncio.run(main())
