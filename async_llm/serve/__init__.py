"""Serving: an OpenAI-compatible HTTP server over one engine, and scale-out on Ray Serve.

    from async_llm import HuggingFaceLLM
    from async_llm.serve import create_app

    app = create_app(HuggingFaceLLM(), owns_llm=True)   # any ASGI server; `async-llm serve` uses uvicorn

:mod:`async_llm.serve.ray` (the ``ray`` extra) runs the same app on Ray Serve replicas.
"""

from __future__ import annotations

from async_llm.serve.errors import APIError
from async_llm.serve.openai_app import create_app
from async_llm.serve.serving import ChunkStream, OpenAIServing

__all__ = ["APIError", "ChunkStream", "OpenAIServing", "create_app"]
