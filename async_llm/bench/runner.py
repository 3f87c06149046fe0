"""What every system under test is: a :class:`Runner` built from a :class:`SystemConfig`, and the
helpers the runners share (the model loaded the same way for all, the records of one run).

``runner.run(requests, on_done)`` sends every :class:`RequestSpec` at its arrival time (offset from the
start of the run), waits for all of them, and returns one :class:`RequestRecord` per request (token
timestamps as the consumer sees them) plus the run's start time. ``on_done(1)`` is called as each
request finishes (the progress bar).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from async_llm.bench.metrics import RequestRecord
from async_llm.bench.workloads import RequestSpec

__all__ = ["NGRAM_CONFIG", "OnDone", "Runner", "SystemConfig", "load_hf", "new_records", "pad_id", "sleep_until"]

OnDone = Callable[[int], None]


#: The n-gram speculation that async_llm-ngram and its peer vllm-cpu-ngram run (vLLM's keys and
#: meanings, async_llm's defaults). async_llm's steps of more than ``disable_by_batch_size`` rows (2
#: by default) decode plainly; vLLM 0.32 has no such key (it speculates at every batch size).
NGRAM_CONFIG: dict[str, Any] = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_max": 4,
    "prompt_lookup_min": 2,
}


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
    #: The GGUF files llama.cpp runs: the default model as shipped (Q4_1), its F32 copy and a Q8_0 one.
    gguf_q4: str | None = None
    gguf_f32: str | None = None
    gguf_q8: str | None = None
    #: The async_llm systems' engine options (``HuggingFaceLLM`` keyword arguments of the same
    #: names); None leaves the library's default, which depends on the device (see :meth:`engine_options`).
    runner: str | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    kv_cache_bytes: int | None = None

    def engine_options(self) -> dict[str, Any]:
        """The engine options that were set, as ``HuggingFaceLLM`` keyword arguments (none set: ``{}``,
        so the engine picks its runner and budget for the device as a user's default call would)."""
        names = ("runner", "max_model_len", "gpu_memory_utilization", "kv_cache_bytes")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def sleep_until(deadline: float) -> None:
    """Sleep until ``time.perf_counter()`` reaches ``deadline`` (at once if it has)."""
    delay = deadline - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def new_records(requests: Sequence[RequestSpec], start: float) -> list[RequestRecord]:
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
    """The tokenizer's pad token, else the model's (first) eos token, else 0."""
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
