"""The fast runner in bfloat16 against float32 (and the transformers forward in bfloat16, the
path bf16 took before the fast runner had it), in paired rounds on the default model.

    python benchmarks/cpu_dtype.py [--rounds 2] [--bursts 1,16,64] [--new-tokens 64] [--model PATH]

Every round runs each system in a fresh process, back to back, so each ratio compares runs that
saw the same machine; it prints output tokens/s per run, each system's ratio to float32 per round,
the medians, and the CPU's model and bf16 flags (bf16 is fast only where the CPU multiplies it in
hardware: AVX512-BF16, AMX). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import platform
import statistics
import time
from typing import Any

from async_llm.bench.workloads import BURST_PROMPTS

SYSTEMS: dict[str, dict[str, Any]] = {
    "fast-fp32": {"dtype": "float32"},
    "fast-bf16": {"dtype": "bfloat16"},
    "transformers-bf16": {"dtype": "bfloat16", "fast_path": False},
}


async def _burst(llm: Any, n: int, new_tokens: int) -> float:
    prompts = [f"Request {i}: {BURST_PROMPTS[i % len(BURST_PROMPTS)]}" for i in range(n)]
    start = time.perf_counter()
    await asyncio.gather(
        *(llm.acomplete(p, chat_template=False, max_tokens=new_tokens, ignore_eos=True) for p in prompts)
    )
    return n * new_tokens / (time.perf_counter() - start)


def _run(model: str | None, options: dict[str, Any], bursts: list[int], new_tokens: int) -> dict[str, Any]:
    import torch

    from async_llm import HuggingFaceLLM

    async def main() -> dict[str, Any]:
        kwargs = {**options, "dtype": getattr(torch, options["dtype"])}
        async with HuggingFaceLLM(model, device="cpu", max_batch_size=64, **kwargs) as llm:
            llm.engine.ready.wait()
            await _burst(llm, 4, 8)  # warm-up
            return {"runner": llm.engine.runner.name, **{str(b): await _burst(llm, b, new_tokens) for b in bursts}}

    return asyncio.run(main())


def _cpu() -> str:
    from async_llm.engine.runners.fast_linear import cpu_flags

    with open("/proc/cpuinfo") as info:
        model = next((line.split(":", 1)[1].strip() for line in info if "model name" in line), platform.processor())
    flags = sorted({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"} & cpu_flags())
    return f"{model}; {' '.join(flags)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bursts", default="1,16,64")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    bursts = [int(b) for b in args.bursts.split(",")]
    print("cpu:", _cpu())
    ratios: dict[str, dict[int, list[float]]] = {name: {b: [] for b in bursts} for name in SYSTEMS}
    context = multiprocessing.get_context("spawn")
    for round_ in range(args.rounds):
        results = {}
        for name, options in SYSTEMS.items():
            with context.Pool(1) as pool:
                results[name] = pool.apply(_run, (args.model, options, bursts, args.new_tokens))
            cells = " ".join(f"{results[name][str(b)]:7.1f}" for b in bursts)
            print(f"round {round_} {name:18s} ({results[name]['runner']}) tok/s at {bursts}: {cells}")
        for name in SYSTEMS:
            for b in bursts:
                ratios[name][b].append(results[name][str(b)] / results["fast-fp32"][str(b)])
    for name in SYSTEMS:
        cells = " ".join(f"{statistics.median(ratios[name][b]):.2f}x" for b in bursts)
        print(f"median ratio to fast-fp32, {name:18s} at {bursts}: {cells}")


if __name__ == "__main__":
    main()
