"""Batch jobs of any size: prompts fed to the engine as rows free up, results as they complete.

A job keeps at most ``window`` prompts in flight (submitted, or finished but not yet taken by the
caller): the next prompt is submitted only when the caller takes a result, so a 100,000-prompt job
holds ``window`` results at most and never overruns the engine's queue. A full queue (other callers
share it) is waited out, not raised. The prompts are read lazily, so a generator works too.

On a failure, or when the caller stops or is cancelled, every request the job has in flight is
aborted; the exception carries ``batch_done``, the indices of the prompts whose results were
handed out, and a note saying how many there were.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sized
from typing import Any

from async_llm.errors import QueueFullError

#: How long a job waits before it resubmits to a full queue (doubling up to the maximum).
RETRY_S, MAX_RETRY_S = 0.005, 0.2

_END = object()


async def with_backpressure(call: Callable[[], Awaitable[Any]]) -> Any:
    """``await call()``, waiting and retrying while the engine's queue is full (nothing was queued)."""
    delay = RETRY_S
    while True:
        try:
            return await call()
        except QueueFullError:
            await asyncio.sleep(delay)
            delay = min(2 * delay, MAX_RETRY_S)


async def map_prompts(
    run: Callable[[Any], Awaitable[Any]],
    prompts: Iterable[Any],
    window: int,
    progress: Any = None,
) -> AsyncIterator[tuple[int, Any]]:
    """Yield ``(index, run(prompt))`` as each completes, at most ``window`` in flight.

    Args:
        run: The coroutine function of one prompt (``llm.arun`` with the job's arguments).
        prompts: Any iterable, read as the job goes.
        window: Prompts in flight at most (results not yet taken count).
        progress: A tqdm-like bar (``update(1)``, ``close()``) or None.

    Raises:
        The first failure of a prompt, with ``batch_done`` and a note (the others are aborted).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    results: asyncio.Queue[Any] = asyncio.Queue()
    slots = asyncio.Semaphore(window)
    tasks: set[asyncio.Task[None]] = set()
    done: list[int] = []

    async def one(index: int, prompt: Any) -> None:
        try:
            results.put_nowait((index, await with_backpressure(lambda: run(prompt)), None))
        except Exception as exc:  # noqa: BLE001  # handed to the consumer, which raises it
            results.put_nowait((index, None, exc))

    async def feed() -> None:
        try:
            for index, prompt in enumerate(prompts):
                await slots.acquire()  # released when the caller takes a result
                task = asyncio.ensure_future(one(index, prompt))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except Exception as exc:  # noqa: BLE001  # the prompts' iterable failed: the job fails with it
            results.put_nowait((-1, None, exc))
            return
        while tasks:
            await asyncio.gather(*tasks)
        results.put_nowait(_END)

    feeder = asyncio.ensure_future(feed())
    try:
        while True:
            item = await results.get()
            if item is _END:
                break
            index, value, error = item
            if error is not None:
                raise error
            done.append(index)
            slots.release()
            if progress is not None:
                progress.update(1)
            yield index, value
    except BaseException as exc:
        exc.batch_done = sorted(done)  # type: ignore[attr-defined]
        note = f"batch job stopped: {len(done)} prompts were done; the {len(tasks)} in flight were aborted"
        if hasattr(exc, "add_note"):  # Python 3.11+
            exc.add_note(note)
        raise
    finally:
        feeder.cancel()
        for task in list(tasks):
            task.cancel()  # a cancelled arun closes its stream: the engine aborts the request
        await asyncio.gather(feeder, *tasks, return_exceptions=True)
        if progress is not None:
            progress.close()


def progress_bar(prompts: Iterable[Any], enabled: bool) -> Any:
    """A tqdm bar over the job (its total when ``prompts`` has a length), or None."""
    if not enabled:
        return None
    from tqdm.auto import tqdm  # only when asked for

    total = len(prompts) if isinstance(prompts, Sized) else None
    return tqdm(total=total, desc="batch", unit="prompt")
