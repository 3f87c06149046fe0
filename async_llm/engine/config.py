"""The engine's options, checked once: :class:`EngineConfig` travels unchanged from the front end
(``HuggingFaceLLM``) to the engine, the beam runner and the scheduler."""

from __future__ import annotations

from dataclasses import dataclass

from async_llm.errors import InvalidParameterError, ParameterTypeError


def _check_int(name: str, value: object, low: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParameterTypeError(name, f"{name} must be an int >= {low}, got {value!r}")
    if value < low:
        raise InvalidParameterError(name, f"{name} must be an int >= {low}, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches, schedules and runs the model.

    Args:
        max_batch_size: Most rows decoded together.
        max_queue_size: Most requests waiting for a row; a submit past it raises
            :class:`~async_llm.errors.QueueFullError`.
        max_prefill_tokens: Most prompt tokens prefilled in one step while no row decodes.
        seed: Seed of the engine's generator, used by sampled requests that have no seed of their own.
        prefill_overhead_tokens: The fixed cost of one forward, in tokens of compute: prompts
            admitted together are split into prefill batches by length when the padding saved is
            worth more than the extra forwards. None: 48 on CPU and 512 elsewhere, the time of one
            forward at no tokens divided by the time of one more token, measured with
            ``benchmarks/profile_step.py`` on the default model and rounded up (erring toward fewer
            forwards: on an accelerator, kernel launches dominate a small forward).
        fast_path: Run the model with the fast runner where it applies (checked on the model when
            the engine starts); otherwise, or when False, the transformers runner.
        prefix_cache: Keep the keys and values of prompts and finished requests in blocks, and start
            later prompts that share a prefix with them after it. Off by itself for models where a
            prefill after a prefix would not be exact (one log line says why).
        prefix_cache_bytes: The cache's budget; least recently used blocks are evicted past it.
            None: a share of the device's memory (see ``model_api.default_prefix_cache_bytes``).
        prefill_chunk_tokens: Most prompt tokens prefilled in one step while rows are decoding
            (chunked prefill). None: measured (see :class:`~async_llm.engine.scheduler.ChunkBudget`).

    Raises:
        ParameterTypeError, InvalidParameterError: An option has the wrong type or range (``.param``
            names it).
    """

    max_batch_size: int = 32
    max_queue_size: int = 1024
    max_prefill_tokens: int = 8192
    seed: int | None = None
    prefill_overhead_tokens: int | None = None
    fast_path: bool = True
    prefix_cache: bool = True
    prefix_cache_bytes: int | None = None
    prefill_chunk_tokens: int | None = None

    def __post_init__(self) -> None:
        _check_int("max_batch_size", self.max_batch_size, 1)
        _check_int("max_queue_size", self.max_queue_size, 1)
        _check_int("max_prefill_tokens", self.max_prefill_tokens, 1)
        _check_int("seed", self.seed, 0, optional=True)
        _check_int("prefill_overhead_tokens", self.prefill_overhead_tokens, 0, optional=True)
        _check_int("prefix_cache_bytes", self.prefix_cache_bytes, 0, optional=True)
        _check_int("prefill_chunk_tokens", self.prefill_chunk_tokens, 1, optional=True)
        for name in ("fast_path", "prefix_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ParameterTypeError(name, f"{name} must be True or False, got {getattr(self, name)!r}")
