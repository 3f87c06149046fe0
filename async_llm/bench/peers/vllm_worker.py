"""vLLM (its CPU build) as a benchmark peer: ``AsyncLLM`` in its default compiled configuration.

    VLLM_PYTHON vllm_worker.py '{"model": FOLDER, "dtype": "float32", "max_num_seqs": 64, "max_model_len": 1024}'

(and ``"speculative_config"``, vLLM's, where given: the n-gram peer).

Greedy, ``ignore_eos``, exactly ``max_new_tokens`` per request, token-id prompts, each request sent at
its arrival time; one timestamp per streamed token.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from _worker_io import Done, RunFn, serve


def load(config: dict[str, Any]) -> RunFn:
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=config["model"],
        dtype=config.get("dtype", "float32"),
        max_num_seqs=config.get("max_num_seqs", 64),
        max_model_len=config.get("max_model_len", 1024),
        seed=0,
        disable_log_stats=True,
        speculative_config=config.get("speculative_config"),
    )
    loop = asyncio.new_event_loop()
    engine = loop.run_until_complete(_make(AsyncLLM, args))
    ids = itertools.count()

    async def one(spec: dict[str, Any], start: float, done: Done, finished: dict[int, asyncio.Event]) -> None:
        sent = None
        if spec.get("after") is not None:  # the previous turn first; then `arrival` counts from its end
            await finished[spec["after"]].wait()
            sent = time.perf_counter() + spec["arrival"]
        await asyncio.sleep(max(0.0, (sent or start + spec["arrival"]) - time.perf_counter()))
        n = spec["max_new_tokens"]
        params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
        times: list[float] = []
        seen = 0
        prompt = {"prompt_token_ids": list(spec["prompt_ids"])}
        async for output in engine.generate(prompt, params, request_id=f"req-{next(ids)}"):
            count = len(output.outputs[0].token_ids)
            now = time.perf_counter()
            times.extend([now] * (count - seen))
            seen = count
        finished[spec["index"]].set()
        done(spec["index"], times, sent)

    def run(start: float, requests: list[dict[str, Any]], done: Done) -> None:
        async def all_of_them() -> None:
            finished = {spec["index"]: asyncio.Event() for spec in requests}
            await asyncio.gather(*(one(spec, start, done, finished) for spec in requests))

        loop.run_until_complete(all_of_them())

    return run


async def _make(cls: Any, args: Any) -> Any:
    return cls.from_engine_args(args)


if __name__ == "__main__":
    serve(load)
