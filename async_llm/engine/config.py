"""The engine's options, checked once: :class:`EngineConfig` travels unchanged from the front end
(``HuggingFaceLLM``) to the engine, the beam runner and the scheduler."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from async_llm.errors import InvalidParameterError, ParameterTypeError
from async_llm.param_names import QUANTIZE_MODES

if TYPE_CHECKING:  # torch is imported where the engine runs, not where options are parsed (the CLI)
    import torch

    from async_llm.engine.speculative import SpeculativeConfig

#: The model runners a caller may ask for (``EngineConfig.runner``); None picks one.
RUNNERS = ("static", "fast", "transformers")

#: How waiting requests are ordered (``EngineConfig.scheduling_policy``).
SCHEDULING_POLICIES = ("fcfs", "priority")

#: Rows decoded together when ``max_batch_size`` is None and a CPU runner (fast, transformers) runs.
DEFAULT_MAX_BATCH_SIZE = 32

#: ``max_queue_tokens`` by default with the static runner: this many turns of a full KV store.
QUEUE_TURNS = 8


def _check_int(name: str, value: object, low: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParameterTypeError(name, f"{name} must be an int >= {low}, got {value!r}")
    if value < low:
        raise InvalidParameterError(name, f"{name} must be an int >= {low}, got {value!r}")


def _check_fraction(name: str, value: object) -> None:
    """None, or a real number in (0, 1]."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParameterTypeError(name, f"{name} must be a number in (0, 1], got {value!r}")
    if math.isnan(value) or not 0 < value <= 1:
        raise InvalidParameterError(name, f"{name} must be a number in (0, 1], got {value!r}")


def check_quantize(quantize: str | None, device: torch.device) -> None:
    """Refuse an engine quantization the device cannot run.

    Raises:
        InvalidParameterError: ``quantize`` is ``"int8"`` and ``device`` is not a CPU (``.param``
            ``"quantize"``; on CUDA, bitsandbytes' 8-bit weights serve instead).
    """
    if quantize is not None and device.type != "cpu":
        raise InvalidParameterError(
            "quantize",
            f"quantize={quantize!r} runs on a CPU, but the model runs on {device}; on CUDA, use "
            "quantization_config=BitsAndBytesConfig(load_in_8bit=True)",
        )


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches, schedules and runs the model.

    Args:
        max_batch_size: Most rows decoded together. None: 32 with the CPU runners (fast,
            transformers); with the static runner, as many rows of ``max_model_len`` tokens as the
            KV budget holds, up to 256 (see :func:`~async_llm.engine.kv_budget.plan_slots`). Given
            with the static runner, a budget that holds fewer rows raises at start.
        max_queue_size: Most requests waiting for a row; a submit past it raises
            :class:`~async_llm.errors.QueueFullError`.
        max_queue_tokens: Most tokens (each request's prompt plus ``max_tokens``) of the requests
            waiting for a row; a submit past it raises :class:`~async_llm.errors.QueueFullError`,
            and a request that alone needs more is refused (``max_tokens``). Sheds load by what it
            will cost, not by count. None: 8 times the KV store's tokens with the static runner
            (the queue drains in about 8 turns of a full store), no token bound with the others.
        max_prefill_tokens: Most prompt tokens prefilled in one step while no row decodes.
        seed: Seed of the engine's generator, used by sampled requests that have no seed of their own.
        prefill_overhead_tokens: The fixed cost of one forward, in tokens of compute: prompts
            admitted together are split into prefill batches by length when the padding saved is
            worth more than the extra forwards. None: 48 on CPU and 512 elsewhere, the time of one
            forward at no tokens divided by the time of one more token, measured with
            ``benchmarks/profile_step.py`` on the default model and rounded up (erring toward fewer
            forwards: on an accelerator, kernel launches dominate a small forward).
        fast_path: Run the model with the fast runner where it applies (checked on the model when
            the engine starts); otherwise, or when False, the transformers runner. False is the
            same as ``runner="transformers"`` (and contradicts any other ``runner``).
        prefix_cache: Keep the keys and values of prompts and finished requests in blocks, and start
            later prompts that share a prefix with them after it. Off by itself for models where a
            prefill after a prefix would not be exact (one log line says why).
        prefix_cache_bytes: The cache's budget; least recently used blocks are evicted past it.
            None: a share of the device's memory (see ``model_api.default_prefix_cache_bytes``).
        prefill_chunk_tokens: Most prompt tokens prefilled in one step while rows are decoding
            (chunked prefill). None: measured (see :class:`~async_llm.engine.scheduler.ChunkBudget`).
        runner: The model runner: ``"static"`` (a KV store preallocated once from a memory budget
            and split into one fixed slot per row, decode captured as CUDA graphs; made for CUDA),
            ``"fast"`` (the fused CPU step; Llama-family models that pass its start-up check),
            ``"transformers"`` (the model's own forward; any model). None: the static runner on
            CUDA, the fast runner on a CPU where the model is supported, else transformers.
        max_model_len: The longest context (prompt plus generated tokens) one row may hold under
            the static runner. None: the model's ``max_position_embeddings`` capped at 8192: every
            slot costs ``max_model_len`` tokens of keys and values whether its request uses them or
            not, so a model's full 128k context would leave room for a handful of rows. Larger than
            the model's ``max_position_embeddings`` raises at start.
        gpu_memory_utilization: The share of the device's total memory the process may use for
            weights, the KV store and activations together (vLLM's meaning): the static runner's KV
            store gets what is left of it after the memory already in use. None: 0.9 on CUDA (0.5
            of the system's memory on a CPU). A number in (0, 1].
        kv_cache_bytes: The static runner's KV store size, given outright instead of derived from
            ``gpu_memory_utilization`` (not with it).
        cuda_graphs: Capture the static runner's decode step as CUDA graphs (one per bucketed batch
            size). None: on where the device is CUDA; True on another device raises.
        overlap: Launch each decode step before handling the previous one's tokens, so the CPU's
            work on step t (detokenizing, stop strings, delivery) runs while the device computes
            step t+1. A row that ends at step t has then computed step t+1 as well: that token is
            dropped, never delivered. Steps with prompt chunks, or with rows that need their
            tokens before the next step (grammars and other token controls, logprobs), run one
            at a time. None: on with the static runner on CUDA (on a CPU both halves share the
            cores, and nothing is gained).
        quantize: ``"int8"``: the fast runner's layer products with int8 weights (per output
            channel, symmetric) and rows quantized on the fly, on a CPU (see
            ``async_llm.engine.runners.int8``); None: the model's dtype. A model the fast runner
            cannot take runs unquantized, with one log line.
        scheduling_policy: ``"fcfs"`` (first come, first served; the default) or ``"priority"``:
            waiting requests go by ``priority`` (lower first), then arrival, a waiting request
            gaining one level per ``AGEING_SECONDS`` waited; a request that waits for a row while a
            running one has a larger (less urgent) ``priority`` preempts it (see
            ``async_llm.engine.scheduler``).
        speculative_config: n-gram speculative decoding for every request that does not say
            otherwise (vLLM's keys: ``{"method": "ngram", "num_speculative_tokens": 4,
            "prompt_lookup_max": 4, "prompt_lookup_min": 2, "disable_by_batch_size": 2}``; see
            ``async_llm.engine.speculative``); kept as a ``SpeculativeConfig``. None: off.

    Raises:
        ParameterTypeError, InvalidParameterError: An option has the wrong type or range, or two
            contradict each other (``.param`` names the one at fault).
    """

    max_batch_size: int | None = None
    max_queue_size: int = 1024
    max_queue_tokens: int | None = None
    max_prefill_tokens: int = 8192
    seed: int | None = None
    prefill_overhead_tokens: int | None = None
    fast_path: bool = True
    prefix_cache: bool = True
    prefix_cache_bytes: int | None = None
    prefill_chunk_tokens: int | None = None
    runner: str | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    kv_cache_bytes: int | None = None
    cuda_graphs: bool | None = None
    overlap: bool | None = None
    quantize: str | None = None
    speculative_config: SpeculativeConfig | Mapping[str, Any] | None = None
    scheduling_policy: str = "fcfs"

    def __post_init__(self) -> None:
        _check_int("max_batch_size", self.max_batch_size, 1, optional=True)
        _check_int("max_queue_size", self.max_queue_size, 1)
        _check_int("max_queue_tokens", self.max_queue_tokens, 1, optional=True)
        _check_int("max_prefill_tokens", self.max_prefill_tokens, 1)
        _check_int("seed", self.seed, 0, optional=True)
        _check_int("prefill_overhead_tokens", self.prefill_overhead_tokens, 0, optional=True)
        _check_int("prefix_cache_bytes", self.prefix_cache_bytes, 0, optional=True)
        _check_int("prefill_chunk_tokens", self.prefill_chunk_tokens, 1, optional=True)
        _check_int("max_model_len", self.max_model_len, 1, optional=True)
        _check_int("kv_cache_bytes", self.kv_cache_bytes, 1, optional=True)
        _check_fraction("gpu_memory_utilization", self.gpu_memory_utilization)
        for name in ("fast_path", "prefix_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ParameterTypeError(name, f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("cuda_graphs", "overlap"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ParameterTypeError(name, f"{name} must be True, False or None, got {value!r}")
        self._check_runner()
        if not isinstance(self.scheduling_policy, str):
            raise ParameterTypeError(
                "scheduling_policy", f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}"
            )
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise InvalidParameterError(
                "scheduling_policy", f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}"
            )
        from async_llm.engine.speculative import SpeculativeConfig

        object.__setattr__(self, "speculative_config", SpeculativeConfig.parse(self.speculative_config))
        if self.quantize is not None:
            if not isinstance(self.quantize, str):
                raise ParameterTypeError("quantize", f"quantize must be 'int8' or None, got {self.quantize!r}")
            if self.quantize not in QUANTIZE_MODES:
                raise InvalidParameterError("quantize", f"quantize must be 'int8' or None, got {self.quantize!r}")
            if self.requested_runner == "transformers":
                raise InvalidParameterError(
                    "quantize",
                    f"quantize={self.quantize!r} runs on the fast runner; it contradicts "
                    f"{'fast_path=False' if not self.fast_path else 'runner=' + repr(self.runner)}",
                )
        if self.kv_cache_bytes is not None and self.gpu_memory_utilization is not None:
            raise InvalidParameterError(
                "kv_cache_bytes",
                f"kv_cache_bytes={self.kv_cache_bytes} sets the KV store's size outright and "
                f"gpu_memory_utilization={self.gpu_memory_utilization} derives it: give one, not both",
            )

    def _check_runner(self) -> None:
        choices = ", ".join(repr(r) for r in RUNNERS)
        if self.runner is None:
            return
        if not isinstance(self.runner, str):
            raise ParameterTypeError("runner", f"runner must be one of {choices} or None, got {self.runner!r}")
        if self.runner not in RUNNERS:
            raise InvalidParameterError("runner", f"runner must be one of {choices} or None, got {self.runner!r}")
        if not self.fast_path and self.runner != "transformers":
            raise InvalidParameterError(
                "runner",
                f"runner={self.runner!r} contradicts fast_path=False (the transformers runner): give one",
            )

    @property
    def speculation(self) -> SpeculativeConfig | None:
        """``speculative_config`` as parsed (a :class:`SpeculativeConfig`, or None: off)."""
        from async_llm.engine.speculative import SpeculativeConfig

        config = self.speculative_config
        assert config is None or isinstance(config, SpeculativeConfig), "parsed on construction"
        return config

    @property
    def requested_runner(self) -> str | None:
        """The runner asked for, ``fast_path=False`` read as ``"transformers"``; None: the engine picks."""
        return "transformers" if not self.fast_path else self.runner
