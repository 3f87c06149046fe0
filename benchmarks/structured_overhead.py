"""What structured output and logprobs cost: tokens/s of 16 concurrent requests, constrained or not.

    python benchmarks/structured_overhead.py [--model MODEL] [--streams 16] [--tokens 128] [--rounds 3]

Each round runs, back to back on one engine, ``--streams`` concurrent requests of ``--tokens`` tokens:

- ``plain``: unconstrained (greedy, eos ignored);
- ``json_schema``: every request constrained by a JSON schema whose shortest valid answer is longer
  than ``--tokens`` (an array of at least 512 short strings), so every request runs its full length and
  only the grammar differs;
- ``top_logprobs_5``: unconstrained, with ``logprobs=True, top_logprobs=5``;
- ``mixed``: half the requests JSON-schema, half plain.

tokens/s = generated tokens / wall time. The ratios against ``plain`` are taken per round (the
machine's speed drifts between rounds) and their median is reported. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from async_llm import HuggingFaceLLM

PROMPTS = [
    "List the things you see in a kitchen.", "Name every colour you know.", "List cities in Europe.",
    "Name some animals.", "List programming languages.", "Name fruits and vegetables.",
    "List musical instruments.", "Name rivers of the world.",
]  # fmt: skip
LONG_LIST = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 512}},
    "required": ["items"],
    "additionalProperties": False,
}


async def run(llm: HuggingFaceLLM, streams: int, tokens: int, kinds: list[dict[str, Any]]) -> float:
    """Generated tokens per second of ``streams`` concurrent requests (request ``i`` takes ``kinds[i % k]``)."""
    base = {"max_tokens": tokens, "ignore_eos": True}
    start = time.perf_counter()
    results = await asyncio.gather(
        *(llm.acomplete(PROMPTS[i % len(PROMPTS)], **base, **kinds[i % len(kinds)]) for i in range(streams))
    )
    wall = time.perf_counter() - start
    for result in results:
        assert len(result.token_ids) == tokens, "a request ended early: the comparison would be unfair"
    return sum(len(r.token_ids) for r in results) / wall


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cases: dict[str, list[dict[str, Any]]] = {
        "plain": [{}],
        "json_schema": [{"guided_json": LONG_LIST}],
        "top_logprobs_5": [{"logprobs": True, "top_logprobs": 5}],
        "mixed": [{"guided_json": LONG_LIST}, {}],
    }
    rates: dict[str, list[float]] = {name: [] for name in cases}
    ratios: dict[str, list[float]] = {name: [] for name in cases if name != "plain"}
    async with HuggingFaceLLM(args.model, max_batch_size=max(32, args.streams)) as llm:
        await run(llm, args.streams, 8, [{"guided_json": LONG_LIST}, {"logprobs": True, "top_logprobs": 5}])  # warm-up
        for _ in range(args.rounds):
            plain_rate = 0.0
            for name, kinds in cases.items():
                rate = await run(llm, args.streams, args.tokens, kinds)
                rates[name].append(rate)
                if name == "plain":
                    plain_rate = rate
                else:
                    ratios[name].append(rate / plain_rate)
    print(
        json.dumps(
            {
                "streams": args.streams,
                "tokens": args.tokens,
                "rounds": args.rounds,
                "tokens_per_s_median": {k: round(statistics.median(v), 1) for k, v in rates.items()},
                "ratio_to_plain_median": {k: round(statistics.median(v), 3) for k, v in ratios.items()},
                "ratios_per_round": {k: [round(x, 3) for x in v] for k, v in ratios.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
