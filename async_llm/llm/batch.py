"""Batch jobs of any size: prompts fed to the engine as rows free up, results as they complete.

A job keeps at most ``window`` prompts in flight (submitted, or finished but not yet taken by the
caller): the next prompt is submitted only when the caller takes a result, so a 100,000-prompt job
holds ``window`` results at most and never overruns the engine's queue. A full queue (other callers
share it) is waited out on the engine's steps (:class:`~async_llm.llm.frontend.StepSignal`), not
raised. The prompts are read lazily, so a generator works too.

The prompts in flight run in one anyio task group. ``amap`` is an async iterator that a caller may
leave with ``break`` and drop without closing, and an iterator finalised that way is closed from
another task, where a task group entered in its frame could not be exited: so the task group
runs in one task of the job's own, which the iterator cancels and waits for when it ends.

On a failure, or when the caller stops or is cancelled, every request the job has in flight is
aborted (a cancelled ``arun`` closes its stream); the exception carries ``batch_done``, the indices
of the prompts whose results were handed out, and a note saying how many there were.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sized
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from async_llm.errors import InvalidParameterError, ParameterTypeError, QueueFullError
from async_llm.llm.chat import Prompt, check_prompt, takes_tasks
from async_llm.llm.frontend import StepSignal
from async_llm.llm.parts import LLMParts


async def with_backpressure(call: Callable[[], Awaitable[Any]], steps: StepSignal | None) -> Any:
    """``await call()``; while the engine's queue is full (nothing was queued), wait for the
    engine's next step and try again. Without ``steps`` (no engine), QueueFullError is raised."""
    while True:
        try:
            return await call()
        except QueueFullError:
            if steps is None:
                raise
            await steps.wait()


@dataclass
class _Job:
    """One job's prompts in flight and the stream their results go out on."""

    run: Callable[[Any], Awaitable[Any]]
    slots: anyio.Semaphore  # one per prompt in flight; released when the caller takes its result
    results: MemoryObjectSendStream[tuple[int, Any, BaseException | None]]
    steps: StepSignal | None
    started: int = 0
    finished: int = 0

    async def feed(self, prompts: Iterable[Any]) -> None:
        """Start a task per prompt as slots free up, in one task group; end the results with it."""
        async with self.results, anyio.create_task_group() as group:
            try:
                for index, prompt in enumerate(prompts):
                    await self.slots.acquire()
                    self.started += 1
                    group.start_soon(self.one, index, prompt)
            except Exception as exc:  # noqa: BLE001  # the prompts' iterable failed: the job fails with it
                await self.results.send((-1, None, exc))  # (holds no slot: may wait for the caller to read)

    async def one(self, index: int, prompt: Any) -> None:
        try:
            item: tuple[int, Any, BaseException | None] = (
                index, await with_backpressure(lambda: self.run(prompt), self.steps), None
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001  # handed to the caller, who raises it
            item = (index, None, exc)
        self.finished += 1
        with contextlib.suppress(anyio.BrokenResourceError):  # the caller stopped reading: dropped
            # Never full: the buffer holds `window` items and each result holds a slot until taken.
            self.results.send_nowait(item)

    @property
    def in_flight(self) -> int:
        return self.started - self.finished


async def map_prompts(
    run: Callable[[Any], Awaitable[Any]],
    prompts: Iterable[Any],
    window: int,
    progress: Any = None,
    steps: StepSignal | None = None,
) -> AsyncIterator[tuple[int, Any]]:
    """Yield ``(index, run(prompt))`` as each completes, at most ``window`` in flight.

    Args:
        run: The coroutine function of one prompt (``llm.arun`` with the job's arguments).
        prompts: Any iterable, read as the job goes.
        window: Prompts in flight at most (results not yet taken count).
        progress: A tqdm-like bar (``update(1)``, ``close()``) or None.
        steps: The engine's steps, waited on while its queue is full (None: QueueFullError fails the job).

    Raises:
        The first failure of a prompt, with ``batch_done`` and a note (the others are aborted).
    """
    if window < 1:
        raise InvalidParameterError("window", f"window must be >= 1, got {window}")
    # Never more than `window` results are in the stream: each holds a slot until it is taken.
    send, receive = anyio.create_memory_object_stream[tuple[int, Any, BaseException | None]](window)
    # fast_acquire: a free slot is taken without a trip through the event loop (one per prompt).
    job = _Job(run, anyio.Semaphore(window, fast_acquire=True), send, steps)
    runner = asyncio.get_running_loop().create_task(job.feed(prompts), name="async-llm-batch-job")
    done: list[int] = []
    try:
        while True:
            try:  # a result already there is taken at once (receive() always yields to the loop first)
                index, value, error = receive.receive_nowait()
            except anyio.WouldBlock:
                try:
                    index, value, error = await receive.receive()
                except anyio.EndOfStream:
                    break
            except anyio.EndOfStream:
                break
            if error is not None:
                raise error
            done.append(index)
            job.slots.release()
            if progress is not None:
                progress.update(1)
            yield index, value
    except BaseException as exc:
        exc.batch_done = sorted(done)  # type: ignore[attr-defined]
        note = f"batch job stopped: {len(done)} prompts were done; the {job.in_flight} in flight were aborted"
        if hasattr(exc, "add_note"):  # Python 3.11+
            exc.add_note(note)
        raise
    finally:
        runner.cancel()  # the task group cancels every prompt in flight: each arun aborts its request
        await asyncio.wait({runner})
        if not runner.cancelled():
            runner.exception()  # retrieved: a failure was handed out through the stream already
        send.close()  # the runner closes it; unless it was cancelled before it ran
        receive.close()
        if progress is not None:
            progress.close()


def progress_bar(prompts: Iterable[Any], enabled: bool) -> Any:
    """A tqdm bar over the job (its total when ``prompts`` has a length), or None."""
    if not enabled:
        return None
    from tqdm.auto import tqdm  # only when asked for

    total = len(prompts) if isinstance(prompts, Sized) else None
    return tqdm(total=total, desc="batch", unit="prompt")


class BatchMixin(LLMParts):
    """``batch_run``, ``abatch_run`` and ``amap``: batch jobs over an LLM's ``arun``."""

    @takes_tasks
    def batch_run(self, prompts: Iterable[Prompt], **overrides: Any) -> list[Any]:
        """Blocking :meth:`abatch_run` (``progress=``, ``window=`` included); works with or without a
        running event loop in this thread."""
        return self._call_sync(self.abatch_run, list(prompts), **overrides)

    @takes_tasks
    async def abatch_run(
        self, prompts: Iterable[Prompt], *, progress: bool = False, window: int | None = None, **overrides: Any
    ) -> list[Any]:
        """Generate completions of all ``prompts`` as one batch job (any number of them).

        The prompts are fed to the engine as rows free up, ``window`` in flight at most (the
        default keeps the batch full): a job larger than the engine's queue waits for room rather
        than failing. For results as they complete, without keeping them all, use :meth:`amap`.

        Args:
            prompts: The prompts (``tasks`` in the swarm_models interface).
            progress: Show a progress bar (tqdm, on stderr).
            window: Prompts in flight at most.
            **overrides: Sampling parameters and call options, as for ``arun``.

        Returns:
            The results in input order (each a str, or a list of str when ``n`` > 1).

        Raises:
            TypeError: ``prompts`` is a str or holds an invalid prompt (checked before anything is queued).
            Any error of ``arun``: what the job has in flight is aborted, and the error carries
            ``batch_done`` (the indices of the prompts that were done) and a note.
        """
        if isinstance(prompts, str):
            raise ParameterTypeError("prompts", "prompts must be a list of prompts, not a single str (use arun)")
        prompts = [check_prompt(p) for p in prompts]
        results: list[Any] = [None] * len(prompts)
        async for index, result in self.amap(prompts, progress=progress, window=window, **overrides):
            results[index] = result
        return results

    def amap(
        self, prompts: Iterable[Prompt], *, progress: bool = False, window: int | None = None, **overrides: Any
    ) -> AsyncIterator[tuple[int, Any]]:
        """``(index, result)`` of each prompt as it completes (``async for i, text in llm.amap(prompts)``).

        ``prompts`` may be any iterable, a generator included: it is read as the job goes, and at
        most ``window`` results are held (in flight or not yet taken), so a job of any size runs in
        bounded memory. Leaving the loop early aborts what is in flight. Arguments and errors as
        :meth:`abatch_run`; each prompt is checked when its turn comes.
        """
        if isinstance(prompts, str):
            raise ParameterTypeError("prompts", "prompts must be an iterable of prompts, not a single str (use arun)")
        self.validate(**overrides)
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
            raise InvalidParameterError("window", f"window must be an int >= 1, got {window!r}")

        async def run(prompt: Any) -> Any:
            return await self.arun(check_prompt(prompt), **overrides)

        bar = progress_bar(prompts, progress)
        return map_prompts(run, prompts, window or self._batch_window(), bar, self._engine_steps())

    def _batch_window(self) -> int:
        """Prompts a batch job keeps in flight by default (backends with an engine size it to the batch)."""
        return 64

    def _engine_steps(self) -> StepSignal | None:
        """What a batch job waits on while the engine's queue is full (a backend with an engine
        returns its step signal); None: this LLM has no queue, and QueueFullError fails the job."""
        return None
