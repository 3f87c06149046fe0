"""The OpenAI-compatible ASGI app (FastAPI) over one shared engine.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` answers with
server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``), ``POST /v1/embeddings``,
``POST /v1/responses`` and ``GET /v1/responses/{id}`` (:mod:`async_llm.serve.responses`),
``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus text). With an API key, every
``/v1`` route needs ``Authorization: Bearer <key>``; ``/health`` and ``/metrics`` stay open, as in
vLLM, for probes and scrapers. Any other route (``/v1/files``...) gets a 404, and a route called
with the wrong method a 405, in OpenAI's error shape, naming the routes this server has.

A client that goes away aborts its request: a stream through sse-starlette's disconnect listener
(which cancels the response), a plain request through :func:`_unless_disconnected`.

A server that shuts down (Ctrl-C, SIGTERM: sse-starlette sees uvicorn's exit signal) ends each open
stream itself rather than cutting it: its requests are aborted and it sends a 503 error event
(``server shutting down``) and ``data: [DONE]``, so clients see why it ended and uvicorn no longer
finds responses left incomplete.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from async_llm.llm.huggingface import HuggingFaceLLM
from async_llm.log import get_logger
from async_llm.serve.errors import APIError, from_validation_errors
from async_llm.serve.limits import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, BodyLimits, check_limits
from async_llm.serve.metrics import CONTENT_TYPE
from async_llm.serve.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from async_llm.serve.responses import ResponsesAPI, ResponsesRequest
from async_llm.serve.serving import ChunkStream, OpenAIServing

__all__ = ["create_app"]

log = get_logger("async_llm.serve")

_ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models"})
#: Seconds an open stream has, once the server shuts down, to send its error event and ``[DONE]``
#: before sse-starlette cancels it (a fraction of uvicorn's graceful shutdown, ``server.SHUTDOWN_TIMEOUT_S``).
SHUTDOWN_GRACE_S = 3.0
#: The error event of a stream ended by the server's shutdown.
SHUTDOWN_ERROR = APIError(
    503, "server shutting down: the request was aborted before it finished", code="server_shutting_down"
)


def create_app(
    llm: HuggingFaceLLM,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    owns_llm: bool = False,
    server_id: str | None = None,
    stream_interval_s: float = 0.0,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    reject_unknown_fields: bool = False,
) -> FastAPI:
    """Build the OpenAI-compatible app over ``llm``.

    Args:
        llm: The engine shared by every request of this app.
        model_name: The model id clients send and ``/v1/models`` lists (default ``llm.model_id``);
            requests naming another model get a 404.
        api_key: When set, ``/v1`` routes answer 401 unless ``Authorization: Bearer <api_key>``.
        owns_llm: Close ``llm`` when the app shuts down (the CLI and Ray replicas own theirs).
        server_id: Added to ``system_fingerprint`` (Ray replicas put their id there).
        stream_interval_s: Pace stream chunks after the first token (see :class:`OpenAIServing`).
        max_body_bytes: Larger request bodies get 413 before they reach a route.
        body_timeout_s: A request body must arrive within this many seconds, or it gets 408
            (slow clients cannot hold a connection forever); see :mod:`async_llm.serve.limits`.
        reject_unknown_fields: Refuse request bodies with fields nobody knows (a typo such as
            ``temprature``) with a 400 naming them, as OpenAI does; by default they are ignored
            and logged once per name (see :class:`OpenAIServing`).

    Returns:
        The FastAPI app; serve it with uvicorn (``async-llm serve`` does).

    Raises:
        ValueError: ``max_body_bytes`` or ``body_timeout_s`` is not positive.
    """
    check_limits(max_body_bytes, body_timeout_s)  # now, not when the first request builds the stack
    serving = OpenAIServing(
        llm, model_name=model_name, server_id=server_id, stream_interval_s=stream_interval_s,
        reject_unknown_fields=reject_unknown_fields,
    )  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if owns_llm:
                await llm.aclose()

    app = FastAPI(title="async_llm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = serving
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal_error)
    # Starlette runs the last middleware added first: requests are counted, then their bodies checked.
    app.add_middleware(BodyLimits, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s)
    app.add_middleware(_CountRequests, serving=serving)
    routers = [_api_router(serving, api_key), _ops_router(serving)]
    for router in routers:
        app.include_router(router)
    app.state.routes = _route_list(routers)
    return app


def _route_list(routers: list[APIRouter]) -> str:
    """``"POST /v1/completions, ..."``: the routes named by the 404 and 405 errors."""
    listed = []
    for route in (route for router in routers for route in router.routes):
        methods = sorted(set(getattr(route, "methods", None) or ()) - {"HEAD"})
        if methods and getattr(route, "path", None):
            path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)  # type: ignore[attr-defined]  # {model:path}
            listed.append(f"{'/'.join(methods)} {path}")
    return ", ".join(listed)


def _api_router(serving: OpenAIServing, api_key: str | None) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(_bearer_auth(api_key))] if api_key else [])

    @router.get("/models")
    async def models() -> JSONResponse:
        return JSONResponse(serving.models())

    @router.get("/models/{model:path}")
    async def model(model: str) -> JSONResponse:
        serving.check_model(model)
        return JSONResponse(serving.model_card())

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        if body.stream:
            return _event_stream(await serving.completion_stream(body))
        return await _unless_disconnected(request, serving.completion(body))

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        if body.stream:
            return _event_stream(await serving.chat_completion_stream(body))
        return await _unless_disconnected(request, serving.chat_completion(body))

    @router.post("/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return await _unless_disconnected(request, serving.embeddings(body))

    responses = ResponsesAPI(serving)

    @router.post("/responses")
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        if body.stream:
            return _response_events(await responses.stream(body))
        return await _unless_disconnected(request, responses.create(body))

    @router.get("/responses/{response_id}")
    async def get_response(response_id: str) -> JSONResponse:
        return JSONResponse(responses.get(response_id))

    return router


def _ops_router(serving: OpenAIServing) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> JSONResponse:
        if serving.llm.closed:
            return JSONResponse({"status": "closed"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE)

    return router


def _bearer_auth(api_key: str) -> Callable[..., Awaitable[None]]:
    expected = api_key.encode()

    async def check(authorization: str | None = Header(default=None)) -> None:
        scheme, _, token = (authorization or "").partition(" ")
        # compare_digest: the time taken must not reveal how much of the key matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'")

    return check


# -- streaming ------------------------------------------------------------------------------------------
def _event_stream(chunks: ChunkStream) -> EventSourceResponse:
    # The background task runs however the response ends (done, failed, client gone before the first
    # byte), so every choice still running is aborted and its row freed.
    shutdown = anyio.Event()  # set by sse-starlette when the server shuts down
    return EventSourceResponse(
        _sse_data(chunks, shutdown), sep="\n", background=BackgroundTask(chunks.aclose),
        shutdown_event=shutdown, shutdown_grace_period=SHUTDOWN_GRACE_S,
    )  # fmt: skip


def _response_events(events: AsyncIterator[dict[str, Any]]) -> EventSourceResponse:
    """A Responses API stream: each event as ``event: <type>`` and its JSON (no ``[DONE]``, as OpenAI)."""

    async def sse() -> AsyncIterator[dict[str, str]]:
        async for event in events:
            yield {"event": event["type"], "data": json.dumps(event, ensure_ascii=False, separators=(",", ":"))}

    close = getattr(events, "aclose", None)
    return EventSourceResponse(sse(), sep="\n", background=BackgroundTask(close) if close else None)


async def _sse_data(chunks: ChunkStream, shutdown: anyio.Event) -> AsyncIterator[str]:
    """The stream's ``data:`` payloads: each chunk as JSON, then ``[DONE]``. When ``shutdown`` is set
    first, the chunk being awaited is cancelled (which aborts the stream's requests) and the
    :data:`SHUTDOWN_ERROR` event and ``[DONE]`` end the stream instead."""
    iterator = aiter(chunks)
    while True:
        chunk = await _next_chunk(iterator, shutdown)
        if chunk is _END:
            yield "[DONE]"
            return
        if chunk is _SHUTDOWN:
            break
        yield json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))
    log.info("stream ended by the server's shutdown")
    yield json.dumps(SHUTDOWN_ERROR.body(), separators=(",", ":"))
    yield "[DONE]"


_END: Any = object()  # the chunks are over
_SHUTDOWN: Any = object()  # the server shuts down; the chunk awaited was cancelled


async def _next_chunk(iterator: AsyncIterator[dict[str, Any]], shutdown: anyio.Event) -> Any:
    """The next chunk, :data:`_END`, or :data:`_SHUTDOWN` once ``shutdown`` is set (the chunk being
    awaited is cancelled: the chunk generator's cleanup aborts the requests before this returns).

    A task group per chunk, closed before the chunk is yielded: a scope left open across a
    generator's ``yield`` would not nest with its consumer's scopes."""
    result: Any = _SHUTDOWN
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            await shutdown.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            result = await anext(iterator)
        except StopAsyncIteration:
            result = _END
        tg.cancel_scope.cancel()
    return result


async def _unless_disconnected(request: Request, work: Awaitable[dict[str, Any]]) -> Response:
    """The JSON response of ``work``, or an empty 499 if the client disconnects first (``work`` is
    then cancelled, which aborts its requests and frees their rows)."""
    result: dict[str, Any] | None = None
    error: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            await _disconnected(request)
            tg.cancel_scope.cancel()  # cancels `work` below

        tg.start_soon(watch)
        try:
            result = await work
        except Exception as exc:  # noqa: BLE001  # raised below as itself, once the watcher is stopped
            error = exc
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    if result is not None:
        return JSONResponse(result)
    log.info("client disconnected; request cancelled", path=request.url.path)
    return Response(status_code=499)  # nobody reads it; the status tells the access log what happened


async def _disconnected(request: Request) -> None:
    # The body is already read, so the next ASGI message is the disconnect (or never comes).
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- errors and accounting --------------------------------------------------------------------------------
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return await _api_error(request, from_validation_errors(exc.errors()))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # The router's own errors: a path no route has (404), or a method the route does not take (405).
    # (The API's 404s, a model that does not exist, are APIErrors.)
    called = f"{request.method} {request.url.path}"
    routes = getattr(request.app.state, "routes", "")
    if exc.status_code == 404:
        error = APIError(404, f"Invalid URL ({called}): this server has {routes}", code="unknown_url")
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow") or "another method"
        message = f"Method not allowed ({called}): the route takes {allowed}; this server has {routes}"
        error = APIError(405, message, code="method_not_allowed")
    else:
        error = APIError(exc.status_code, str(exc.detail))
    response = await _api_error(request, error)
    response.headers.update(exc.headers or {})  # Allow, on a 405
    return response


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed", path=request.url.path, error=repr(exc))
    return await _api_error(request, APIError(500, f"internal error: {type(exc).__name__}"))


class _CountRequests:
    """Pure ASGI middleware counting API requests by endpoint and status (no body buffering)."""

    def __init__(self, app: ASGIApp, serving: OpenAIServing) -> None:
        self.app = app
        self.serving = serving

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        # A fixed label set: arbitrary paths must not grow the metric's cardinality.
        endpoint = path if path in _ENDPOINTS else "/v1/models/{model}" if path.startswith("/v1/models/") else None

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and endpoint is not None:
                self.serving.metrics.observe_request(endpoint, int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send if endpoint else send)
