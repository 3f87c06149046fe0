"""gather: task-group fan-out that raises the first failure as itself and cancels the rest."""

from __future__ import annotations

import anyio
import pytest

from async_llm.errors import QueueFullError
from async_llm.llm.concurrency import gather


async def test_results_come_back_in_input_order():
    async def after(delay: float, value: int) -> int:
        await anyio.sleep(delay)
        return value

    calls = [lambda d=d, v=v: after(d, v) for d, v in [(0.03, 0), (0.0, 1), (0.01, 2)]]
    assert await gather(calls) == [0, 1, 2]


async def test_the_first_failure_is_raised_as_itself_and_cancels_the_others():
    cancelled = anyio.Event()

    async def slow() -> int:
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise
        return 0

    async def fails() -> int:
        await anyio.sleep(0.01)
        raise QueueFullError("full")

    with anyio.fail_after(5), pytest.raises(QueueFullError, match="full"):
        await gather([slow, fails])
    assert cancelled.is_set()
