"""Typed errors raised by async_llm.

Every error the library raises on purpose derives from :class:`AsyncLLMError`, so callers can catch
the library's failures without catching unrelated bugs. Input validation errors also derive from the
builtin ``ValueError``/``TypeError`` so code written against plain Python conventions keeps working.
"""

from __future__ import annotations


class AsyncLLMError(Exception):
    """Base class of every error raised by async_llm."""


class QueueFullError(AsyncLLMError):
    """The engine's waiting queue is at ``max_queue_size``; the request was not queued."""


class EngineClosedError(AsyncLLMError):
    """The LLM (or its engine) is closed: new requests are refused and pending ones are failed."""


class RequestAbortedError(AsyncLLMError):
    """The request was aborted (its stream was closed or its task cancelled) before it finished."""


class GenerationError(AsyncLLMError):
    """A model step failed for this request. The engine itself keeps serving other requests."""


class RequestTimeoutError(AsyncLLMError):
    """The request ran out of time: its ``timeout`` (from submission to the last token), its
    ``queue_timeout`` (waiting for a row) or its ``stall_timeout`` (no new token for that long). Its
    row was freed at once; the tokens it produced before are in :attr:`token_ids` (a stream has
    already delivered them).

    Attributes:
        limit: Which limit ran out: ``"timeout"``, ``"queue_timeout"`` or ``"stall_timeout"``.
        seconds: That limit's value.
        token_ids: The output tokens produced before it ran out.
    """

    def __init__(self, limit: str, seconds: float, token_ids: list[int] | None = None) -> None:
        produced = len(token_ids or [])
        super().__init__(f"request exceeded its {limit} of {seconds:g} s ({produced} tokens produced)")
        self.limit = limit
        self.seconds = seconds
        self.token_ids = list(token_ids or [])


class ModelNotAvailableError(AsyncLLMError):
    """The requested model (for example the embedded default model) cannot be found or loaded."""


class ParameterError(AsyncLLMError):
    """A parameter of a request or setting is invalid; :attr:`param` names it.

    Raised before anything is queued. Catch :class:`InvalidParameterError` (also a ``ValueError``)
    or :class:`ParameterTypeError` (also a ``TypeError``), or this class for both.

    Args:
        param: The parameter at fault, by its library name (``max_tokens``, ``prompt``...).
        message: What is wrong, starting with the parameter's name.
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class InvalidParameterError(ParameterError, ValueError):
    """A parameter's value is out of range or otherwise invalid."""


class ParameterTypeError(ParameterError, TypeError):
    """A parameter has the wrong type, or is unknown."""


class ContextLengthError(InvalidParameterError):
    """The prompt, or the prompt with the ``max_tokens`` asked for, does not fit the model's context
    (the server answers it with OpenAI's code ``context_length_exceeded``)."""

    code = "context_length_exceeded"
