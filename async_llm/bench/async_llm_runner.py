"""async_llm under test: :class:`~async_llm.HuggingFaceLLM` with one streaming consumer task per
request, timed per token as it reaches the consumer's event loop (``TokenStream.token_times``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from async_llm.bench.metrics import RequestRecord
from async_llm.bench.runner import OnDone, Runner, new_records
from async_llm.bench.workloads import RequestSpec

__all__ = ["AsyncLLMNoPrefixCacheRunner", "AsyncLLMRunner"]


class AsyncLLMRunner(Runner):
    name = "async_llm"
    description = "async_llm HuggingFaceLLM: continuous batching, one streaming consumer task per request"
    prefill_workloads = True
    options: ClassVar[dict[str, Any]] = {}

    def load(self) -> None:
        from async_llm import HuggingFaceLLM

        self.llm = HuggingFaceLLM(
            self.config.model_path,
            device=self.config.device,
            dtype=getattr(torch, self.config.dtype),
            max_batch_size=self.config.max_batch_size,
            **self.options,
        )

    def run(self, requests: Sequence[RequestSpec], on_done: OnDone) -> tuple[list[RequestRecord], float]:
        steps = self.llm.engine.steps
        before = self.llm.stats()
        records, start = asyncio.run(self._run(requests, on_done))
        after = self.llm.stats()
        self.extra = {
            "engine_steps": self.llm.engine.steps - steps,
            "peak_batch_size": after["peak_batch_size"],
            "prefill_computed_tokens": after["prefill_computed_tokens"] - before["prefill_computed_tokens"],
            "prefix_cache_hit_tokens": after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"],
        }
        return records, start

    async def _run(self, requests: Sequence[RequestSpec], on_done: OnDone) -> tuple[list[RequestRecord], float]:
        start = time.perf_counter()
        records = new_records(requests, start)
        finished = {spec.index: asyncio.Event() for spec in requests}
        await asyncio.gather(*(self._one(spec, record, on_done, finished) for spec, record in zip(requests, records)))
        return records, start

    async def _one(
        self, spec: RequestSpec, record: RequestRecord, on_done: OnDone, finished: dict[int, asyncio.Event]
    ) -> None:
        if spec.after is not None:  # the previous turn first; then `arrival` counts from its end
            await finished[spec.after].wait()
            record.arrival = time.perf_counter() + spec.arrival
        await asyncio.sleep(max(0.0, record.arrival - time.perf_counter()))
        stream = await self.llm.submit(spec.text, max_tokens=spec.max_new_tokens, ignore_eos=True, chat_template=False)
        if tuple(stream.prompt_token_ids) != spec.prompt_ids:
            raise RuntimeError(f"request {spec.index}: async_llm tokenized the prompt differently from the workload")
        async with stream:
            async for _delta in stream:
                pass
        # Each token when it reached this loop, as the other systems time theirs: a token with no
        # text of its own (a special token) is not held up until the next token's text.
        record.token_times = list(stream.token_times)
        finished[spec.index].set()
        on_done(1)

    def close(self) -> None:
        self.llm.close()


class AsyncLLMNoPrefixCacheRunner(AsyncLLMRunner):
    name = "async_llm-no-prefix-cache"
    description = "async_llm with prefix_cache=False (the prefill workloads only: what the cache saves)"
    prefill_only = True
    options: ClassVar[dict[str, Any]] = {"prefix_cache": False}
