"""One loaded model with its tokenizer and the workers serving it (the engine and the beam-search
runner), shared by every call of a :class:`~async_llm.llm.huggingface.HuggingFaceLLM`."""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from async_llm.engine.beam import BeamRunner
from async_llm.engine.config import EngineConfig
from async_llm.engine.core import Engine
from async_llm.engine.start_checks import CheckStore
from async_llm.errors import InvalidParameterError, ParameterTypeError
from async_llm.llm.controls import GrammarCompiler
from async_llm.llm.frontend import Sinks
from async_llm.loading.loading import DEFAULT_MODEL_NAME, Loaded, LoadOptions
from async_llm.param_names import QUANTIZE_MODES

T = TypeVar("T")


def _ids(value: int | Sequence[int] | None) -> set[int]:
    if value is None:
        return set()
    return {int(value)} if isinstance(value, int) else {int(v) for v in value}


class Backend:
    """One loaded model with its tokenizer and the workers serving it."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        pad_token_id: int | None,
        eos_token_id: Any,
        config: EngineConfig,
        owned: bool = False,
        checks: CheckStore | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        eos = _ids(eos_token_id)
        if not eos:
            for source in (getattr(model, "generation_config", None), model.config, tokenizer):
                eos |= _ids(getattr(source, "eos_token_id", None))
        self.eos_token_ids = frozenset(eos)
        if pad_token_id is None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
        self.pad_token_id = pad_token_id
        self.max_context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        calibration = None
        if config.quantize is not None:  # the int8 products' calibration text, in the model's tokens
            from async_llm.engine.runners.int8 import calibration_text

            calibration = list(tokenizer(calibration_text()).input_ids)
        self.engine = Engine(model, pad_token_id, config, owns_model=owned, checks=checks, calibration_ids=calibration)
        if self.engine.max_context is not None:  # the static runner's rows hold max_model_len tokens
            self.max_context = min(self.max_context or self.engine.max_context, self.engine.max_context)
        self.grammars = GrammarCompiler(tokenizer, self.engine.vocab_size)
        # A token's text and bytes, for logprobs (as OpenAI shows them: special tokens included).
        self.token_text: Callable[[int], tuple[str, list[int]]] = functools.lru_cache(maxsize=1 << 16)(self._token_text)

        self.beams = BeamRunner(model, pad_token_id, max_queue_size=config.max_queue_size)
        self.sinks = Sinks()
        self.engine.start()
        self.beams.start()

    def _token_text(self, token_id: int) -> tuple[str, list[int]]:
        text = str(self.tokenizer.decode([token_id]))
        raw = self.grammars.token_bytes(token_id)
        return text, list(raw if raw is not None else text.encode("utf-8"))

    def stats(self) -> dict[str, Any]:
        """Counters of the engine and the beam-search runner together (see ``HuggingFaceLLM.stats``)."""
        stats: dict[str, Any] = self.engine.stats()
        for key, value in self.beams.stats().items():
            if key not in ("peak_batch_size", "steps"):
                stats[key] += value
        stats["kv_cache_usage_perc"] = round(self.engine.kv_usage(), 4)
        busy = self.engine.busy_seconds
        stats["engine_tokens_per_second"] = round(self.engine.scheduler.tokens_generated / busy, 2) if busy else 0.0
        return stats

    def move_to(self, device: torch.device) -> None:
        """Move the model to ``device`` once nothing runs (blocking; new requests wait meanwhile)."""

        def move() -> None:
            self.engine.call_when_idle(lambda: self.engine.move_to(device)).result()

        self.beams.call_when_idle(move).result()  # beams pause too, so no generate runs during the move

    def close(self) -> None:
        self.engine.close()
        self.beams.close()


def quantization_for(quantize: bool | str | None, config: Any, device: torch.device) -> Any:
    """The ``quantization_config`` to load with, given the swarm_models ``quantize`` flag.

    ``quantize=True`` without a config is 4-bit nf4 with double quantization (the swarm_models
    default), computing in bfloat16 on CUDA and float32 on a CPU (where bfloat16 matmuls are slow
    or missing); False or None add nothing; ``"int8"`` is the engine's own (see
    :func:`engine_quantize`), nothing at load.

    Raises:
        TypeError: ``quantize`` is not a bool, ``"int8"`` or None.
        ValueError: ``quantize`` contradicts an explicit ``quantization_config``, or names a mode
            that does not exist.
    """
    if isinstance(quantize, str):
        engine_quantize(quantize)
        if config is not None:
            raise InvalidParameterError(
                "quantize", f"quantize={quantize!r} contradicts quantization_config (bitsandbytes): give one"
            )
        return None
    if quantize is not None and not isinstance(quantize, bool):
        raise ParameterTypeError("quantize", f"quantize must be True, False, 'int8' or None, got {quantize!r}")
    if config is None:
        if not quantize:
            return None
        compute = torch.bfloat16 if device.type == "cuda" else torch.float32
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": compute,
        }
    get = config.get if isinstance(config, dict) else functools.partial(getattr, config)
    quantizes = bool(get("load_in_4bit", False) or get("load_in_8bit", False))
    if quantize is not None and quantize != quantizes:
        raise InvalidParameterError(
            "quantize", f"quantize={quantize} contradicts quantization_config (which quantizes: {quantizes}); give one"
        )
    return config


def engine_quantize(quantize: bool | str | None) -> str | None:
    """The engine's own quantization named by ``quantize`` (``"int8"``), or None for the others
    (True: bitsandbytes at load; False, None: none).

    Raises:
        InvalidParameterError: A string that names no mode (``.param`` ``"quantize"``).
    """
    if not isinstance(quantize, str):
        return None
    if quantize not in QUANTIZE_MODES:
        choices = ", ".join(repr(m) for m in QUANTIZE_MODES)
        raise InvalidParameterError(
            "quantize", f"quantize must be True, False, None or one of {choices}, got {quantize!r}"
        )
    return quantize


def model_to_serve(
    options: LoadOptions, model_id: str | os.PathLike[str] | None, model: Any, tokenizer: Any, move: bool
) -> tuple[str, Loaded, bool]:
    """The model an LLM serves, with its id and whether the library loaded it (owns it):
    ``model_id`` loaded with ``options`` (the default model when None), or the ``model`` and
    ``tokenizer`` passed in, moved to ``options.device`` when the caller named a device (``move``).

    Raises:
        ParameterTypeError: A model without its tokenizer.
        InvalidParameterError: A device named for a model dispatched over several (``hf_device_map``).
    """
    if model is None:
        name = str(model_id) if model_id is not None else DEFAULT_MODEL_NAME
        return name, run_in_own_thread(options.load, model_id), True
    if tokenizer is None:
        raise ParameterTypeError("tokenizer", "a tokenizer is required with an explicit model")
    name = str(model_id or getattr(model.config, "_name_or_path", "") or "model")
    if move:  # an explicit device is honoured for a model passed in too
        if getattr(model, "hf_device_map", None):
            raise InvalidParameterError(
                "device", "the model is dispatched over devices (hf_device_map): pass device=None"
            )
        model = model.to(options.device)
    return name, Loaded(model, tokenizer, None), False


def run_in_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a thread of its own that ends with it (its exception re-raised here).

    Loading a model runs torch operations, and torch's OpenMP keeps a pool of worker threads for
    every thread that ran a parallel operation, for as long as that thread lives. Once OpenMP
    manages more threads than there are cores, it stops letting idle workers spin and puts them to
    sleep after each operation, and waking them costs tens of microseconds per operation: a decode
    step of a small model (hundreds of operations) runs up to ~40% slower on the engine's thread.
    A loading thread that ends takes its pool with it, so the engine's pool is the only busy one.
    (Torch work of the application's own on its threads has the same effect.)
    """
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn(*args))
        except BaseException as exc:  # noqa: BLE001  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=run, name="async-llm-load", daemon=True)  # Ctrl-C is not held up
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def drain_and_close(backend: Backend, poll: float = 0.05) -> None:
    """Close a replaced backend once its queued and running requests are done."""
    while True:
        stats = [backend.engine.stats(), backend.beams.stats()]
        if not any(s["num_running"] or s["num_waiting"] for s in stats):
            break
        time.sleep(poll)
    backend.close()
