"""async_llm: asyncio-first causal language models with continuous batching and token streaming.

    from async_llm import HuggingFaceLLM

    async with HuggingFaceLLM() as llm:
        print(await llm.arun("What is the capital of France?"))
"""

from __future__ import annotations

from async_llm.base import BaseLLM
from async_llm.errors import (
    AsyncLLMError,
    EngineClosedError,
    GenerationError,
    ModelNotAvailableError,
    QueueFullError,
    RequestAbortedError,
)
from async_llm.models.huggingface import HuggingFaceLLM
from async_llm.sampling_params import SamplingParams

__all__ = [
    "AsyncLLMError",
    "BaseLLM",
    "EngineClosedError",
    "GenerationError",
    "HuggingFaceLLM",
    "ModelNotAvailableError",
    "QueueFullError",
    "RequestAbortedError",
    "SamplingParams",
]
__version__ = "0.1.0"
