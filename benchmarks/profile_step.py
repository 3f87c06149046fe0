"""Where async_llm's engine time goes: a workload of the suite, every stage of the step timed.

    python benchmarks/profile_step.py [--requests 16] [--tokens 64] [--model MODEL] [--threads 2]
                                      [--dtype float32|bfloat16] [--quantize int8]
    python benchmarks/profile_step.py --workload mixed --requests 60 --rate 2

Wraps the engine's stages with timers (the model forward, sampling, batch bookkeeping, per-row
updates, delivery), runs an untimed warm-up burst and then the timed workload, and prints per-stage
totals, ms per call and share of the wall time, the prefills' shapes and padding, and for a burst the
bare forward (the roofline) for the same shapes. For a sampling view of the same run:
``py-spy record -o out.svg -- python benchmarks/profile_step.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import async_llm.engine.sampler as sampler_module
from async_llm import HuggingFaceLLM
from async_llm.bench import roofline
from async_llm.bench.workloads import RequestSpec, burst_workload, mixed_workload
from async_llm.engine.output import StepOutputs

TOTALS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)
PREFILLS: list[tuple[int, int, int, float]] = []  # rows, padded width, real tokens, seconds of each prefill


def timed(name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TOTALS[name] += time.perf_counter() - start
            CALLS[name] += 1

    return wrapper


def instrument(llm: HuggingFaceLLM) -> None:
    engine = llm.engine
    model = engine.model
    forward = model.forward

    def model_forward(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1:
            return timed("model forward (decode)", forward)(*args, **kwargs)
        start = time.perf_counter()
        try:
            return timed("model forward (prefill)", forward)(*args, **kwargs)
        finally:
            mask = kwargs.get("attention_mask")
            real = int(mask.sum()) if mask is not None and mask.dim() == 2 else ids.numel()  # 4-D: packed, no padding
            PREFILLS.append((ids.shape[0], ids.shape[1], real, time.perf_counter() - start))

    model.forward = model_forward
    engine.ready.wait()  # the fast step is built as the engine starts
    if engine.runner.name == "fast":
        decoder = engine.runner.decoder  # type: ignore[attr-defined]
        step = decoder.step
        kinds = {
            name: timed(name, step) for name in ("fast decode step", "fast prefill", "fast decode step with chunks")
        }

        def fast_step(rows: Any, chunks: Any) -> Any:
            if not chunks:
                return kinds["fast decode step"](rows, chunks)
            start = time.perf_counter()
            try:
                return kinds["fast prefill" if rows is None else "fast decode step with chunks"](rows, chunks)
            finally:
                real = sum(len(c.ids) for c in chunks)  # packed: no padding
                PREFILLS.append((1, real, real, time.perf_counter() - start))

        decoder.step = fast_step  # type: ignore[method-assign]
    # (Not _iteration: it includes the idle wait for work.)
    for name in ("_step", "_run_forward", "_join", "_sample_rows", "_update", "_apply_aborts"):
        setattr(engine, name, timed(f"engine.{name}", getattr(engine, name)))
    batch = engine.batch
    for name in ("decode_inputs", "advance", "remove", "add"):
        setattr(batch, name, timed(f"batch.{name}", getattr(batch, name)))
    sampler_module.sample = timed("sampling.sample", sampler_module.sample)
    sampler_module.apply_penalties = timed("sampling.apply_penalties", sampler_module.apply_penalties)
    StepOutputs.flush = timed("StepOutputs.flush", StepOutputs.flush)


async def send(llm: HuggingFaceLLM, requests: list[RequestSpec]) -> tuple[float, list[float]]:
    """Send every request at its arrival time; returns the wall time and each time to first token."""
    start = time.perf_counter()

    async def one(spec: RequestSpec) -> float:
        await asyncio.sleep(max(0.0, start + spec.arrival - time.perf_counter()))
        sent = time.perf_counter()
        stream = await llm.submit(spec.text, max_tokens=spec.max_new_tokens, ignore_eos=True, chat_template=False)
        async with stream:
            async for _ in stream:
                pass
        assert stream.first_token_at is not None
        return stream.first_token_at - sent

    ttfts = await asyncio.gather(*(one(r) for r in requests))
    return time.perf_counter() - start, list(ttfts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("burst", "mixed"), default="burst")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per burst request")
    parser.add_argument("--rate", type=float, default=2.0, help="mixed: arrivals per second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", help="weights dtype (float32, bfloat16)")
    parser.add_argument("--quantize", default=None, help='"int8": int8 weights (see HuggingFaceLLM)')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = HuggingFaceLLM(
        args.model,
        device="cpu",
        dtype=getattr(torch, args.dtype),
        quantize=args.quantize,
        max_batch_size=max(64, args.requests),
    )
    burst = burst_workload(llm.tokenizer, args.requests, args.tokens)
    workload = burst if args.workload == "burst" else mixed_workload(llm.tokenizer, args.requests, args.rate, args.seed)
    asyncio.run(send(llm, [replace(r, max_new_tokens=4) for r in burst.requests]))  # warm-up
    if args.workload == "burst":
        pad = llm.tokenizer.pad_token_id or 0
        bare = roofline.measure(llm.engine.model, workload, pad, "cpu", repeats=2)  # before the timers go in
        print(
            f"roofline: prefill {bare['prefill_ms']:.1f} ms, decode step {bare['decode_step_ms']:.2f} ms, "
            f"{bare['output_tokens_per_s']:.1f} tok/s, total {bare['total_s']:.3f} s"
        )
    instrument(llm)
    steps0 = llm.engine.steps
    wall, ttfts = asyncio.run(send(llm, workload.requests))
    steps = llm.engine.steps - steps0
    llm.close()
    tokens = sum(r.max_new_tokens for r in workload.requests)
    print(
        f"{workload.name}, {len(workload.requests)} requests, {tokens} tokens: {wall:.3f} s wall, {steps} engine "
        f"iterations; TTFT p50/max {sorted(ttfts)[len(ttfts) // 2] * 1000:.0f}/{max(ttfts) * 1000:.0f} ms; "
        f"{tokens / wall:.1f} tok/s"
    )
    rows, width, real, secs = (sum(p[i] for p in PREFILLS) for i in range(4))
    padded = sum(p[0] * p[1] for p in PREFILLS)
    print(
        f"prefills: {len(PREFILLS)}, {rows} rows, {real} prompt tokens, {padded} padded tokens "
        f"({100 * (1 - real / max(padded, 1)):.0f}% padding), {secs:.2f} s; "
        f"longest {max(p[3] for p in PREFILLS) * 1000:.0f} ms "
        f"for [rows, width] {max(PREFILLS, key=lambda p: p[3])[:2]}"
    )
    print(f"{'stage':32s} {'calls':>6s} {'total ms':>10s} {'ms/call':>9s} {'% wall':>7s}")
    for name, total in sorted(TOTALS.items(), key=lambda kv: -kv[1]):
        print(
            f"{name:32s} {CALLS[name]:6d} {total * 1000:10.1f} {total / CALLS[name] * 1000:9.3f} "
            f"{100 * total / wall:6.1f}%"
        )


if __name__ == "__main__":
    main()
