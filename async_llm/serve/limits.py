"""Request body limits for the API: media type, size and a deadline, checked before any route runs.

A pure ASGI middleware, so it sees the body as it arrives and never buffers more than
``max_body_bytes``:

- a body that is not JSON (``Content-Type`` other than ``application/json`` or ``*/*+json``) gets
  **415** before a byte of it is read; a request without ``Content-Type`` is read as JSON
  (hand-written clients often leave it out; FastAPI alone would refuse the body);
- a ``Content-Length`` over the limit gets **413** at once; a chunked body is counted as it comes
  and gets 413 as soon as it passes the limit;
- the whole body must arrive within ``body_timeout_s``: a slow trickle (slowloris) gets **408**
  and its connection is closed, so a slow client holds a connection for a bounded time and never
  reaches the engine.

Error responses carry ``Connection: close``: the rest of an unread body must not be parsed as the
next request. Slow *headers* are below ASGI; bound them at the proxy, or with uvicorn's
``limit_concurrency`` (``async-llm serve --limit-concurrency``).
"""

from __future__ import annotations

import anyio
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from async_llm.serve.errors import APIError

__all__ = ["DEFAULT_BODY_TIMEOUT_S", "DEFAULT_MAX_BODY_BYTES", "BodyLimits", "check_limits"]

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
"""4 MiB: far above any prompt that fits the context of the models served here."""

DEFAULT_BODY_TIMEOUT_S = 30.0

_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


def check_limits(max_body_bytes: int, body_timeout_s: float) -> None:
    """Raise ``ValueError`` unless both limits are positive (and the timeout finite)."""
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be an int >= 1, got {max_body_bytes!r}")
    if not 0 < body_timeout_s < float("inf"):
        raise ValueError(f"body_timeout_s must be a positive finite number of seconds, got {body_timeout_s!r}")


class _BodyTooLarge(Exception):
    pass


class BodyLimits:
    """Check the media type, size and arrival time of request bodies under ``prefix``.

    Args:
        app: The app to call with the (fully read) body.
        max_body_bytes: Largest body accepted, in bytes.
        body_timeout_s: Seconds the whole body may take to arrive, counted from the first read.
        prefix: Only paths starting with this are checked (``/health`` and ``/metrics`` have no body).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
        prefix: str = "/v1/",
    ) -> None:
        check_limits(max_body_bytes, body_timeout_s)
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in _METHODS_WITH_BODY
            or not scope.get("path", "").startswith(self.prefix)
        ):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type and media_type != "application/json" and not media_type.endswith("+json"):
            why = f"Content-Type must be application/json, got {media_type!r}"
            await _reject(scope, receive, send, APIError(415, why, code="unsupported_media_type"))
            return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _reject(scope, receive, send, self._too_large())
            return
        body = bytearray()
        try:
            with anyio.fail_after(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # nobody to answer; nothing was queued
                    body += message.get("body", b"")
                    if len(body) > self.max_body_bytes:
                        raise _BodyTooLarge
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            error = APIError(408, f"the request body did not arrive within {self.body_timeout_s:g} s", code="timeout")
            await _reject(scope, receive, send, error)
            return
        except _BodyTooLarge:
            await _reject(scope, receive, send, self._too_large())
            return

        replayed = False

        async def replay() -> Message:
            # The app reads the body once; later reads wait for the disconnect as before.
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        if not media_type:  # read as JSON (FastAPI would otherwise refuse it as "not a dictionary")
            scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
        await self.app(scope, replay, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"request body is larger than {self.max_body_bytes} bytes", code="body_too_large")


async def _reject(scope: Scope, receive: Receive, send: Send, error: APIError) -> None:
    response = JSONResponse(error.body(), status_code=error.status, headers={"connection": "close"})
    await response(scope, receive, send)
