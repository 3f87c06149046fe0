"""The front end's side of the engine boundary: one output sink per event loop.

The engine reports each step's outputs to a request's :class:`~async_llm.engine.output.OutputSink`.
:class:`LoopSink` is that sink for every request submitted from one event loop: on the engine
thread it feeds the requests' transformers streamers (if any) and schedules one callback on the
loop per step, which hands each output to its :class:`~async_llm.outputs.TokenStream`. The engine
never sees a stream, a streamer or a loop.

The callers' side of those loops is here too: :class:`SyncLoop`, the private loop of the sync
wrappers, and :func:`require_asyncio`, the check that a caller's loop is one the sinks can use.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from async_llm.engine.output import RequestOutput
from async_llm.log import get_logger
from async_llm.outputs import TokenStream

log = get_logger("async_llm.frontend")
T = TypeVar("T")

ASYNCIO_ONLY = "async_llm runs on asyncio; trio is not supported (anyio's asyncio backend works)"


def require_asyncio() -> None:
    """Refuse to run on any event loop but asyncio's, with a message that says so.

    Outputs reach a caller through ``loop.call_soon_threadsafe`` on its asyncio loop; under trio
    (through anyio or not) there is none, and the failure would otherwise be a bare
    ``RuntimeError: no running event loop`` deep inside a call. (Asking asyncio itself needs no
    sniffio, which anyio no longer depends on.)

    Raises:
        RuntimeError: No asyncio event loop is running in this thread.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(f"{ASYNCIO_ONLY}; no asyncio event loop is running in this thread") from None


class SyncLoop:
    """An event loop running forever in a daemon thread, for the sync wrappers.

    Why not anyio's blocking portal: its thread is a daemon (anyio 4.16), but the portal lives
    inside a context manager that must be exited explicitly. An LLM that a script never closes would
    leave that exit to garbage collection during interpreter shutdown, when daemon threads no longer
    run: the exit waits for the portal's loop forever (seen here with anyio 4.16). A bare loop
    thread needs no exit.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="async-llm-sync", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop thread and wait for its result (from any other thread)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a sync method of the LLM was called from its own sync loop; await the async form")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if threading.current_thread() is self._thread:
            self.loop.call_soon(self.loop.stop)
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


@dataclass(slots=True)
class _Streamer:
    """A transformers streamer (``put``/``end``) and what it must not be shown."""

    streamer: Any
    hidden: frozenset[int]  # the request's end ids (engine.finish.end_ids): they end the text, not part of it


class StepSignal:
    """Wakes the coroutines that wait for the engine's next step (thread-safe).

    A batch job that finds the engine's queue full waits here instead of sleeping and retrying: a
    queue slot frees only when a step admits a waiting request into a row, and every step that
    produced outputs notifies this signal (through the sinks, on the worker thread). A full queue
    means requests are waiting, so the engine is stepping and the next step comes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    async def wait(self) -> None:
        """Return after the next step that produced outputs."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._waiters.append((loop, future))
        try:
            await future
        finally:
            with self._lock:
                if (loop, future) in self._waiters:  # cancelled before the step came
                    self._waiters.remove((loop, future))

    def notify(self) -> None:
        """A step made progress (called on a worker thread, once per step per sink)."""
        if not self._waiters:  # the common case, without the lock: nobody waits
            return
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits there any more
                loop.call_soon_threadsafe(_wake, future)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class LoopSink:
    """Delivers the outputs of the requests submitted from one event loop.

    Args:
        loop: The loop the requests' streams live on.
        steps: Notified once per delivery (see :class:`StepSignal`).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, steps: StepSignal | None = None) -> None:
        # A weak reference: the loop is the key of this sink in Sinks' weak dictionary.
        self._loop = weakref.ref(loop)
        self._steps = steps
        # Written on the loop (register) and read on the loop (_dispatch), except the streamers:
        # registered on the loop before the request is submitted, fed and dropped on the engine thread.
        self._streams: dict[str, TokenStream] = {}
        self._streamers: dict[str, _Streamer] = {}

    def register(self, stream: TokenStream, streamer: Any = None, hidden: frozenset[int] = frozenset()) -> None:
        """Route the outputs of ``stream.request_id`` to ``stream`` (and ``streamer``); call before submitting."""
        self._streams[stream.request_id] = stream
        if streamer is not None:
            self._streamers[stream.request_id] = _Streamer(streamer, hidden)

    def unregister(self, request_id: str) -> None:
        """Forget a request that was never queued (its submission failed)."""
        self._streams.pop(request_id, None)
        self._streamers.pop(request_id, None)

    # -- engine thread ----------------------------------------------------------------------------------
    def deliver(self, outputs: list[RequestOutput]) -> bool:
        for output in outputs:
            feed = self._streamers.get(output.request_id)
            if feed is not None:
                self._feed(output, feed)
        if self._steps is not None:
            self._steps.notify()
        loop = self._loop()
        if loop is None:
            return False
        try:
            loop.call_soon_threadsafe(self._dispatch, outputs)
        except RuntimeError:  # the loop is closed: nobody will read these streams
            return False
        return True

    def _feed(self, output: RequestOutput, feed: _Streamer) -> None:
        """Feed a streamer like ``generate`` does (eos left out). One that raises is dropped (and
        logged): a caller's object must not fail the step of every other request in the batch."""
        shown = [t for t in output.token_ids if t not in feed.hidden]
        try:
            if shown:
                feed.streamer.put(torch.tensor(shown))
            if output.finished:
                feed.streamer.end()
        except Exception as exc:  # noqa: BLE001  # a caller's streamer must not fail the engine's step
            self._streamers.pop(output.request_id, None)
            log.warning("streamer failed; no longer fed", request_id=output.request_id, error=repr(exc))
            return
        if output.finished:
            self._streamers.pop(output.request_id, None)

    # -- the loop ---------------------------------------------------------------------------------------
    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            try:
                stream.put(output)
            except Exception as exc:  # noqa: BLE001  # one stream's failure must not leave it (or the others) waiting
                self._streams.pop(output.request_id, None)
                log.warning("output not delivered; the request fails", request_id=output.request_id, error=repr(exc))
                stream.fail(exc)


class Sinks:
    """The :class:`LoopSink` of each event loop that submits requests (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopSink] = weakref.WeakKeyDictionary()
        #: Notified by every sink's delivery: the engine (or the beam runner) made a step.
        self.steps = StepSignal()

    def for_running_loop(self) -> LoopSink:
        loop = asyncio.get_running_loop()
        with self._lock:
            sink = self._by_loop.get(loop)
            if sink is None:
                sink = self._by_loop[loop] = LoopSink(loop, self.steps)
            return sink
