"""n-gram speculative decoding against the same engine without it, on the default model: the
grounded requests (answers that copy their prompt) one at a time and two together, and open-ended
bursts of 1 and 2, for several draft lengths. The measurement behind the defaults of
``speculative_config`` (``num_speculative_tokens`` 4, ``disable_by_batch_size`` 2).

    python benchmarks/speculation.py [--dtype float32] [--k 0,4,6,8] [--disable-by-batch-size 2]

Each line: tokens/s per workload, and its ratio to ``k = 0`` (no speculation), in one process, one
configuration after the other (run it on a quiet machine; its speed drifts over minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import torch
from transformers import AutoTokenizer

from async_llm import HuggingFaceLLM
from async_llm.bench.workloads import GROUNDED_NEW_TOKENS, burst_workload, grounded_workload
from async_llm.loading.default import default_model_path


async def _rate(llm: HuggingFaceLLM, requests: Any, tokens: int) -> float:
    start = time.perf_counter()
    await asyncio.gather(
        *(llm.acomplete(r.text, chat_template=False, max_tokens=tokens, ignore_eos=True) for r in requests)
    )
    return len(requests) * tokens / (time.perf_counter() - start)


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--k", default="0,4,6,8", help="draft lengths; 0: no speculation (the baseline)")
    parser.add_argument("--disable-by-batch-size", type=int, default=2)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    grounded = grounded_workload(tokenizer, 4).requests
    base: dict[str, float] | None = None
    for k in (int(v) for v in args.k.split(",")):
        spec = None
        if k:
            spec = {"method": "ngram", "num_speculative_tokens": k, "disable_by_batch_size": args.disable_by_batch_size}
        async with HuggingFaceLLM(device="cpu", dtype=getattr(torch, args.dtype), speculative_config=spec) as llm:
            await llm.arun("hi", max_tokens=4)
            rates = {
                "grounded-1": sum([await _rate(llm, [r], GROUNDED_NEW_TOKENS) for r in grounded]) / len(grounded),
                "grounded-2": await _rate(llm, grounded[:2], GROUNDED_NEW_TOKENS),
                "burst-1": await _rate(llm, burst_workload(tokenizer, 1, 64).requests, 64),
                "burst-2": await _rate(llm, burst_workload(tokenizer, 2, 64).requests, 64),
            }
            stats = llm.stats()
        base = base or rates
        ratios = {name: round(rates[name] / base[name], 2) for name in rates}
        accepted = f"{stats['spec_decode_num_accepted_tokens']}/{stats['spec_decode_num_draft_tokens']} accepted"
        print(f"k={k}", {name: round(v, 1) for name, v in rates.items()}, ratios, accepted, flush=True)


if __name__ == "__main__":
    asyncio.run(main())
