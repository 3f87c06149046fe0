"""OpenAI-style API errors and how the library's exceptions map onto them.

Every error response has OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``, so the
official clients raise their usual typed exceptions (``BadRequestError``, ``RateLimitError``...).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from async_llm.errors import (
    EngineClosedError,
    GenerationError,
    ParameterError,
    QueueFullError,
    RequestAbortedError,
    RequestTimeoutError,
)

# status -> (OpenAI error type, default code)
_TYPES: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("rate_limit_error", "queue_full"),
    500: ("server_error", None),
    503: ("service_unavailable", "engine_closed"),
}

# pydantic's names for union members and wrapped validators; not request fields.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "list[str]", "list[TextPart]"})


class APIError(Exception):
    """An error to send to the client as an OpenAI error body.

    Args:
        status: HTTP status code.
        message: What went wrong, naming the field when one is at fault.
        param: The request field at fault, if any.
        code: A machine-readable code (defaults by status, e.g. ``model_not_found`` for 404).
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        kind, default_code = _TYPES.get(status, ("invalid_request_error" if status < 500 else "server_error", None))
        self.type = kind
        self.code = code if code is not None else default_code

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_exception(exc: BaseException, field_name: Callable[[str], str] = lambda p: p) -> APIError:
    """Map an exception raised by ``submit`` or by a stream onto the API error to return.

    Args:
        exc: The exception.
        field_name: Maps the library's parameter name (``max_tokens``, ``prompt``) onto the request
            field the client used (``max_completion_tokens``, ``messages``).

    Returns:
        400 for invalid input (``ValueError``/``TypeError``; with ``param`` for a
        :class:`~async_llm.errors.ParameterError`, which names the parameter at fault, and its
        ``code`` when it has one: ``context_length_exceeded`` for a prompt or ``max_tokens`` beyond
        the model's context, as OpenAI answers), 429 for a full queue, 503 for a closed engine, 408
        for a request that waited past its ``queue_timeout`` and 504 past its ``timeout`` or
        ``stall_timeout`` (``code`` names the limit), 500 otherwise.
    """
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc))
    if isinstance(exc, (EngineClosedError, RequestAbortedError)):
        return APIError(503, str(exc))
    if isinstance(exc, RequestTimeoutError):  # never started: 408 (retry later); started, not done: 504
        return APIError(408 if exc.limit == "queue_timeout" else 504, str(exc), code=exc.limit)
    if isinstance(exc, GenerationError):
        return APIError(500, str(exc))
    if isinstance(exc, ParameterError):
        message = str(exc)
        param = field_name(exc.param)
        if not message.startswith(param):
            message = f"{param}: {message}"
        return APIError(400, message, param=param, code=getattr(exc, "code", None))
    if isinstance(exc, (ValueError, TypeError)):
        return APIError(400, str(exc))
    return APIError(500, f"internal error: {type(exc).__name__}")


def from_validation_errors(errors: Sequence[Any]) -> APIError:
    """A 400 for pydantic's (FastAPI's) validation errors, naming the first field at fault.

    Args:
        errors: ``RequestValidationError.errors()``; each has ``loc`` (``("body", "messages", 0,
            "content")``), ``msg`` and ``type``.
    """
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    loc = list(first.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('msg')}")
    param = _param_path(loc)
    if not param:
        return APIError(400, f"invalid request body: {first.get('msg')}")
    message = f"{param}: {first.get('msg')}"
    if first.get("type") == "missing":
        message = f"{param} is required"
    return APIError(400, message, param=param)


def _param_path(loc: Sequence[Any]) -> str:
    """``["messages", 0, "content"]`` -> ``"messages[0].content"``, leaving out pydantic's union tags."""
    path = ""
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
        elif isinstance(item, str) and item.isidentifier() and item not in _TYPE_TAGS and not item[:1].isupper():
            path += f".{item}" if path else item
    return path
