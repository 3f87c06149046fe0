"""async_llm under test: :class:`~async_llm.HuggingFaceLLM` with one streaming consumer task per
request, timed per token as it reaches the consumer's event loop (``TokenStream.token_times``).

Every variant runs the engine's default runner for the device (the static runner with decode graphs
on CUDA, the fast runner on a CPU) unless ``--runner`` says otherwise, with the run's engine options
(:meth:`SystemConfig.engine_options`; where the static runner runs, slots sized to the run's longest
request, see :func:`~async_llm.bench.engine_args.engine_options`), plus the variant's own
:attr:`AsyncLLMRunner.options`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from async_llm.bench.metrics import RequestRecord
from async_llm.bench.runner import NGRAM_CONFIG, OnDone, Runner, SystemConfig, new_records
from async_llm.bench.workloads import RequestSpec

__all__ = [
    "AsyncLLMEagerRunner",
    "AsyncLLMInt8Runner",
    "AsyncLLMNgramRunner",
    "AsyncLLMInt8PythonStepRunner",
    "AsyncLLMNoPrefixCacheRunner",
    "AsyncLLMPythonStepRunner",
    "AsyncLLMRunner",
]


class AsyncLLMRunner(Runner):
    name = "async_llm"
    description = (
        "async_llm HuggingFaceLLM with the engine's default runner for the device (static with decode graphs on "
        "CUDA, fast on a CPU): continuous batching, one streaming consumer task per request"
    )
    prefill_workloads = True
    #: This variant's own ``HuggingFaceLLM`` keyword arguments, on top of the run's engine options.
    options: ClassVar[dict[str, Any]] = {}

    def load(self) -> None:
        from async_llm import HuggingFaceLLM

        self.llm = HuggingFaceLLM(
            self.config.model_path,
            device=self.config.device,
            dtype=getattr(torch, self.config.dtype),
            max_batch_size=self.config.max_batch_size,
            **{**self.config.engine_options(), **self.options},
        )

    def run(self, requests: Sequence[RequestSpec], on_done: OnDone) -> tuple[list[RequestRecord], float]:
        steps = self.llm.engine.steps
        before = self.llm.stats()
        records, start = asyncio.run(self._run(requests, on_done))
        after = self.llm.stats()
        runner = self.llm.engine.runner
        graphs = getattr(runner, "graphs", None)  # the static runner's captured decode steps (None: eager)
        self.extra = {
            "engine_steps": self.llm.engine.steps - steps,
            "peak_batch_size": after["peak_batch_size"],
            "prefill_computed_tokens": after["prefill_computed_tokens"] - before["prefill_computed_tokens"],
            "prefix_cache_hit_tokens": after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"],
            "runner": runner.name,  # what the engine chose: static, fast or transformers
            "decode_graphs": len(graphs.graphs) if graphs is not None else 0,
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


class AsyncLLMInt8Runner(AsyncLLMRunner):
    name = "async_llm-int8"
    description = (
        'async_llm with quantize="int8": the fast runner\'s layer products with int8 weights and rows quantized '
        "on the fly (CPU only; the peer of llama.cpp-q8_0)"
    )
    prefill_workloads = False
    options: ClassVar[dict[str, Any]] = {"quantize": "int8"}

    @classmethod
    def unavailable(cls, config: SystemConfig) -> str | None:
        if config.device != "cpu":
            return f'quantize="int8" runs on a CPU, not {config.device}'
        return None

    def load(self) -> None:
        super().load()
        self.llm.engine.ready.wait()
        decoder = getattr(self.llm.engine.runner, "decoder", None)
        if getattr(decoder, "quantize", None) != "int8":  # the model or the CPU cannot take it: not int8
            self.llm.close()
            raise RuntimeError("the engine runs this model unquantized: no int8 to measure")


class _PythonStep(AsyncLLMRunner):
    """A variant with the fast runner's decode layers in Python (the step before the native one, see
    ``async_llm.engine.runners.native``): what the native step saves. CPU only."""

    prefill_workloads = False

    @classmethod
    def unavailable(cls, config: SystemConfig) -> str | None:
        if config.device != "cpu":
            return f"the native decode step runs on a CPU, not {config.device}"
        return None

    def load(self) -> None:
        super().load()
        self.llm.engine.ready.wait()
        decoder = getattr(self.llm.engine.runner, "decoder", None)
        if decoder is None or not hasattr(decoder, "native"):
            self.llm.close()
            raise RuntimeError("the engine does not run the fast runner here: no native step to compare")
        decoder.native = False


class AsyncLLMPythonStepRunner(_PythonStep):
    name = "async_llm-python-step"
    description = "async_llm with the fast runner's decode layers in Python, not the native step (CPU only)"


class AsyncLLMInt8PythonStepRunner(_PythonStep, AsyncLLMInt8Runner):
    name = "async_llm-int8-python-step"
    description = 'async_llm with quantize="int8" and the decode layers in Python, not the native step (CPU only)'


class AsyncLLMNgramRunner(AsyncLLMRunner):
    name = "async_llm-ngram"
    description = (
        "async_llm with n-gram speculative decoding (speculative_config: NGRAM_CONFIG, 4 tokens drafted): "
        "drafts from each request's own context, verified in one forward"
    )
    prefill_workloads = False
    options: ClassVar[dict[str, Any]] = {"speculative_config": dict(NGRAM_CONFIG)}

    def run(self, requests: Sequence[RequestSpec], on_done: OnDone) -> tuple[list[RequestRecord], float]:
        before = self.llm.stats()
        records, start = super().run(requests, on_done)
        after = self.llm.stats()
        for key in ("spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens", "spec_decode_num_verify_steps"):
            self.extra[key] = after[key] - before[key]
        return records, start


class AsyncLLMEagerRunner(AsyncLLMRunner):
    name = "async_llm-eager"
    description = (
        "async_llm with cuda_graphs=False: the static runner on CUDA with its decode step run eagerly "
        "(what the graphs save); CUDA only"
    )
    prefill_workloads = False  # graphs change the decode step only: the bursts and the mixed workload say it
    options: ClassVar[dict[str, Any]] = {"cuda_graphs": False}

    @classmethod
    def unavailable(cls, config: SystemConfig) -> str | None:
        if not config.device.startswith("cuda"):
            return f"no CUDA graphs to turn off on {config.device}: async_llm already decodes eagerly there"
        if config.runner not in (None, "static"):
            return f"--runner {config.runner} has no decode graphs to turn off (the static runner has)"
        return None

    def load(self) -> None:
        super().load()
        if self.llm.engine.runner.name != "static":  # the model is not one the static runner serves
            runner = self.llm.engine.runner.name
            self.llm.close()
            raise RuntimeError(f"the engine runs the {runner} runner for this model: no decode graphs to turn off")
