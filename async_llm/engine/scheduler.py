"""Waiting and running queues, admission and eviction. Pure Python, no torch.

The scheduler is the only owner of a request's status. It runs on the engine thread only.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from async_llm.engine.output import FinishReason
from async_llm.engine.request import Request, RequestStatus


class Scheduler:
    """First-come first-served admission into a running batch of at most ``max_batch_size`` rows.

    Args:
        max_batch_size: Most requests decoded together in one forward pass.
        max_prefill_tokens: Most prompt tokens prefilled in one step (at least one request is always
            admitted when a row is free), so a burst of long prompts cannot stall running rows for long.
    """

    def __init__(self, max_batch_size: int, max_prefill_tokens: int = 8192) -> None:
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
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
        self.waiting.append(request)

    def admit(self) -> list[Request]:
        """Move waiting requests into the running set while rows and the prefill budget allow."""
        admitted: list[Request] = []
        budget = self.max_prefill_tokens
        while self.waiting and len(self.running) < self.row_limit:
            request = self.waiting[0]
            tokens = len(request.context_ids)
            if admitted and tokens > budget:
                break
            self.waiting.popleft()
            budget -= tokens
            request.status = RequestStatus.RUNNING
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

    def preempt(self, requests: Iterable[Request], row_limit: int) -> None:
        """Send running requests back to the front of the queue (they keep their output and resume
        by recomputing their cache), and admit at most ``row_limit`` rows for now."""
        for request in reversed(list(requests)):
            del self.running[request.request_id]
            request.status = RequestStatus.WAITING
            self.waiting.appendleft(request)
            self.num_preempted += 1
        self.row_limit = max(1, row_limit)

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
