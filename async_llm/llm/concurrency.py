"""Structured fan-out on anyio task groups, raising the first failure as itself."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio

T = TypeVar("T")


async def gather(calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run ``calls`` concurrently in one anyio task group and return their results in order.

    The first call that fails cancels the others (a cancelled request stream aborts its request),
    and its exception is raised as itself, not wrapped in an ``ExceptionGroup``, so callers keep
    catching the library's typed errors. Cancelling the caller cancels every call.

    Raises:
        The first exception raised by a call.
    """
    results: list[Any] = [None] * len(calls)
    failure: list[Exception] = []

    async def run(index: int, call: Callable[[], Awaitable[T]], scope: anyio.CancelScope) -> None:
        try:
            results[index] = await call()
        except Exception as exc:  # noqa: BLE001  # the first failure is re-raised below, as itself
            if not failure:
                failure.append(exc)
            scope.cancel()

    async with anyio.create_task_group() as tg:
        for index, call in enumerate(calls):
            tg.start_soon(run, index, call, tg.cancel_scope)
    if failure:
        raise failure[0]
    return results
