"""A closed LLM refuses new calls, in every subclass.

``BaseLLM`` marks its public entry points (``run``, ``arun``, ``astream``, ``batch_run``, ``chat``...)
with :func:`refuses_when_closed`, and re-marks a subclass's own definitions of them when the
subclass is created (``BaseLLM.__init_subclass__``): a subclass that implements only ``run`` is
refused after ``close()`` as well, though nothing of the base class runs before its ``run``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from async_llm.errors import EngineClosedError

F = TypeVar("F", bound=Callable[..., Any])

#: The methods that start generation: each raises :class:`EngineClosedError` once the LLM is closed.
ENTRY_POINTS = (
    "run", "arun", "astream", "batch_run", "abatch_run", "amap", "__call__", "chat", "achat",
    "generate", "agenerate", "generate_text", "agenerate_text", "generate_summary", "agenerate_summary",
    "time_to_first_token", "generation_latency", "throughput", "submit", "submit_many", "acomplete",
)  # fmt: skip

_MARK = "__refuses_when_closed__"


def check_open(llm: Any) -> None:
    """Raises:
    EngineClosedError: ``llm`` is closed."""
    if getattr(llm, "_closed", False):  # before BaseLLM.__init__ ran, nothing is closed yet
        raise EngineClosedError(f"this {type(llm).__name__} is closed; create a new one to generate")


def refuses_when_closed(fn: F) -> F:
    """``fn`` (a method), raising :class:`EngineClosedError` when called on a closed LLM.

    A coroutine function checks when awaited; any other callable (an ``astream`` returning an
    iterator, an async generator function) checks at the call, so the error comes before anything
    is built.
    """
    if getattr(fn, _MARK, False):
        return fn
    wrapper: Callable[..., Any]
    if inspect.iscoroutinefunction(fn):

        async def guarded_async(self: Any, *args: Any, **kwargs: Any) -> Any:
            check_open(self)
            return await fn(self, *args, **kwargs)

        wrapper = guarded_async
    else:

        def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
            check_open(self)
            return fn(self, *args, **kwargs)

        wrapper = guarded
    functools.update_wrapper(wrapper, fn)  # the name, docstring and signature (through __wrapped__)
    setattr(wrapper, _MARK, True)
    return wrapper  # type: ignore[return-value]


def guard_entry_points(cls: type) -> None:
    """Mark the entry points that ``cls`` defines itself (inherited ones are marked where defined)."""
    for name in ENTRY_POINTS:
        fn = vars(cls).get(name)
        if inspect.isfunction(fn):
            setattr(cls, name, refuses_when_closed(fn))
