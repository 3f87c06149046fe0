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
* Requests that share a prompt prefix go to the same replica, so its prefix cache keeps working
  (``routing="prefix"``, the default): Serve's proxy routes before reading a body, so a small
  ingress deployment reads it and relays the request to an engine replica through a handle whose
  router sees the prompt (:mod:`async_llm.serve.ray_router`). ``routing="power_of_two"`` serves the
  engine replicas behind Serve's proxy directly, with Serve's default router.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, MutableMapping
from typing import Any, Literal

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
from async_llm.serve.limits import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES
from async_llm.serve.openai_app import create_app
from async_llm.serve.prefix_affinity import PrefixAffinity
from async_llm.serve.protocol import ChatCompletionRequest, CompletionRequest
from async_llm.serve.ray_router import LLMIngress, PrefixAffinityRouter, RelayedRequest
from async_llm.serve.serving import ChunkStream, OpenAIServing

__all__ = ["LLMIngress", "LLMServer", "PrefixAffinityRouter", "build_app"]

log = get_logger("async_llm.serve.ray")

#: Pacing of stream chunks after the first token under Serve (see the module docstring).
DEFAULT_STREAM_INTERVAL_S = 0.02

#: Requests the relaying ingress holds at once; it only forwards bytes, the engines do the queueing.
INGRESS_MAX_ONGOING_REQUESTS = 4096

Routing = Literal["prefix", "power_of_two"]
ROUTINGS: tuple[Routing, ...] = ("prefix", "power_of_two")


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
        max_body_bytes: Larger request bodies get 413.
        body_timeout_s: A request body must arrive within this many seconds, or it gets 408.
    """

    async def __init__(  # type: ignore[misc]  # Ray Serve awaits an async constructor
        self,
        model_id: str | None = None,
        *,
        model_name: str | None = None,
        api_key: str | None = None,
        stream_interval_s: float = DEFAULT_STREAM_INTERVAL_S,
        llm_kwargs: dict[str, Any] | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    ) -> None:
        load = functools.partial(HuggingFaceLLM, model_id, **(llm_kwargs or {}))
        self.llm = await anyio.to_thread.run_sync(load)  # seconds of disk and CPU: off the loop
        # Not `self.app`: Serve's ingress wrapper owns that name.
        replica_id = _replica_id()
        self.openai_app = create_app(
            self.llm, model_name=model_name, api_key=api_key, owns_llm=True, server_id=replica_id,
            stream_interval_s=stream_interval_s, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s,
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

    async def relay(self, request: RelayedRequest) -> AsyncIterator[dict[str, Any]]:
        """Run one HTTP request relayed by :class:`LLMIngress` through this replica's app.

        Yields the app's ASGI messages (response start, then body chunks) as they are sent.
        Closing or cancelling the stream (the client left) cancels the app, which aborts the
        request and frees its row.
        """
        messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await asyncio.Event().wait()  # no disconnect comes this way: leaving cancels the app
            raise AssertionError("unreachable")

        async def send(message: MutableMapping[str, Any]) -> None:
            messages.put_nowait(dict(message))

        async def run() -> None:
            try:
                await self.openai_app(dict(request.scope), receive, send)
            finally:
                messages.put_nowait(None)

        task = asyncio.create_task(run())
        try:
            while (message := await messages.get()) is not None:
                yield message
            await task  # an app that raised after its last message still reports it
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


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


class _RelayedLLMServer(LLMServer):
    """An engine replica behind :class:`LLMIngress` (an application has one ingress, so this one is
    not; it closes its engine when Serve stops it, as the ingress form's app shutdown does)."""

    def __del__(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()


#: The engine replicas behind the relaying ingress with ``routing="prefix"``.
RelayedLLMDeployment = serve.deployment(name="AsyncLLM")(_RelayedLLMServer)

#: The relaying ingress in front of the engines with ``routing="prefix"``.
IngressDeployment = serve.deployment(name="AsyncLLMIngress")(serve.ingress()(LLMIngress))


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
    routing: Routing = "prefix",
    router_kwargs: dict[str, Any] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
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
        routing: ``"prefix"`` (default): an ingress deployment relays each request to the engine
            replica that was sent its prompt's prefix before, unless that replica's queue is
            longer than the shortest by more than ``imbalance_threshold`` (default: a batch,
            ``max_batch_size``), when the least loaded replica takes it (:class:`PrefixAffinityRouter`).
            ``"power_of_two"``: the engine replicas are the ingress, routed by Serve's default router.
        router_kwargs: Options of :class:`~async_llm.serve.prefix_affinity.PrefixAffinity`
            (``imbalance_threshold``, ``match_fraction``, ``match_blocks``, ``block_chars``,
            ``max_blocks``, ``max_blocks_per_replica``).
        max_body_bytes: Larger request bodies get 413 (at the ingress with ``routing="prefix"``).
        body_timeout_s: A request body must arrive within this many seconds, or it gets 408.
        **llm_kwargs: Other :class:`HuggingFaceLLM` arguments (``device``, ``dtype``, sampling defaults...).

    Returns:
        The bound application.

    Raises:
        ValueError: Both ``num_replicas`` and ``autoscaling_config``, a size below 1, an unknown
            ``routing``, or ``router_kwargs`` with ``routing="power_of_two"`` or with a bad value.
    """
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
    if router_kwargs and routing != "prefix":
        raise ValueError("router_kwargs configure routing='prefix' only")
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
    if routing == "prefix":
        kwargs = {"imbalance_threshold": rows, **(router_kwargs or {})}
        PrefixAffinity(**kwargs)  # bad values fail here, not in every replica's router
        options["request_router_config"] = {
            "request_router_class": f"{PrefixAffinityRouter.__module__}.{PrefixAffinityRouter.__qualname__}",
            "request_router_kwargs": kwargs,
        }
    deployment = LLMDeployment if routing == "power_of_two" else RelayedLLMDeployment
    engines = deployment.options(**options).bind(
        model_id, model_name=model_name, api_key=api_key, stream_interval_s=stream_interval_s,
        llm_kwargs=llm_kwargs, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s,
    )  # fmt: skip
    if routing == "power_of_two":
        return engines
    return IngressDeployment.options(
        num_replicas=1, max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS, ray_actor_options={"num_cpus": 0},
    ).bind(engines, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s)  # fmt: skip
