"""Prefix-affinity routing on Ray Serve: a request router, and the ingress that lets it see prompts.

Serve's HTTP proxy routes a request before its body is read, so no router behind the proxy can see
the prompt. :func:`async_llm.serve.ray.build_app` therefore puts a small ingress deployment in
front of the engine replicas (as Ray's own LLM serving does): :class:`LLMIngress` reads the body,
and relays the whole HTTP request, as a :class:`RelayedRequest`, to an engine replica through a
deployment handle; the replica runs it through the same OpenAI app as ``async-llm serve`` and
streams the ASGI messages back. The handle routes with :class:`PrefixAffinityRouter`, which sees
the request's ``prompt``/``messages`` and applies :class:`~async_llm.serve.prefix_affinity.PrefixAffinity`.

:class:`RelayedRequest` carries ``prompt`` or ``messages`` as attributes, the shape Ray Serve's own
``PrefixCacheAffinityRouter`` reads too, so that router can be named instead
(``build_app(request_router_class=...)``). Python callers of the replica's handle methods
(``completion(body)``...) are routed by their body dicts in the same way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

try:
    from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
    from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("async_llm.serve.ray_router needs Ray Serve: pip install 'async-llm[ray]'") from exc

from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from async_llm.log import get_logger
from async_llm.serve.errors import APIError
from async_llm.serve.limits import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, BodyLimits
from async_llm.serve.prefix_affinity import PrefixAffinity, routing_text
from async_llm.serve.responses import response_server

__all__ = ["LLMIngress", "PrefixAffinityRouter", "RelayedRequest"]

log = get_logger("async_llm.serve.ray")

#: Scope entries a relayed request keeps (the rest belong to the ingress's server).
_SCOPE_KEYS = (
    "type", "http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string", "headers",
    "client", "server",
)  # fmt: skip


@dataclass
class RelayedRequest:
    """One HTTP request on its way from the ingress to an engine replica.

    Attributes:
        scope: The request's ASGI scope (the picklable part).
        body: The whole request body.
        prompt: The body's ``prompt`` (completions), for routers that match prefixes.
        messages: The body's ``messages`` (chat completions), likewise.
        routing: The body's prompt fields (tools, instructions, input...) for :func:`routing_text`.
    """

    scope: dict[str, Any]
    body: bytes = b""
    prompt: Any = None
    messages: Any = None
    routing: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_http(cls, scope: Scope, body: bytes) -> RelayedRequest:
        """The request of ``scope`` with ``body``; prompt fields are read when it is a JSON object."""
        kept = {key: scope[key] for key in _SCOPE_KEYS if key in scope}
        kept["asgi"] = {"version": "3.0", "spec_version": "2.3"}
        fields: dict[str, Any] = {}
        if body:
            try:
                parsed = json.loads(body)
            except ValueError:  # the replica's app answers a malformed body with its own 400
                parsed = None
            if isinstance(parsed, dict):
                names = ("prompt", "messages", "input", "instructions", "tools", "previous_response_id")
                fields = {name: parsed[name] for name in names if name in parsed}
        return cls(kept, body, fields.get("prompt"), fields.get("messages"), fields)


def _relayed_fields(arg: Any) -> Mapping[str, Any] | None:
    """A relayed request's prompt fields. Duck-typed, not ``isinstance``: Serve may rebuild the
    ingress's classes by value in the router's process, so the class is not the same object."""
    routing = getattr(arg, "routing", None)
    return routing if isinstance(routing, Mapping) and hasattr(arg, "scope") else None


def _kept_by(pending: PendingRequest) -> str | None:
    """The replica (its unique id) that keeps the response a Responses request continues, if any."""
    for arg in [*pending.args, *pending.kwargs.values()]:
        fields = _relayed_fields(arg)
        if fields is None and isinstance(arg, Mapping):
            fields = arg
        if fields is not None and fields.get("previous_response_id"):
            return response_server(fields["previous_response_id"])
    return None


def _request_text(pending: PendingRequest) -> str | None:
    for arg in [*pending.args, *pending.kwargs.values()]:
        fields = _relayed_fields(arg)
        if fields is not None:
            return routing_text(fields)
        if isinstance(arg, Mapping) or hasattr(arg, "prompt") or hasattr(arg, "messages"):
            text = routing_text(arg)
            if text:
                return text
    return None


class PrefixAffinityRouter(RequestRouter):
    """Serve's request router for engine replicas: same prefix, same replica, unless it is overloaded.

    Configured through ``request_router_kwargs`` (see :class:`~async_llm.serve.prefix_affinity.PrefixAffinity`):
    ``imbalance_threshold``, ``match_fraction``, ``match_blocks``, ``block_chars``, ``max_blocks``,
    ``max_blocks_per_replica``.
    Requests without a prompt (``GET /health``, ``/metrics``) go to the least loaded replica. A
    Responses request with ``previous_response_id`` goes to the replica that keeps that response
    (its id names the replica), which alone can continue it.

    Each handle owner (the ingress replica) has its own router and so its own record of prefixes;
    with one ingress replica (the default) that record is exact, with several each routes on what
    it has seen, and new prefixes go where a hash of their first block says when loads are equal.
    """

    def initialize_state(self, **kwargs: Any) -> None:
        self.affinity: PrefixAffinity[ReplicaID] = PrefixAffinity(**kwargs)
        self.routed = 0
        self.routed_by_prefix = 0

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is None or not candidate_replicas:
            return [candidate_replicas]
        keeper = _kept_by(pending_request)
        if keeper is not None:  # only that replica keeps the response it continues
            home = [r for r in candidate_replicas if r.replica_id.unique_id == keeper]
            if home:  # waited for when busy, rather than sent where the response is not kept
                return [home]
        hashes = self.affinity.hashes(_request_text(pending_request))
        if not hashes:
            return [candidate_replicas]  # Serve takes the least loaded of them
        loads = await self._loads(candidate_replicas)
        by_id = {replica.replica_id: replica for replica in candidate_replicas}
        ranked = self.affinity.rank(list(by_id), loads, hashes)
        return [[by_id[replica_id]] for replica_id in ranked]

    async def _loads(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int | None]:
        """Requests in flight on each replica, from Serve's cache or probed where it has none."""
        cache = self.replica_queue_len_cache
        loads: dict[ReplicaID, int | None] = {r.replica_id: cache.get(r.replica_id) for r in replicas}
        unknown = [r for r in replicas if loads[r.replica_id] is None]
        if unknown:
            for replica, queue_len in await self._probe_queue_lens(unknown, 0):
                loads[replica.replica_id] = queue_len
        return loads

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        hashes = self.affinity.hashes(_request_text(pending_request))
        self.routed += 1
        if hashes:
            self.routed_by_prefix += self.affinity.matched_blocks(replica_id, hashes) > 0
            self.affinity.record(replica_id, hashes)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.affinity.keep_only(replica.replica_id for replica in replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.affinity.forget(replica_id)


class _Relay:
    """The ingress's ASGI app: every HTTP request goes whole to an engine replica's ``relay``."""

    def __init__(self, llm: DeploymentHandle) -> None:
        self.llm = llm.options(stream=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return  # no websocket routes
        body = bytearray()
        while True:  # BodyLimits has read, bounded and timed the body of every route that takes one
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        stream: DeploymentResponseGenerator[dict[str, Any]] = self.llm.relay.remote(  # type: ignore[assignment]
            RelayedRequest.from_http(scope, bytes(body))
        )
        started = finished = False
        try:
            async for message in stream:
                started = started or message["type"] == "http.response.start"
                await send(message)
            finished = True
        except Exception as exc:
            if started:
                raise  # mid-response: the client sees the connection end
            log.warning("relay to an engine replica failed", error=repr(exc))
            error = APIError(503, "no engine replica could take the request", code="unavailable")
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
            finished = True
        finally:
            if not finished:
                stream.cancel()  # the client left: the replica aborts the request and frees its row


class LLMIngress:
    """The HTTP ingress in front of the engine replicas (see the module docstring).

    Args:
        llm: A handle to the engine deployment (bound by :func:`~async_llm.serve.ray.build_app`).
        max_body_bytes: Larger request bodies get 413 here, before any replica sees them.
        body_timeout_s: A body must arrive within this many seconds, or it gets 408.
    """

    def __init__(
        self,
        llm: DeploymentHandle,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    ) -> None:
        self.asgi = BodyLimits(_Relay(llm), max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s)

    async def __serve_build_asgi_app__(self) -> Any:
        """Serve's hook for a late-bound ingress."""
        return self.asgi
