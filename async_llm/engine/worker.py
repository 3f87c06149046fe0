"""Worker: a thread that owns its state and is reached only through a lock-protected inbox.

The engine (continuous batching) and the beam-search runner are both workers: callers on any thread
or event loop :meth:`Worker.submit` requests and :meth:`Worker.abort` them; the worker thread drains
its inbox between steps, so everything it owns (model inputs, batch tensors, request states) is
touched by one thread only.

A worker is built without its thread: :meth:`Worker.start` starts it, and a test may instead drive
it step by step with :meth:`Worker.step` from its own thread.
"""

from __future__ import annotations

import abc
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from async_llm.engine.output import StepOutputs
from async_llm.engine.scheduler import Scheduler
from async_llm.errors import EngineClosedError, QueueFullError
from async_llm.log import get_logger

log = get_logger("async_llm.engine.worker")


class Worker(abc.ABC):
    """Base of the threads that serve requests.

    Subclasses implement the hooks below. Nothing runs until :meth:`start` (or :meth:`step`).

    Args:
        name: Thread name.
        max_queue_size: Most requests waiting to start; :meth:`submit` raises past it.
    """

    def __init__(self, name: str, scheduler: Scheduler, max_queue_size: int) -> None:
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        self.scheduler = scheduler  # the one owner of request states and counters
        self.max_queue_size = max_queue_size
        self._lock = threading.Condition()
        self._inbox: list[Any] = []  # requests (or jobs) submitted since the last step
        self._aborts: set[str] = set()
        self._idle_calls: list[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = []
        self._num_waiting = 0  # waiting requests as of the last step (read by submitters)
        # The token bound (subclasses that count tokens set it): tokens of the requests submitted
        # since the last step, and of those waiting as of the last step.
        self.max_queue_tokens: int | None = None
        self._inbox_tokens = 0
        self._waiting_tokens = 0
        self._closing = False
        self._closed_done = False  # the closing step ran: every request was ended
        self._prepared = False
        self.ready = threading.Event()  # set once _prepare has run (see Worker.start)
        self.steps = 0
        self.busy_seconds = 0.0  # time spent in steps that did work (for the engine's tokens/s)
        # Burst gathering (see _gather_burst): off unless a subclass sets it.
        self.burst_gap_s = 0.0
        self.burst_window_s = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the worker thread (once). It first runs :meth:`_prepare` (checks that run the
        model), then sets :attr:`ready`; requests submitted meanwhile wait for it."""
        self._thread.start()

    # -- hooks (worker thread only) ---------------------------------------------------------------------
    @abc.abstractmethod
    def _accept(self, items: list[Any]) -> None:
        """Take newly submitted requests (or jobs) into the waiting queue."""

    def _prepare(self) -> None:  # noqa: B027  # an optional hook: most workers have nothing to prepare
        """Run once on the worker's thread before its first step (nothing by default)."""

    def _has_work(self) -> bool:
        """Whether anything is waiting or running."""
        return self.scheduler.has_work

    def _is_idle(self) -> bool:
        """Whether nothing is running (waiting requests are allowed)."""
        return not self.scheduler.running

    def _waiting_count(self) -> int:
        return len(self.scheduler.waiting)

    def _tokens(self, item: Any) -> int:
        """What ``item`` counts against ``max_queue_tokens`` (subclasses that set the bound say)."""
        return 0

    def _recount_waiting(self) -> None:
        """Publish the waiting count (and tokens) once a step has admitted, before its (long)
        forward: a taken request counts as waiting until then, and as running after."""
        self._num_waiting = self._waiting_count()
        if self.max_queue_tokens is not None:
            self._waiting_tokens = sum(self._tokens(request) for request in self.scheduler.waiting)

    @abc.abstractmethod
    def _apply_aborts(self, request_ids: set[str], out: StepOutputs) -> None: ...

    @abc.abstractmethod
    def _step(self, out: StepOutputs, admit: bool) -> bool:
        """One unit of work; start no new request when ``admit`` is False. Returns whether any
        model work was done (counted in ``busy_seconds``)."""

    @abc.abstractmethod
    def _fail_live(self, error: BaseException, out: StepOutputs, reason_closed: bool) -> None:
        """End every waiting and running request with ``error`` (after a fault, or at close)."""

    def stats(self) -> dict[str, int]:
        """The scheduler's counters, requests submitted but not yet taken counted as waiting, and
        steps (a consistent-enough snapshot: no lock on the hot path)."""
        counters = self.scheduler.counters()
        counters["num_waiting"] = len(self._inbox) + self._num_waiting
        counters["steps"] = self.steps
        return counters

    # -- thread-safe API ----------------------------------------------------------------------------------
    def submit(self, item: Any) -> None:
        """Queue a request (or job). Raises :class:`QueueFullError` or :class:`EngineClosedError` at once."""
        with self._lock:
            if self._closing:
                raise EngineClosedError("the LLM is closed; create a new one to generate")
            if len(self._inbox) + self._num_waiting >= self.max_queue_size:
                raise QueueFullError(
                    f"request queue is full ({self.max_queue_size} waiting); retry later or raise max_queue_size"
                )
            if self.max_queue_tokens is not None:
                tokens, queued = self._tokens(item), self._inbox_tokens + self._waiting_tokens
                if queued + tokens > self.max_queue_tokens:
                    raise QueueFullError(
                        f"request queue is full: the waiting requests need {queued} tokens (prompt + max_tokens) "
                        f"and this one {tokens}, past max_queue_tokens={self.max_queue_tokens}; retry later"
                    )
                self._inbox_tokens += tokens
            self._inbox.append(item)
            self._lock.notify()

    def abort(self, request_id: str) -> None:
        """Abort a request wherever it is; its resources are freed at the next step."""
        with self._lock:
            self._aborts.add(request_id)
            self._lock.notify()

    def is_aborted(self, request_id: str) -> bool:
        """Whether an abort of ``request_id`` is pending (for checks in the middle of a step)."""
        with self._lock:
            return request_id in self._aborts

    def call_when_idle(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run ``fn`` on the worker thread once nothing is running; new requests wait until then."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._closing:
                raise EngineClosedError("the LLM is closed")
            self._idle_calls.append((fn, future))
            self._lock.notify()
        return future

    def close(self, timeout: float | None = 60.0) -> None:
        """Fail every pending request with :class:`EngineClosedError` and stop the thread. Idempotent."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread.ident is None:  # never started (driven by step()): end everything here
            self.step()
        elif self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("worker thread did not stop in time", thread=self._thread.name, timeout=timeout)

    @property
    def closed(self) -> bool:
        return self._closing

    # -- worker thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        self._ensure_prepared()
        while self._wait_for_work():
            self.step()

    def _ensure_prepared(self) -> None:
        if self._prepared:
            return
        self._prepared = True  # once, even if it fails: the worker then serves without it
        try:
            with torch.inference_mode():
                self._prepare()
        except Exception as exc:  # preparation is an optimisation: serve without it
            log.exception("worker preparation failed", thread=self._thread.name, error=repr(exc))
        finally:
            self.ready.set()

    def _wait_for_work(self) -> bool:
        """Block until there is something to do; False once the worker has closed and finished."""
        with self._lock:
            if self._closed_done:
                return False
            while not (self._inbox or self._aborts or self._idle_calls or self._closing or self._has_work()):
                self._lock.wait()
            if self._inbox and self.burst_gap_s > 0 and not self._closing and self._is_idle():
                self._gather_burst()
        return True

    def step(self) -> bool:
        """One iteration: take what was submitted, aborted or scheduled, then one unit of work, and
        hand out its results. Runs on the worker thread, or on a test's thread when the worker was
        never started. Returns False once the worker is closed.

        Every step runs in inference mode: tensors are created in one step (prefill) and updated
        in place in another (aborts, evictions), so every step must agree on the mode.
        """
        with self._lock:
            if self._closed_done:
                return False
            inbox, self._inbox = self._inbox, []
            # Taken requests still wait: counted until the step recounts them, so submitters never
            # see a free queue that is not (the bound and num_waiting agree).
            self._num_waiting += len(inbox)
            self._waiting_tokens += self._inbox_tokens
            self._inbox_tokens = 0
            aborts, self._aborts = self._aborts, set()
            idle_calls, self._idle_calls = self._idle_calls, []
            closing = self._closing
        if closing:  # nothing will run: no model checks on the way out
            self.ready.set()
        else:
            self._ensure_prepared()
        out = StepOutputs()
        try:
            with torch.inference_mode():
                self._accept(inbox)
                if closing:
                    self._fail_live(EngineClosedError("the LLM was closed before this request finished"), out, True)
                    for _, future in idle_calls:
                        future.set_exception(EngineClosedError("the LLM was closed"))
                    idle_calls = []
                    with self._lock:
                        self._closed_done = True
                    return False
                self._apply_aborts(aborts, out)
                if idle_calls and self._is_idle():
                    # What was just accepted waits for these calls: count it now, not after them.
                    self._recount_waiting()
                    for fn, future in idle_calls:
                        self._call(fn, future)
                    idle_calls = []
                started = time.perf_counter()
                if self._step(out, admit=not idle_calls):
                    self.busy_seconds += time.perf_counter() - started
        except Exception as exc:
            # A fault outside a guarded model step (a bug, a broken tokenizer): the thread must not
            # die with requests waiting on it. Fail what is live and keep serving.
            log.exception("worker step failed", thread=self._thread.name, error=repr(exc))
            self._fail_live(exc, out, False)
        finally:
            if idle_calls:  # still busy: keep them for a later step
                with self._lock:
                    self._idle_calls[:0] = idle_calls
            self._recount_waiting()
            self._flush(out)
        self.steps += 1
        return True

    def _flush(self, out: StepOutputs) -> None:
        """Hand ``out``'s results to their loops now (a step may call this early, e.g. to deliver
        first tokens before a long decode forward)."""
        for request_id in out.flush():  # nobody will read these any more
            self.abort(request_id)

    def _gather_burst(self) -> None:
        """Requests sent together (``asyncio.gather`` of many calls) reach the inbox one by one,
        each after its own tokenization. An idle worker that started on the first would prefill a
        fraction of the burst, then the rest in a second forward, delaying everyone. So an idle
        worker waits while they keep coming: until no new one arrived for ``burst_gap_s``, at most
        ``burst_window_s`` in all (a lone request waits ``burst_gap_s``). A running batch needs no
        such wait: its steps are long, and arrivals queue up during them. Called with the lock held."""
        deadline = time.monotonic() + self.burst_window_s
        while (left := deadline - time.monotonic()) > 0:
            seen = len(self._inbox)
            self._lock.wait(min(self.burst_gap_s, left))  # a submit wakes it at once
            if len(self._inbox) == seen or self._closing:
                return

    @staticmethod
    def _call(fn: Callable[[], Any], future: concurrent.futures.Future[Any]) -> None:
        try:
            future.set_result(fn())
        except Exception as exc:  # noqa: BLE001  # handed to the caller through the future
            future.set_exception(exc)
