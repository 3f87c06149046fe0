"""Two Ray Serve replicas on one machine, a shared-prefix workload: prefix routing against Serve's
default router, and one replica with both replicas' cache as the reference hit rate.

    python benchmarks/ray_routing.py [--requests 60] [--rate 1.0] [--rounds 2] [--out DIR]

The workload: 4 system prompts (sections of ``pydoc_data.topics``, ~``--system-chars`` characters
each) and short distinct questions, in a seeded random order, arriving as a Poisson process at
``--rate`` requests/s; each streams ``--tokens`` tokens. Each replica's prefix cache holds about
``--cache-prompts`` of the 4 system prompts (the realistic case: a cache smaller than the prompts it
serves; with room for all of them, every router misses only the first time per replica).

Systems, one after the other on a local 2-CPU Ray cluster (one CPU per replica):

* ``prefix``: ``build_app(routing="prefix")`` (the ingress and :class:`PrefixAffinityRouter`);
* ``power_of_two``: ``build_app(routing="power_of_two")`` (Serve's default router);
* ``single`` (once): one replica with both replicas' cache budget and both CPUs: the hit rate a
  router should keep (the issue's target: prefix routing's hit rate >= 90% of it).

Reported per run: prefix-cache hit rate (cached prompt tokens / prompt tokens, from each response's
``usage.prompt_tokens_details.cached_tokens``), TTFT p50/p90, and in each round the ratio of TTFT
p50s (power_of_two / prefix; target >= 1.5). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

QUESTIONS = [
    "Summarise the above in one sentence.",
    "What is the most important rule above?",
    "Give one example of the above.",
    "Which keyword is described above?",
    "Explain the above to a beginner.",
    "What error could the above raise?",
    "Name a related feature.",
    "Is the above evaluated lazily?",
]


def system_prompts(chars: int) -> list[str]:
    from pydoc_data.topics import topics

    names = ["assignment", "for", "try", "with"]
    return [f"You answer questions about this part of the Python reference.\n\n{topics[n][:chars]}" for n in names]


def workload(requests: int, rate: float, seed: int) -> list[tuple[float, int, str]]:
    """(arrival second, system prompt index, question) for each request."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(requests):
        t += rng.expovariate(rate)
        out.append((t, rng.randrange(4), f"Question {i}: {rng.choice(QUESTIONS)}"))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def load(port: int, systems: list[str], arrivals: list[tuple[float, int, str]], tokens: int) -> dict[str, Any]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    start = time.perf_counter()

    async def one(at: float, system: int, question: str) -> tuple[float, int, int]:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        sent = time.perf_counter()
        messages: Any = [{"role": "system", "content": systems[system]}, {"role": "user", "content": question}]
        stream = await client.chat.completions.create(
            model="m", messages=messages, max_tokens=tokens, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        first, prompt, cached = None, 0, 0
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - sent
            if chunk.usage is not None:
                prompt = chunk.usage.prompt_tokens
                details = chunk.usage.prompt_tokens_details
                cached = details.cached_tokens or 0 if details is not None else 0
        return first if first is not None else float("nan"), prompt, cached

    results = await asyncio.gather(*(one(*a) for a in arrivals))
    await client.close()
    ttfts = sorted(r[0] for r in results)
    prompt_tokens, cached_tokens = sum(r[1] for r in results), sum(r[2] for r in results)
    return {
        "hit_rate": cached_tokens / prompt_tokens,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p90": ttfts[int(0.9 * (len(ttfts) - 1))],
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens,
        "seconds": time.perf_counter() - start,
    }


def kv_bytes_per_token(llm: Any) -> int:
    """Keys and values per token in bfloat16 (layers x 2 x kv heads x head dim x 2 bytes)."""
    config = llm.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rate", type=float, default=1.0, help="arrivals per second (Poisson)")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--system-chars", type=int, default=1200)
    parser.add_argument("--cache-prompts", type=float, default=2.5, help="system prompts each replica's cache holds")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write results.json and lscpu.txt here")
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster on loopback
    import ray
    from ray import serve

    from async_llm.llm.huggingface import HuggingFaceLLM
    from async_llm.serve.ray import build_app

    systems = system_prompts(args.system_chars)
    with HuggingFaceLLM(device="cpu") as probe:  # the default model's tokenizer and chat template
        system_tokens = statistics.mean(len(probe.encode([{"role": "system", "content": s}])) for s in systems)
        per_token = kv_bytes_per_token(probe)
    budget = int(args.cache_prompts * system_tokens * per_token)
    print(f"system prompts: {system_tokens:.0f} tokens each; cache per replica: {budget / 2**20:.1f} MiB")

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    results: list[dict[str, Any]] = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        engine: dict[str, Any] = {"device": "cpu", "dtype": "bfloat16", "max_batch_size": 8, "model_name": "m"}

        def run(name: str, round_: int, **options: Any) -> None:
            app = build_app(None, **engine, **options)
            serve.run(app, name=name, route_prefix="/")
            arrivals = workload(args.requests, args.rate, args.seed + round_)
            figures = asyncio.run(load(port, systems, arrivals, args.tokens))
            serve.delete(name)
            figures.update(system=name, round=round_)
            results.append(figures)
            print(json.dumps(figures), flush=True)

        for round_ in range(args.rounds):
            order = ["prefix", "power_of_two"] if round_ % 2 == 0 else ["power_of_two", "prefix"]
            for routing in order:
                run(routing, round_, routing=routing, num_replicas=2, prefix_cache_bytes=budget,
                    ray_actor_options={"num_cpus": 1})  # fmt: skip
        run("single", 0, routing="power_of_two", num_replicas=1, prefix_cache_bytes=2 * budget,
            ray_actor_options={"num_cpus": 2})  # fmt: skip
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)

    single = next(r for r in results if r["system"] == "single")
    ratios, hit_ratios = [], []
    for round_ in range(args.rounds):
        by = {r["system"]: r for r in results if r["round"] == round_ and r["system"] != "single"}
        ratios.append(by["power_of_two"]["ttft_p50"] / by["prefix"]["ttft_p50"])
        hit_ratios.append(by["prefix"]["hit_rate"] / single["hit_rate"])
    summary = {
        "ttft_p50_ratio_default_over_prefix": statistics.median(ratios),
        "hit_rate_prefix_over_single": statistics.median(hit_ratios),
        "per_round_ttft_ratio": ratios,
        "system_prompt_tokens": system_tokens,
        "cache_bytes_per_replica": budget,
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"runs": results, "summary": summary, "args": vars(args)},
                                                          indent=2, default=str))  # fmt: skip
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        (args.out / "lscpu.txt").write_text(lscpu)


if __name__ == "__main__":
    main()
