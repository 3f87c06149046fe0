"""What the serving layers cost: HTTP (uvicorn + FastAPI) and Ray Serve against the engine called directly.

    python benchmarks/serving_overhead.py [--model MODEL] [--requests 30] [--tokens 16]
                                          [--streams 16] [--stream-tokens 64] [--no-ray]

1. Latency: ``--requests`` sequential non-streaming completions of ``--tokens`` tokens each (greedy,
   eos ignored), alternating direct ``llm.acomplete`` and ``POST /v1/completions`` so drift hits
   both alike; the added latency is the difference of the medians, and the median of the
   pairwise differences (``*_added_paired_ms``, steadier when other work shares the machine).
2. Throughput: ``--streams`` concurrent streaming HTTP clients against as many direct ``astream``
   calls, ``--stream-tokens`` each; tokens/s = all tokens / wall time.
3. Ray Serve (unless ``--no-ray``; needs the ``ray`` extra): the same two measurements through
   Serve's HTTP proxy to one replica on a local cluster on loopback (the replica reserves all the
   CPUs, so it gets as many torch threads as the direct engine), again interleaved with direct
   calls; only one of the two engines computes at any time.

The HTTP client (httpx) runs in this process; on a small machine it shares the CPU with the server,
as any client on the same host would. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
from typing import Any

import httpx
import torch

from async_llm import HuggingFaceLLM
from async_llm.serve import create_app
from async_llm.serve.server import running_server

PROMPT = "Explain continuous batching in one paragraph."
PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain continuous batching.",
    "List three uses of a paperclip.", "Why is the sky blue?", "Translate 'good morning' into Spanish.",
    "Give me a short recipe for pancakes.", "What is 17 times 23?",
]  # fmt: skip


async def http_complete(http: httpx.AsyncClient, base: str, tokens: int) -> float:
    body = {"prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True, "temperature": 0}
    start = time.perf_counter()
    response = await http.post(f"{base}/v1/completions", json=body)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    assert response.json()["usage"]["completion_tokens"] == tokens
    return elapsed


async def direct_complete(llm: HuggingFaceLLM, tokens: int) -> float:
    start = time.perf_counter()
    result = await llm.acomplete(PROMPT, chat_template=False, max_tokens=tokens, ignore_eos=True, temperature=0)
    assert len(result.token_ids) == tokens
    return time.perf_counter() - start


async def http_streams(http: httpx.AsyncClient, base: str, n: int, tokens: int) -> float:
    async def one(prompt: str) -> None:
        body = {"prompt": prompt, "max_tokens": tokens, "ignore_eos": True, "stream": True, "temperature": 0}
        async with http.stream("POST", f"{base}/v1/completions", json=body) as response:
            response.raise_for_status()
            async for _ in response.aiter_lines():
                pass

    start = time.perf_counter()
    await asyncio.gather(*(one(PROMPTS[i % len(PROMPTS)]) for i in range(n)))
    return n * tokens / (time.perf_counter() - start)


async def direct_streams(llm: HuggingFaceLLM, n: int, tokens: int) -> float:
    async def one(prompt: str) -> None:
        async for _ in llm.astream(prompt, chat_template=False, max_tokens=tokens, ignore_eos=True, temperature=0):
            pass

    start = time.perf_counter()
    await asyncio.gather(*(one(PROMPTS[i % len(PROMPTS)]) for i in range(n)))
    return n * tokens / (time.perf_counter() - start)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


async def compare(llm: HuggingFaceLLM, base: str, args: argparse.Namespace, label: str) -> dict[str, Any]:
    """Latency and streaming throughput through ``base`` against ``llm`` called directly, interleaved."""
    async with httpx.AsyncClient(timeout=120) as http:
        for _ in range(3):  # warm-up: first calls pay for allocations and lazy imports
            await direct_complete(llm, args.tokens)
            await http_complete(http, base, args.tokens)
        direct, served = [], []
        for _ in range(args.requests):  # alternate, so load from elsewhere hits both alike
            direct.append(await direct_complete(llm, args.tokens))
            served.append(await http_complete(http, base, args.tokens))
        direct_tps = await direct_streams(llm, args.streams, args.stream_tokens)
        served_tps = await http_streams(http, base, args.streams, args.stream_tokens)
    d, h = statistics.median(direct), statistics.median(served)
    # The median of the pairwise differences resists drift (other load) better than the medians' difference.
    paired = statistics.median(x - y for x, y in zip(served, direct, strict=True))
    return {
        f"{label}_direct_median_ms": ms(d), f"{label}_median_ms": ms(h), f"{label}_added_ms": ms(h - d),
        f"{label}_added_paired_ms": ms(paired),
        f"{label}_direct_astream_tok_s": round(direct_tps, 1), f"{label}_stream_tok_s": round(served_tps, 1),
        f"{label}_stream_ratio": round(served_tps / direct_tps, 3),
    }  # fmt: skip


async def measure_http(llm: HuggingFaceLLM, args: argparse.Namespace) -> dict[str, Any]:
    async with running_server(create_app(llm)) as base:
        return await compare(llm, base, args, "http")


def measure_ray(llm: HuggingFaceLLM, args: argparse.Namespace) -> dict[str, Any]:
    """One replica on a local cluster; the direct engine stays idle while the replica computes."""
    # Loopback only, no telemetry, no token files: set before Ray is imported.
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    import ray
    from ray import serve

    from async_llm.serve.ray import build_app

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cpus = os.cpu_count() or 2  # the replica gets as many torch threads as the direct engine
    ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(args.model, max_batch_size=max(args.streams, 1), ray_actor_options={"num_cpus": cpus})
        serve.run(app, name="bench", route_prefix="/")
        return asyncio.run(compare(llm, f"http://127.0.0.1:{port}", args, "ray"))
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--stream-tokens", type=int, default=64)
    parser.add_argument("--no-ray", dest="ray", action="store_false")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "requests": args.requests, "tokens": args.tokens, "streams": args.streams,
        "stream_tokens": args.stream_tokens, "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    # One direct engine for both parts: its streams may live on any event loop (one per asyncio.run).
    llm = HuggingFaceLLM(args.model, max_batch_size=max(args.streams, 1))
    try:
        result.update(asyncio.run(measure_http(llm, args)))
        if args.ray:
            result.update(measure_ray(llm, args))
    finally:
        llm.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
