"""async_llm: asyncio-first causal language models with continuous batching and token streaming.

    from async_llm import HuggingFaceLLM

    async with HuggingFaceLLM() as llm:
        print(await llm.arun("What is the capital of France?"))

Layout: ``llm/`` is what users call (:class:`BaseLLM`, :class:`HuggingFaceLLM`), ``engine/`` the
worker threads that batch and decode (it knows request ids and an output sink, nothing of the
callers), ``loading/`` model files, ``serve/`` the OpenAI-compatible server, ``bench/`` the
benchmark suite. See ARCHITECTURE.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from async_llm.errors import (
    AsyncLLMError,
    ContextLengthError,
    EngineClosedError,
    GenerationError,
    InvalidParameterError,
    ModelNotAvailableError,
    ParameterError,
    ParameterTypeError,
    QueueFullError,
    RequestAbortedError,
    RequestTimeoutError,
)

if TYPE_CHECKING:
    from async_llm.llm.base import BaseLLM
    from async_llm.llm.huggingface import HuggingFaceLLM
    from async_llm.outputs import (
        Completion,
        FinishReason,
        Logprob,
        RequestStream,
        StreamDelta,
        TokenStream,
        TopLogprob,
        Usage,
    )
    from async_llm.sampling_params import SamplingParams

# The API's classes load torch and transformers (seconds): they are imported on first use, so that
# `import async_llm.errors` or the CLI's `--help` stays instant.
_LAZY = {
    "BaseLLM": "async_llm.llm.base",
    "HuggingFaceLLM": "async_llm.llm.huggingface",
    "Completion": "async_llm.outputs",
    "FinishReason": "async_llm.outputs",
    "Logprob": "async_llm.outputs",
    "RequestStream": "async_llm.outputs",
    "StreamDelta": "async_llm.outputs",
    "TokenStream": "async_llm.outputs",
    "TopLogprob": "async_llm.outputs",
    "Usage": "async_llm.outputs",
    "SamplingParams": "async_llm.sampling_params",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'async_llm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AsyncLLMError",
    "BaseLLM",
    "Completion",
    "ContextLengthError",
    "EngineClosedError",
    "FinishReason",
    "GenerationError",
    "HuggingFaceLLM",
    "InvalidParameterError",
    "Logprob",
    "ModelNotAvailableError",
    "ParameterError",
    "ParameterTypeError",
    "QueueFullError",
    "RequestAbortedError",
    "RequestStream",
    "RequestTimeoutError",
    "SamplingParams",
    "StreamDelta",
    "TokenStream",
    "TopLogprob",
    "Usage",
]
__version__ = "0.1.0"
