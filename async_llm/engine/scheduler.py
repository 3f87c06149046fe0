"""Waiting and running queues, admission and eviction. Pure Python, no torch.

The scheduler is the only owner of a request's status. It runs on the engine thread only.

Two policies (``EngineConfig.scheduling_policy``):

- ``"fcfs"``: requests start in arrival order (a preempted one goes back to the front).
- ``"priority"``: requests start by ``priority`` (lower first, vLLM's convention), then arrival. A
  waiting request gains one level per :data:`AGEING_SECONDS` it has waited, so a stream of urgent
  requests delays a less urgent one by a bounded time, not forever. **Preemption rule**: when a
  waiting request would not get a free row and a running request has a strictly larger ``priority``
  (less urgent, by the values given, ageing aside), the least urgent running request (the latest
  to arrive among equals) is preempted for it: its row is freed, its keys and values go to the
  prefix cache, and it waits again with its output so far, resuming where it stopped (its cache
  recomputed past what the prefix cache kept). A request preempted :data:`MAX_PREEMPTIONS` times
  is not preempted again: with the ageing, that bounds how long any request can be held back.

Deadlines (:meth:`Scheduler.expired`): a request's ``timeout`` (from submission), ``queue_timeout``
(each time it waits for a row) and ``stall_timeout`` (no new token while running).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from async_llm.engine.output import FinishReason
from async_llm.engine.request import Request, RequestStatus

#: Seconds of waiting worth one level of ``priority`` (the ageing of the priority policy).
AGEING_SECONDS = 60.0

#: Times a request may be preempted for more urgent ones (then it runs to its end).
MAX_PREEMPTIONS = 3


class Scheduler:
    """Admission into a running batch of at most ``max_batch_size`` rows (see the module's
    docstring for the policies).

    Args:
        max_batch_size: Most requests decoded together in one forward pass.
        max_prefill_tokens: Most prompt tokens prefilled in one step (at least one request is always
            admitted when a row is free), so a burst of long prompts cannot stall running rows for long.
        policy: ``"fcfs"`` or ``"priority"``.
    """

    def __init__(self, max_batch_size: int, max_prefill_tokens: int = 8192, policy: str = "fcfs") -> None:
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.policy = policy
        self._timed: dict[int, Request] = {}  # live requests with a deadline (by id())
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}
        self.num_finished = 0
        self.num_aborted = 0
        self.num_failed = 0
        self.num_preempted = 0
        self.peak_batch_size = 0
        # Halved when the device runs out of memory, raised by one per finished request (AIMD).
        self.row_limit = max_batch_size
        self.tokens_generated = 0

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        request.queued_at = time.perf_counter()
        p = request.params
        if p.timeout is not None or p.queue_timeout is not None or p.stall_timeout is not None:
            self._timed[id(request)] = request
        self.waiting.append(request)

    def _urgency(self, now: float) -> Callable[[Request], tuple[float, float]]:
        """The priority policy's order of waiting requests: aged priority, then arrival."""

        def key(request: Request) -> tuple[float, float]:
            waited = request.waited + now - request.queued_at
            return request.params.priority - waited / AGEING_SECONDS, request.arrival_time

        return key

    def admit(self) -> list[Request]:
        """Move waiting requests into the running set while rows and the prefill budget allow."""
        admitted: list[Request] = []
        budget = self.max_prefill_tokens
        now = time.perf_counter()
        if self.policy == "priority" and len(self.waiting) > 1 and len(self.running) < self.row_limit:
            self.waiting = deque(sorted(self.waiting, key=self._urgency(now)))
        while self.waiting and len(self.running) < self.row_limit:
            request = self.waiting[0]
            tokens = len(request.context_ids)
            if admitted and tokens > budget:
                break
            self.waiting.popleft()
            budget -= tokens
            request.status = RequestStatus.RUNNING
            request.waited += now - request.queued_at
            request.last_progress = now
            self.running[request.request_id] = request
            admitted.append(request)
        self.peak_batch_size = max(self.peak_batch_size, len(self.running))
        return admitted

    def start(self, requests: Iterable[Request]) -> None:
        """Move these waiting requests into the running set (for workers that pick their own
        groups, as beam search does, instead of :meth:`admit`'s first-come first-served)."""
        for request in requests:
            self.waiting.remove(request)
            request.status = RequestStatus.RUNNING
            self.running[request.request_id] = request
        self.peak_batch_size = max(self.peak_batch_size, len(self.running))

    def counters(self) -> dict[str, int]:
        """Requests running and waiting (as of now) and the totals since start."""
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "num_finished": self.num_finished,
            "num_aborted": self.num_aborted,
            "num_failed": self.num_failed,
            "num_preempted": self.num_preempted,
            "peak_batch_size": self.peak_batch_size,
            "tokens_generated": self.tokens_generated,
        }

    def preempt(self, requests: Iterable[Request], row_limit: int | None = None) -> None:
        """Send running requests back to the front of the queue (they keep their output and resume
        by recomputing their cache), and admit at most ``row_limit`` rows for now (None: as before)."""
        now = time.perf_counter()
        for request in reversed(list(requests)):
            del self.running[request.request_id]
            request.status = RequestStatus.WAITING
            request.queued_at = now
            request.preemptions += 1
            self.waiting.appendleft(request)
            self.num_preempted += 1
        if row_limit is not None:
            self.row_limit = max(1, row_limit)

    def victims(self, preemptible: Callable[[Request], bool]) -> list[Request]:
        """The running requests to preempt for more urgent waiting ones (the priority policy's rule,
        see the module's docstring), least urgent first; only those ``preemptible`` says may go
        (the engine's: rows in the batch, not prompts being prefilled)."""
        if self.policy != "priority" or not self.waiting:
            return []
        free = max(0, self.row_limit - len(self.running))
        queue = sorted(self.waiting, key=self._urgency(time.perf_counter()))[free:]
        candidates = sorted(
            (r for r in self.running.values() if r.preemptions < MAX_PREEMPTIONS and preemptible(r)),
            key=lambda r: (-r.params.priority, -r.arrival_time),
        )
        chosen = []
        for waiting, running in zip(queue, candidates):
            if waiting.params.priority >= running.params.priority:
                break
            chosen.append(running)
        return chosen

    def expired(self, now: float) -> list[tuple[Request, str, float]]:
        """Live requests past a deadline: ``(request, which limit, its seconds)``."""
        found = []
        for request in self._timed.values():
            p = request.params
            if p.timeout is not None and now - request.arrival_time > p.timeout:
                found.append((request, "timeout", p.timeout))
            elif request.status is RequestStatus.WAITING:
                if p.queue_timeout is not None and now - request.queued_at > p.queue_timeout:
                    found.append((request, "queue_timeout", p.queue_timeout))
            elif p.stall_timeout is not None and now - request.last_progress > p.stall_timeout:
                found.append((request, "stall_timeout", p.stall_timeout))
        return found

    def record_tokens(self, count: int) -> None:
        self.tokens_generated += count

    def finish(self, request: Request, reason: FinishReason) -> None:
        """End a request (from any state); it leaves the waiting or running set."""
        if request.status is RequestStatus.FINISHED:
            return
        if request.status is RequestStatus.RUNNING:
            del self.running[request.request_id]
        else:
            self.waiting.remove(request)
        self._timed.pop(id(request), None)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.finish_time = time.perf_counter()
        if reason is FinishReason.ABORT:
            self.num_aborted += 1
        elif reason is FinishReason.ERROR:
            self.num_failed += 1
        else:
            self.num_finished += 1
            self.row_limit = min(self.max_batch_size, self.row_limit + 1)

    def find(self, request_id: str) -> Request | None:
        """The live request with this id, waiting or running, if any."""
        request = self.running.get(request_id)
        if request is not None:
            return request
        return next((r for r in self.waiting if r.request_id == request_id), None)

    def all_live(self) -> Iterable[Request]:
        return [*self.running.values(), *self.waiting]

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
