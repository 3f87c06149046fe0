"""N concurrent `arun` calls against N sequential `model.generate` calls, same model and prompts, one run.

    python benchmarks/concurrency.py [--model MODEL] [--requests 16] [--tokens 64]

Each request generates exactly `--tokens` new tokens (eos ignored on both sides), greedy. Prints a
JSON line with tokens/s for both and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import torch

from async_llm import HuggingFaceLLM
from async_llm.bench.workloads import BURST_PROMPTS

PROMPTS = list(BURST_PROMPTS)  # the suite's burst prompt set


def sequential_generate(llm: HuggingFaceLLM, prompt_ids: list[list[int]], tokens: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for ids in prompt_ids:
            x = torch.tensor([ids], device=llm.device)
            out = llm.model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=llm.engine.pad_token_id,
            )
            assert out.shape[1] - x.shape[1] == tokens
    return time.perf_counter() - start


async def concurrent_arun(llm: HuggingFaceLLM, prompts: list[str], tokens: int) -> float:
    start = time.perf_counter()
    results = await asyncio.gather(*(llm.acomplete(p, max_tokens=tokens, ignore_eos=True) for p in prompts))
    assert all(len(r.token_ids) == tokens for r in results)
    return time.perf_counter() - start


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    async with HuggingFaceLLM(args.model, device=args.device, max_batch_size=max(args.requests, 1)) as llm:
        prompt_ids = [llm.encode(p) for p in prompts]
        await concurrent_arun(llm, prompts[:2], 4)  # warm-up
        sequential_generate(llm, prompt_ids[:1], 4)
        seq = sequential_generate(llm, prompt_ids, args.tokens)
        conc = await concurrent_arun(llm, prompts, args.tokens)
        total = args.requests * args.tokens
        print(
            json.dumps(
                {
                    "requests": args.requests,
                    "tokens_each": args.tokens,
                    "torch_threads": torch.get_num_threads(),
                    "sequential_generate_tok_s": round(total / seq, 1),
                    "async_llm_concurrent_tok_s": round(total / conc, 1),
                    "ratio": round(seq / conc, 2),
                    "peak_batch_size": llm.stats()["peak_batch_size"],
                }
            )
        )


if __name__ == "__main__":
    asyncio.run(main())
