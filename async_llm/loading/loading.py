"""Loading a transformers causal LM: model ids, devices, dtypes, bitsandbytes and accelerate.

Loads show no progress bars (see :mod:`async_llm.loading.quiet`), and a model loaded from files
comes with the store of its start-up check verdicts (see :mod:`async_llm.loading.check_cache`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import inspect
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from packaging.version import Version
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from async_llm.errors import AsyncLLMError
from async_llm.loading.check_cache import CheckCache, folder_identity
from async_llm.loading.paths import check_model_id
from async_llm.loading.quiet import quiet_progress
from async_llm.log import get_logger

log = get_logger("async_llm.loading")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# bitsandbytes gained a CPU backend for 8-bit and 4-bit in 0.45.
_BNB_CPU_SINCE = Version("0.45.0")
# from_pretrained keywords that read the model from somewhere other than the folder's top level.
_ELSEWHERE = frozenset({"subfolder", "gguf_file", "state_dict"})


class UnsupportedConfigurationError(AsyncLLMError, ValueError):
    """A loading option that cannot work here (checked before anything is loaded)."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` picks CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedConfigurationError("device 'cuda' was asked for but CUDA is not available")
    return device


def resolve_model_path(model_id: str | os.PathLike[str] | None) -> str:
    """Map ``model_id`` to what ``from_pretrained`` loads: the default model, a GGUF file (converted
    once into a cached folder), a local folder, or a hub id (returned unchanged).

    Raises:
        ModelNotAvailableError: the default model is not installed (the message says how to).
        ModelNotFoundError: ``model_id`` names no model (see :func:`~async_llm.loading.paths.check_model_id`).
    """
    if model_id is None:
        from async_llm.loading.default import default_model_path

        return str(default_model_path())
    check_model_id(model_id)
    path = Path(model_id).expanduser()
    if path.suffix.lower() == ".gguf":
        from async_llm.loading.gguf import convert_gguf

        return str(convert_gguf(path))
    return str(path) if path.exists() else str(model_id)


def model_folder(path: str, revision: str | None = None) -> Path | None:
    """The local folder ``from_pretrained`` read for ``path``: the folder itself, or a hub id's
    snapshot of ``revision`` in the hub cache (None when it is not there)."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(path, "config.json", revision=revision)
    return Path(config).parent if isinstance(config, str) else None


def quantization(config: BitsAndBytesConfig | dict[str, Any] | None, device: torch.device) -> BitsAndBytesConfig | None:
    """Validate a bitsandbytes config for ``device`` before loading anything.

    Raises:
        TypeError: Neither a ``BitsAndBytesConfig`` nor a dict (or a dict with unknown keys).
        UnsupportedConfigurationError: bitsandbytes is missing, too old for the CPU, or the device
            type has no bitsandbytes backend.
    """
    if config is None:
        return None
    if isinstance(config, dict):
        # BitsAndBytesConfig accepts (and ignores) unknown keys: a typo would silently not quantize.
        known = set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise TypeError(f"unknown quantization_config keys {unknown}; BitsAndBytesConfig takes {sorted(known)}")
        config = BitsAndBytesConfig(**config)
    if not isinstance(config, BitsAndBytesConfig):
        raise TypeError(f"quantization_config must be a BitsAndBytesConfig or a dict, got {type(config).__name__}")
    if not (config.load_in_8bit or config.load_in_4bit):
        raise UnsupportedConfigurationError("quantization_config must set load_in_8bit or load_in_4bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UnsupportedConfigurationError("quantization_config needs bitsandbytes: pip install bitsandbytes")
    if device.type == "cpu" and Version(importlib.metadata.version("bitsandbytes")) < _BNB_CPU_SINCE:
        raise UnsupportedConfigurationError(f"bitsandbytes >= {_BNB_CPU_SINCE} is needed to quantize on the CPU")
    if device.type not in ("cpu", "cuda"):
        raise UnsupportedConfigurationError(f"bitsandbytes quantization does not run on {device.type!r} devices")
    return config


class _OncePerMessage(logging.Filter):
    """Lets each distinct message through once (bitsandbytes warns on every 8-bit matmul call)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self._seen:
            return False
        self._seen.add(message)
        return True


_BNB_MATMUL_LOGGER = logging.getLogger("bitsandbytes.autograd._functions")
if not any(isinstance(f, _OncePerMessage) for f in _BNB_MATMUL_LOGGER.filters):
    _BNB_MATMUL_LOGGER.addFilter(_OncePerMessage())


@functools.cache
def cpu_dtype() -> torch.dtype:
    """The dtype a CPU runs a model fastest in (see :meth:`LoadOptions.resolved_dtype`), said once."""
    from async_llm.engine.runners.fast_linear import cpu_flags, onednn_bf16

    dtype = torch.bfloat16 if onednn_bf16() else torch.float32
    flags = sorted({"avx512_bf16", "amx_bf16"} & cpu_flags())
    log.info("CPU weights dtype chosen", dtype=str(dtype).removeprefix("torch."), bf16_flags=flags or None)
    return dtype


class Loaded(NamedTuple):
    """A loaded model, its tokenizer, and where the engine keeps its start-up check verdicts (None:
    check every time)."""

    model: Any
    tokenizer: Any
    checks: CheckCache | None


@dataclass
class LoadOptions:
    """Everything that decides how a model is loaded (kept to load another one the same way)."""

    device: torch.device
    dtype: torch.dtype | str | None = None
    quantization_config: BitsAndBytesConfig | None = None
    device_map: str | dict[str, Any] | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def load(self, model_id: str | os.PathLike[str] | None) -> Loaded:
        """Load the model, in eval mode, on the device (or dispatched by accelerate), its tokenizer
        and the store of its start-up check verdicts."""
        path = resolve_model_path(model_id)
        kwargs = dict(self.model_kwargs)
        dtype = self.resolved_dtype()
        if dtype is not None:
            kwargs["dtype"] = dtype
        if self.quantization_config is not None:
            kwargs["quantization_config"] = self.quantization_config
            # Quantized weights can't be moved after loading: place them while loading.
            kwargs.setdefault("device_map", self.device_map or {"": str(self.device)})
        elif self.device_map is not None:
            kwargs["device_map"] = self.device_map  # accelerate dispatch ("auto", "balanced", a dict)
        with quiet_progress():
            tokenizer = AutoTokenizer.from_pretrained(path)
            model: Any = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if "device_map" not in kwargs:
            model = model.to(self.device)
        return Loaded(model.eval(), tokenizer, self._check_store(path))

    def _check_store(self, path: str) -> CheckCache | None:
        """Where the engine keeps this model's start-up check verdicts, or None to always check:
        when the files are unknown, or an option makes a model the files alone do not describe
        (quantized or dispatched weights, model keyword arguments that are not plain values)."""
        kwargs = self.model_kwargs
        if self.quantization_config is not None or self.device_map is not None or _ELSEWHERE & set(kwargs):
            return None
        if not all(v is None or isinstance(v, (str, int, float, bool)) for v in kwargs.values()):
            return None
        revision = kwargs.get("revision")
        folder = model_folder(path, revision if isinstance(revision, str) else None)
        identity = folder_identity(folder) if folder is not None else None
        if identity is None:
            return None
        return CheckCache({"files": identity, "model_kwargs": kwargs, "dtype": str(self.resolved_dtype())})

    def resolved_dtype(self) -> torch.dtype | str | None:
        """The dtype the weights load in: the one given (None: the checkpoint's). ``"auto"`` on a
        CPU is the CPU's fastest, whatever the checkpoint's: bfloat16 if the CPU multiplies it in
        hardware (AVX512-BF16, AMX: about three times float32's rate through oneDNN), float32 if
        not (there bf16 is emulated, at half float32's speed); elsewhere ``"auto"`` is the
        checkpoint's, as transformers reads it.

        Not the default on a CPU yet: bfloat16 logits have 8 bits of precision, and on the default
        model a greedy answer can turn on a tie they create (measured: the fp32 logits of
        "The" and "L'" after "What is the capital of France?" are 0.08 apart at 25, where bf16
        steps by 0.125)."""
        if self.dtype != "auto" or self.device.type != "cpu":
            return self.dtype
        if self.quantization_config is not None or self.device_map is not None:
            return self.dtype  # bitsandbytes and accelerate place and type the weights themselves
        return cpu_dtype()
