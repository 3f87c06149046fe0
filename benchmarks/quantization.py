"""bitsandbytes modes against fp32 on the default model: load time, memory and tokens/s, one run.

    python benchmarks/quantization.py [--model MODEL] [--tokens 48] [--requests 8]

For each mode: the load time (from the cached converted folder), the weights' memory footprint,
the tokens/s of one request alone and of `--requests` concurrent requests (greedy, eos ignored),
and whether the greedy answer to a fixed question still contains the expected word.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import torch
from transformers import BitsAndBytesConfig

from async_llm import HuggingFaceLLM

MODES = {
    "fp32": None,
    "8bit": BitsAndBytesConfig(load_in_8bit=True),
    "4bit-fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "4bit-nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
}


async def measure(model: str | None, name: str, config: BitsAndBytesConfig | None, tokens: int, requests: int) -> dict:
    start = time.perf_counter()
    llm = HuggingFaceLLM(model, device="cpu", quantization_config=config, max_batch_size=requests)
    load = time.perf_counter() - start
    try:
        answer = await llm.arun("What is the capital of France?", max_tokens=16)
        start = time.perf_counter()
        await llm.arun("Write a short poem about the sea.", max_tokens=tokens, ignore_eos=True)
        alone = tokens / (time.perf_counter() - start)
        start = time.perf_counter()
        await llm.abatch_run(
            [f"Tell me fact number {i} about the sea." for i in range(requests)], max_tokens=tokens, ignore_eos=True
        )
        together = requests * tokens / (time.perf_counter() - start)
        return {
            "mode": name,
            "load_s": round(load, 2),
            "weights_mib": round(llm.model.get_memory_footprint() / 2**20),
            "tok_s_alone": round(alone, 1),
            f"tok_s_{requests}_concurrent": round(together, 1),
            "answers_paris": "Paris" in answer,
        }
    finally:
        await llm.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--requests", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    rows = [await measure(args.model, name, config, args.tokens, args.requests) for name, config in MODES.items()]
    fp32 = rows[0]
    for row in rows:
        row["speed_vs_fp32_alone"] = round(row["tok_s_alone"] / fp32["tok_s_alone"], 2)
        print(json.dumps(row))


if __name__ == "__main__":
    asyncio.run(main())
