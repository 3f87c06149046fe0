"""The fast decode step against the transformers step, in paired rounds on one model.

    python benchmarks/fast_path.py [--rounds 3] [--bursts 1,16,64] [--new-tokens 64] [--model PATH]

Every round runs the bursts on the plain step, then on the fast step, each in a fresh process (one
engine per process, as in a real deployment: two engines in one process would share the cores'
OpenMP pools), back to back, so each ratio compares two runs that saw the same machine. It prints
output tokens/s per run, the ratio per round, the median ratio, and whether the greedy tokens of
the two steps were identical. Run it on a quiet machine (nothing else busy).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
from typing import Any

from async_llm.bench.workloads import BURST_PROMPTS


async def _burst(llm: Any, n: int, new_tokens: int) -> tuple[float, list[list[int]]]:
    prompts = [f"Request {i}: {BURST_PROMPTS[i % len(BURST_PROMPTS)]}" for i in range(n)]
    start = time.perf_counter()
    results = await asyncio.gather(
        *(llm.acomplete(p, chat_template=False, max_tokens=new_tokens, ignore_eos=True) for p in prompts)
    )
    return n * new_tokens / (time.perf_counter() - start), [r.token_ids for r in results]


def _run(model: str | None, fast: bool, bursts: list[int], new_tokens: int) -> dict[int, tuple[float, list[list[int]]]]:
    from async_llm import HuggingFaceLLM

    async def main() -> dict[int, tuple[float, list[list[int]]]]:
        async with HuggingFaceLLM(model, fast_path=fast, max_batch_size=64) as llm:
            assert (llm.engine.runner.name == "fast") == fast
            await _burst(llm, 4, 8)  # warm-up
            return {b: await _burst(llm, b, new_tokens) for b in bursts}

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bursts", default="1,16,64")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    bursts = [int(b) for b in args.bursts.split(",")]
    ratios: dict[int, list[float]] = {b: [] for b in bursts}
    same = True
    context = multiprocessing.get_context("spawn")
    for r in range(args.rounds):
        with context.Pool(1, maxtasksperchild=1) as pool:
            plain = pool.apply(_run, (args.model, False, bursts, args.new_tokens))
        with context.Pool(1, maxtasksperchild=1) as pool:
            fast = pool.apply(_run, (args.model, True, bursts, args.new_tokens))
        for b in bursts:
            (slow_rate, slow_ids), (fast_rate, fast_ids) = plain[b], fast[b]
            same &= slow_ids == fast_ids
            ratios[b].append(fast_rate / slow_rate)
            ratio = fast_rate / slow_rate
            print(f"round {r} burst-{b}: plain {slow_rate:.1f} tok/s, fast {fast_rate:.1f} tok/s, {ratio:.2f}x")
    for b in bursts:
        spread = ", ".join(f"{x:.2f}" for x in ratios[b])
        print(f"burst-{b}: median of paired ratios {statistics.median(ratios[b]):.2f}x ({spread})")
    print(f"greedy tokens identical in every run: {same}")


if __name__ == "__main__":
    main()
