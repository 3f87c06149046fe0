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
)
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
    "SamplingParams",
    "StreamDelta",
    "TokenStream",
    "TopLogprob",
    "Usage",
]
__version__ = "0.1.0"
