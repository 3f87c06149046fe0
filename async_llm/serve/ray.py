"""Scale-out on Ray Serve: one engine per replica, the same OpenAI routes, behind Serve's proxy.

    import ray
    from ray import serve
    from async_llm.serve.ray import build_app

    serve.run(build_app(model_id=None, num_replicas=2))     # http://127.0.0.1:8000/v1/...

Needs the ``ray`` extra (``pip install 'async-llm[ray]'``). ``async-llm serve --ray --replicas N``
does the above from the command line.

Why these choices:

* Each replica builds its engine in ``async def __init__`` (the load runs in a worker thread, so the
  replica's event loop stays responsive) and serves the app of :func:`create_app` through Serve's
  late-bound ingress (``__serve_build_asgi_app__``), so HTTP behaves exactly as ``async-llm serve``.
* ``max_ongoing_requests`` follows the engine's batch capacity: Serve's default (5) would let at
  most 5 requests reach an engine that batches 32. Twice the batch size keeps a batch's worth
  queued inside the engine, so a freed row is refilled at the next step instead of after a round
  trip through the proxy, while Serve still balances whatever exceeds that across replicas.
* Streams send the first token at once; later deltas are paced (``stream_interval_s``) so each
  chunk through the proxy carries several tokens, as Ray's own LLM serving batches its streams.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

import anyio

try:
    from ray import serve
    from ray.serve.deployment import Application
    from ray.serve.exceptions import RayServeException
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("async_llm.serve.ray needs Ray Serve: pip install 'async-llm[ray]'") from exc

from async_llm.engine.config import DEFAULT_MAX_BATCH_SIZE
from async_llm.llm.huggingface import HuggingFaceLLM
from async_llm.log import get_logger
from async_llm.serve.openai_app import create_app
from async_llm.serve.protocol import ChatCompletionRequest, CompletionRequest
from async_llm.serve.serving import ChunkStream, OpenAIServing

__all__ = ["LLMServer", "build_app"]

log = get_logger("async_llm.serve.ray")

#: Pacing of stream chunks after the first token under Serve (see the module docstring).
DEFAULT_STREAM_INTERVAL_S = 0.02


class LLMServer:
    """One Serve replica: an engine and the OpenAI app over it.

    Besides the HTTP routes, the replica answers Python calls through a deployment handle with the
    same request bodies (dicts in OpenAI's format): ``completion``, ``chat_completion`` and their
    streaming forms ``stream_completion`` / ``stream_chat_completion`` (``handle.options(stream=True)``).

    Args:
        model_id: As for :class:`HuggingFaceLLM` (``None``: the embedded default model).
        model_name: The model id clients send (default: the engine's ``model_id``).
        api_key: Require ``Authorization: Bearer <api_key>`` on the ``/v1`` routes.
        stream_interval_s: Pacing of stream chunks after the first token.
        llm_kwargs: Keyword arguments of :class:`HuggingFaceLLM` (``max_batch_size``, ``device``...).
    """

    async def __init__(  # type: ignore[misc]  # Ray Serve awaits an async constructor
        self,
        model_id: str | None = None,
        *,
        model_name: str | None = None,
        api_key: str | None = None,
        stream_interval_s: float = DEFAULT_STREAM_INTERVAL_S,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        load = functools.partial(HuggingFaceLLM, model_id, **(llm_kwargs or {}))
        self.llm = await anyio.to_thread.run_sync(load)  # seconds of disk and CPU: off the loop
        # Not `self.app`: Serve's ingress wrapper owns that name.
        replica_id = _replica_id()
        self.openai_app = create_app(
            self.llm, model_name=model_name, api_key=api_key, owns_llm=True, server_id=replica_id,
            stream_interval_s=stream_interval_s,
        )  # fmt: skip
        self.serving: OpenAIServing = self.openai_app.state.serving
        log.info("replica ready", replica=replica_id, model=self.serving.model_name)

    async def __serve_build_asgi_app__(self) -> Any:
        """Serve's hook for a late-bound ingress: the app over this replica's engine."""
        return self.openai_app

    async def check_health(self) -> None:
        """Serve's periodic health check: a closed engine fails it and the replica is replaced."""
        if self.llm.closed:
            raise RuntimeError("the engine of this replica is closed")

    def stats(self) -> dict[str, int]:
        """The engine's counters (``HuggingFaceLLM.stats``)."""
        return self.llm.stats()

    async def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        """A ``/v1/completions`` response for ``body`` (raises :class:`APIError` or a pydantic error)."""
        return await self.serving.completion(CompletionRequest.model_validate(body))

    async def chat_completion(self, body: dict[str, Any]) -> dict[str, Any]:
        """A ``/v1/chat/completions`` response for ``body``."""
        return await self.serving.chat_completion(ChatCompletionRequest.model_validate(body))

    async def stream_completion(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The chunks of a streaming ``/v1/completions`` request, as dicts."""
        async for chunk in _drain(await self.serving.completion_stream(CompletionRequest.model_validate(body))):
            yield chunk

    async def stream_chat_completion(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The chunks of a streaming ``/v1/chat/completions`` request, as dicts."""
        request = ChatCompletionRequest.model_validate(body)
        async for chunk in _drain(await self.serving.chat_completion_stream(request)):
            yield chunk


async def _drain(chunks: ChunkStream) -> AsyncIterator[dict[str, Any]]:
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        await chunks.aclose()  # a caller that stops early (or is cancelled) aborts the request


def _replica_id() -> str | None:
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except RayServeException:  # outside a replica (plain instantiation in tests): no id to report
        return None


#: The Serve deployment (``num_replicas``, resources etc. are set by :func:`build_app`).
LLMDeployment = serve.deployment(name="AsyncLLM")(serve.ingress()(LLMServer))


def build_app(
    model_id: str | None = None,
    *,
    num_replicas: int | None = None,
    autoscaling_config: dict[str, Any] | None = None,
    max_batch_size: int | None = None,
    model_name: str | None = None,
    api_key: str | None = None,
    ray_actor_options: dict[str, Any] | None = None,
    max_queued_requests: int | None = None,
    stream_interval_s: float = DEFAULT_STREAM_INTERVAL_S,
    **llm_kwargs: Any,
) -> Application:
    """A Serve application of :class:`LLMServer` replicas, ready for ``serve.run``.

    Args:
        model_id: As for :class:`HuggingFaceLLM`; every replica loads it.
        num_replicas: Fixed number of replicas (default 1); not with ``autoscaling_config``.
        autoscaling_config: Serve's autoscaling config; ``target_ongoing_requests`` defaults to
            ``max_batch_size`` (a full batch per replica) instead of Serve's 2.
        max_batch_size: Rows of each replica's engine; ``max_ongoing_requests`` is twice that. None:
            each engine sizes its own (32 on a CPU; with the static runner, what its KV budget
            holds, up to 256), and Serve is sized for 32 rows, since the deployment's options are
            fixed before any replica has measured its budget: give a number to size both.
        model_name: The model id clients send (default: the engine's ``model_id``).
        api_key: Require ``Authorization: Bearer <api_key>`` on the ``/v1`` routes.
        ray_actor_options: Resources of each replica (default ``{"num_cpus": 1}``).
        max_queued_requests: Requests Serve queues before answering 503 (default: Serve's, unbounded).
        stream_interval_s: Pacing of stream chunks after the first token.
        **llm_kwargs: Other :class:`HuggingFaceLLM` arguments (``device``, ``dtype``, sampling defaults...).

    Returns:
        The bound application.

    Raises:
        ValueError: Both ``num_replicas`` and ``autoscaling_config``, or a size below 1.
    """
    if max_batch_size is not None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        llm_kwargs["max_batch_size"] = max_batch_size
    rows = max_batch_size if max_batch_size is not None else DEFAULT_MAX_BATCH_SIZE
    options: dict[str, Any] = {
        "max_ongoing_requests": 2 * rows,
        "ray_actor_options": ray_actor_options if ray_actor_options is not None else {"num_cpus": 1},
    }
    if autoscaling_config is not None:
        if num_replicas is not None:
            raise ValueError("pass num_replicas or autoscaling_config, not both")
        options["autoscaling_config"] = {"target_ongoing_requests": rows, **autoscaling_config}
    else:
        if num_replicas is not None and num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        options["num_replicas"] = num_replicas or 1
    if max_queued_requests is not None:
        options["max_queued_requests"] = max_queued_requests
    return LLMDeployment.options(**options).bind(
        model_id, model_name=model_name, api_key=api_key, stream_interval_s=stream_interval_s,
        llm_kwargs=llm_kwargs,
    )  # fmt: skip
