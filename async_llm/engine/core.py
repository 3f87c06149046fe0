"""The engine thread's step: plan -> run -> update, one step at a time.

One dedicated thread owns the model and the running batch, so the batch outlives any one event
loop, many loops (and sync callers) can submit at once, and torch computes with the GIL released.
Callers talk to it only through the thread-safe :class:`Worker` API (submit, abort, close).

Each step: :func:`~async_llm.engine.planner.plan_step` decides what runs (which requests start,
which prompt chunks prefill, in which forwards, and whether the batch decodes); the model runner
(:mod:`async_llm.engine.runners`) runs each forward; the update (:mod:`async_llm.engine.update`)
samples, applies the finish rule, frees finished rows and emits outputs. A failure fails the rows
of the forward that failed, never the engine.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Sequence
from traceback import format_exception
from typing import Any

import torch

from async_llm.engine.batch import BatchRows, PaddedBatch
from async_llm.engine.config import DEFAULT_MAX_BATCH_SIZE, QUEUE_TURNS, EngineConfig, check_quantize
from async_llm.engine.kv_budget import check_cuda_graphs, kv_geometry
from async_llm.engine.model_api import (
    attention_pair_cost,
    cache_kwarg,
    default_prefix_cache_bytes,
    input_device,
    vocab_size,
)
from async_llm.engine.output import FinishReason, StepOutputs
from async_llm.engine.planner import ChunkBudget, plan_step
from async_llm.engine.prefill import Forward, Prefiller
from async_llm.engine.prefix_cache import PrefixCache
from async_llm.engine.request import Request
from async_llm.engine.runners import ModelRunner, select_runner
from async_llm.engine.runners.static import StaticRunner, plan_static
from async_llm.engine.runners.transformers import TransformersRunner
from async_llm.engine.scheduler import Scheduler
from async_llm.engine.slot_batch import SlotBatch
from async_llm.engine.start_checks import CheckStore
from async_llm.engine.update import Ahead, StepUpdate
from async_llm.engine.worker import Worker
from async_llm.errors import (
    ContextLengthError,
    GenerationError,
    InvalidParameterError,
    RequestAbortedError,
    RequestTimeoutError,
)
from async_llm.log import get_logger

log = get_logger("async_llm.engine.core")


class Engine(StepUpdate, Worker):
    """Continuous batching: owns the scheduler, the padded batch and the model runner; runs on its
    own thread.

    Args:
        model: A transformers causal LM, already on its device and in eval mode.
        pad_token_id: Id used for left padding (masked out, any valid id works).
        config: How to batch, schedule and run (see :class:`~async_llm.engine.config.EngineConfig`).
        owns_model: The library loaded ``model`` itself: the fast runner may then share its fused
            weights with the model's modules instead of holding copies (a model passed in by the
            caller is never changed).
        checks: The verdicts of the start-up checks kept for the model's files (its loader's),
            or None to check every time.
        calibration_ids: With ``config.quantize``, the tokens of a text to calibrate the int8
            products on (see ``async_llm.engine.runners.int8``; None: tokens drawn from the
            vocabulary, a weaker calibration).
    """

    def __init__(
        self,
        model: Any,
        pad_token_id: int,
        config: EngineConfig | None = None,
        owns_model: bool = False,
        checks: CheckStore | None = None,
        calibration_ids: Sequence[int] | None = None,
    ) -> None:
        config = config if config is not None else EngineConfig()
        self.config = config
        self.device = input_device(model)
        check_cuda_graphs(config.cuda_graphs, self.device)
        check_quantize(config.quantize, self.device)
        self.calibration_ids = calibration_ids
        # The static runner's store is sized now, before the engine starts: a budget that cannot
        # work raises here, naming the option to change.
        self.slots = plan_static(model, config, self.device, owned=owns_model)
        rows = config.max_batch_size if config.max_batch_size is not None else DEFAULT_MAX_BATCH_SIZE
        if self.slots is not None:
            rows = self.slots.rows
        super().__init__(
            "async-llm-engine",
            Scheduler(rows, config.max_prefill_tokens, config.scheduling_policy),
            config.max_queue_size,
        )
        self.max_queue_tokens = config.max_queue_tokens
        if self.max_queue_tokens is None and self.slots is not None:
            self.max_queue_tokens = QUEUE_TURNS * self.slots.rows * self.slots.columns
        self.model = model
        self.owns_model = owns_model
        self.checks = checks
        self.pad_token_id = pad_token_id
        self.vocab_size = vocab_size(model)
        self._cache_kwarg = cache_kwarg(model)
        self._rng = torch.Generator()
        if config.seed is not None:
            self._rng.manual_seed(config.seed)
        else:
            self._rng.seed()
        self.batch = self._new_batch()
        overhead = config.prefill_overhead_tokens
        self.prefill_overhead_tokens = overhead if overhead is not None else 48 if self.device.type == "cpu" else 512
        self._pair_cost = attention_pair_cost(model)  # the prefill cost model's; the architecture's, once
        self.chunk_budget = ChunkBudget(config.prefill_chunk_tokens)
        self.prefix_cache: PrefixCache | None = None
        if config.prefix_cache:
            budget = config.prefix_cache_bytes
            self.prefix_cache = PrefixCache(default_prefix_cache_bytes(self.device) if budget is None else budget)
        self.prefiller = Prefiller(self.prefix_cache)
        # The unchecked transformers runner until the engine starts (_prepare, on its own thread:
        # choosing the runner runs the model), and if choosing fails.
        self.runner: ModelRunner = self._plain_runner()
        self._ahead: Ahead | None = None  # an overlapped decode step whose tokens are not handled yet
        self.speculative_config = config.speculation
        self.spec_draft_tokens = self.spec_accepted_tokens = self.spec_verify_steps = 0
        # A burst of submits made together is prefilled together (see Worker._gather_burst).
        self.burst_gap_s, self.burst_window_s = 0.001, 0.02

    def _new_batch(self) -> BatchRows:
        """The batch the runner decodes: the static runner's slots, else the padded buffer."""
        self.device = input_device(self.model)
        layers, kv_heads, head_dim = kv_geometry(self.model.config)
        dtype = next(self.model.parameters()).dtype
        if self.slots is not None:
            return SlotBatch(
                num_layers=layers,
                kv_heads=kv_heads,
                head_dim=head_dim,
                vocab_size=self.vocab_size,
                max_rows=self.slots.rows,
                columns=self.slots.columns,
                device=self.device,
                dtype=dtype,
            )
        return PaddedBatch(layers, self.vocab_size, self.scheduler.max_batch_size, self.device, dtype)

    @property
    def overlap(self) -> bool:
        """Whether decode steps overlap (``EngineConfig.overlap``; None: with the static runner on CUDA)."""
        if self.config.overlap is not None:
            return self.config.overlap
        return self.runner.name == "static" and self.device.type == "cuda"

    @property
    def max_context(self) -> int | None:
        """The longest context (prompt and output) a row may hold, when the runner bounds it (the
        static runner's ``max_model_len``); None: the model's own."""
        return self.slots.columns if self.slots is not None else None

    def _plain_runner(self) -> TransformersRunner:
        return TransformersRunner(
            self.model, self._cache_kwarg, self.pad_token_id, self.prefill_overhead_tokens, self._pair_cost
        )

    def move_to(self, device: torch.device) -> None:
        """Move the model once nothing is running (engine thread only, through call_when_idle)."""
        self.model.to(device)
        self.batch = self._new_batch()  # the same slots (and rows), on the new device
        if self.prefix_cache is not None:
            self.prefix_cache.clear()  # blocks on the old device
        self._prepare()  # the fast runner holds the weights of the old device

    def _prepare(self) -> None:
        """Choose the model runner, once, on the engine's thread before its first step (its checks
        run the model)."""
        if self.device.type == "cuda" and self.device.index is not None:
            # A new thread's current device is the first card: the engine's kernels, streams,
            # events and graph captures must all be on the model's.
            torch.cuda.set_device(self.device)
        self.runner = self._plain_runner()
        self.prefiller.can_resume = False
        self.chunk_budget.fused = False
        try:
            self.runner = select_runner(
                self.model,
                self.pad_token_id,
                self._cache_kwarg,
                fast_path=self.config.requested_runner != "transformers",
                batch_hint=min(16, self.scheduler.max_batch_size),
                owned=self.owns_model,
                overhead_tokens=self.prefill_overhead_tokens,
                pair_cost=self._pair_cost,
                checks=self.checks,
                slots=self.batch if isinstance(self.batch, SlotBatch) else None,
                cuda_graphs=self.config.cuda_graphs,
                quantize=self.config.quantize,
                calibration_ids=self.calibration_ids,
            )
        finally:  # the static runner failed its check, or choosing failed: the store goes, a padded batch comes
            if isinstance(self.batch, SlotBatch) and not isinstance(self.runner, StaticRunner):
                self.slots = None
                self.batch = self._new_batch()
        self.prefiller.can_resume = self.runner.can_resume
        if self.speculative_config is not None and not self.runner.speculates:
            log.info("speculation off: this runner decodes one token per row and step", runner=self.runner.name)
        # With a fused runner a chunk rides along with the decode step; a forward of its own costs
        # about a decode step before its first token, so without it chunks are fixed and larger.
        self.chunk_budget.fused = self.runner.fused
        if self.prefix_cache is not None and not self.runner.can_resume:
            self.prefix_cache = self.prefiller.prefix_cache = None

    def stats(self) -> dict[str, int]:
        counters = super().stats()
        cache = self.prefix_cache
        counters["prefix_cache_hit_tokens"] = cache.hit_tokens if cache else 0
        counters["prefix_cache_queried_tokens"] = cache.queried_tokens if cache else 0
        counters["prefix_cache_bytes"] = cache.bytes if cache else 0
        counters["prefill_computed_tokens"] = self.prefiller.computed_tokens
        counters["spec_decode_num_draft_tokens"] = self.spec_draft_tokens
        counters["spec_decode_num_accepted_tokens"] = self.spec_accepted_tokens
        counters["spec_decode_num_verify_steps"] = self.spec_verify_steps
        return counters

    def kv_usage(self) -> float:
        """The share of the KV memory in use, 0 to 1, read from any thread: the static runner's
        slots held; with the padded batch (which grows with its rows) the rows in use out of
        ``max_batch_size``."""
        batch = self.batch
        if isinstance(batch, SlotBatch):
            return batch.usage()
        return min(1.0, len(batch.rows) / max(1, self.scheduler.max_batch_size))

    def submit(self, item: Any) -> None:
        """Queue a request (see :meth:`Worker.submit`).

        Raises:
            ContextLengthError: Its prompt and ``max_tokens`` cannot fit in a row of the static
                runner's store (``max_model_len``): it could never run.
            InvalidParameterError: A non-zero ``priority`` on an engine that schedules first come,
                first served (it could not be honoured), or a request that alone needs more tokens
                than ``max_queue_tokens`` (``max_tokens``).
            QueueFullError: Past ``max_queue_size`` requests or ``max_queue_tokens`` tokens waiting.
        """
        if isinstance(item, Request) and item.params.priority and self.scheduler.policy != "priority":
            raise InvalidParameterError(
                "priority",
                f"priority={item.params.priority} needs scheduling_policy='priority'; this engine serves "
                "first come, first served",
            )
        if isinstance(item, Request) and self.max_queue_tokens is not None:
            needed = self._tokens(item)
            if needed > self.max_queue_tokens:
                raise InvalidParameterError(
                    "max_tokens",
                    f"the prompt ({item.num_prompt_tokens} tokens) and max_tokens ({item.params.max_tokens}) need "
                    f"{needed} tokens, more than the whole queue may hold (max_queue_tokens={self.max_queue_tokens})",
                )
        limit = self.max_context
        if limit is not None and isinstance(item, Request):
            needed = item.num_prompt_tokens + item.params.max_tokens
            if needed > limit:
                param = "prompt" if item.num_prompt_tokens >= limit else "max_tokens"
                raise ContextLengthError(
                    param,
                    f"the prompt ({item.num_prompt_tokens} tokens) and max_tokens ({item.params.max_tokens}) need "
                    f"{needed} tokens of context; a row holds {limit} (max_model_len)",
                )
        super().submit(item)

    # -- Worker hooks (engine thread) -------------------------------------------------------------------
    def _tokens(self, item: Any) -> int:
        """A request's cost against ``max_queue_tokens``: its prompt and ``max_tokens``."""
        return item.num_prompt_tokens + item.params.max_tokens if isinstance(item, Request) else 0

    def _accept(self, requests: list[Request]) -> None:
        for request in requests:
            self.scheduler.add(request)

    def _fail_live(self, error: BaseException, out: StepOutputs, reason_closed: bool) -> None:
        self._ahead = None
        self.batch.clear()
        self.prefiller.clear()
        if reason_closed:
            for request in self.scheduler.all_live():
                self.scheduler.finish(request, FinishReason.ABORT)
                out.add(request, reason=FinishReason.ABORT, error=error)
        else:
            self._fail(list(self.scheduler.all_live()), error, out)

    def _step(self, out: StepOutputs, admit: bool = True) -> bool:
        """plan -> run -> update, forward by forward (first tokens go out after each prefill).

        With ``overlap``, a step that only decodes plain rows is launched before the previous
        one's tokens are handled (see :meth:`_decode_overlapped`); any other step first handles
        them (:meth:`_drain`), so it plans and runs over a batch whose rows are all up to date."""
        self._enforce_deadlines(out)
        if admit and self.scheduler.policy == "priority" and self.scheduler.waiting:
            self._preempt_for_priority(out)
        may_overlap = self.overlap and self._may_overlap(admit)
        if self._ahead is not None and not may_overlap:
            self._drain(out)
        busy = self.batch.size > 0
        plan = plan_step(self.scheduler, self.prefiller, self.chunk_budget, self.runner, busy, admit)
        self._recount_waiting()
        for request in plan.admitted:
            event = "resumed" if request.output_ids else "admitted"
            log.info(event, request_id=request.request_id, prompt_tokens=request.num_prompt_tokens)
        # Planning changed nothing _may_overlap reads unless it admitted (it then prefills).
        decode_only = [(f.items, f.decode) for f in plan.forwards] == [([], True)]
        if may_overlap and busy and decode_only and not plan.admitted:
            self._decode_overlapped(out)
            return True
        self._drain(out)
        if decode_only and busy and not plan.admitted and self.runner.speculates:
            drafts = self._drafts()
            if drafts is not None:
                self._run_verify(drafts, out)
                return True
        for i, forward in enumerate(plan.forwards):
            if not self._run_forward(forward, plan.forwards[i + 1 :], out):
                break
            if not forward.decode:
                self._flush(out)
        return busy or bool(plan.admitted) or any(f.items for f in plan.forwards)

    def _enforce_deadlines(self, out: StepOutputs) -> None:
        """End the requests past a deadline (``timeout``, ``queue_timeout``, ``stall_timeout``) with
        :class:`~async_llm.errors.RequestTimeoutError`, freeing their rows at once."""
        expired = self.scheduler.expired(time.perf_counter())
        if not expired:
            return
        self._drain(out)
        rows = []
        for request, limit, seconds in expired:
            if request.finished:
                continue
            if request in self.batch.rows:
                rows.append(self.batch.rows.index(request))
            self.scheduler.finish(request, FinishReason.ERROR)
            out.add(request, reason=FinishReason.ERROR, error=RequestTimeoutError(limit, seconds, request.output_ids))
            log.info("timed out", request_id=request.request_id, limit=limit, tokens=len(request.output_ids))
        self.batch.remove(rows)
        self.prefiller.drop(r for r, _, _ in expired)

    def _preempt_for_priority(self, out: StepOutputs) -> None:
        """Preempt running rows for more urgent waiting requests (the scheduler's rule): their keys
        and values go to the prefix cache, their rows are freed, and they wait again."""

        def find() -> list[Request]:  # rows in the batch only: not prompts being prefilled
            in_batch = {id(r) for r in self.batch.rows}
            return self.scheduler.victims(lambda r: id(r) in in_batch)

        chosen = find()
        if chosen and self._ahead is not None:  # an overlapped step's tokens first: rows may end
            self._drain(out)
            chosen = find()
        if not chosen:
            return
        rows = [self.batch.rows.index(r) for r in chosen]
        self._keep_prefixes(rows)
        self.batch.remove(rows)
        self.scheduler.preempt(chosen)
        for request in chosen:
            log.info("preempted", request_id=request.request_id, priority=request.params.priority)

    def _may_overlap(self, admit: bool) -> bool:
        """Whether the next step may be launched before the last one's tokens are handled: no
        prompt waits for a row or is being prefilled, and no row has token controls (a grammar's
        mask needs the previous token on the host first). Logprobs are computed on the device and
        come back with the tokens."""
        scheduler = self.scheduler
        if self.prefiller.states or (admit and scheduler.waiting and len(scheduler.running) < scheduler.row_limit):
            return False
        if self.speculative_config is not None and self.runner.speculates:
            return False  # verify steps need each row's last token on the host
        return all(r.controls is None and not r.params.speculative_config for r in self.batch.rows)

    def _decode_overlapped(self, out: StepOutputs) -> None:
        """Launch this step's decode and sampling, then handle the previous step's tokens while the
        device computes (the device queue keeps the order: a slot freed here is reused by a later
        step only)."""
        rows = list(self.batch.rows)
        start = time.perf_counter()
        try:
            logits = self.runner.run(Forward([], decode=True), self.batch)
            assert logits is not None
            ahead = self._decode_ahead(logits)
        except torch.OutOfMemoryError as exc:
            self._drain(out)
            self._out_of_memory([], exc, out)
            return
        except Exception as exc:  # noqa: BLE001  # fails the batch's rows, as a failed decode step does
            self._drain(out)
            self.batch.clear()
            self._fail([r for r in rows if not r.finished], exc, out)
            return
        previous, self._ahead = self._ahead, ahead
        if previous is not None:
            self._commit_ahead(previous, out)
        self.chunk_budget.record_decode(time.perf_counter() - start)

    def _run_verify(self, drafts: list[list[int]], out: StepOutputs) -> None:
        """A speculative verify step (see :meth:`_verify_rows`); a failure fails the batch's rows,
        as a failed decode step does."""
        rows = list(self.batch.rows)
        start = time.perf_counter()
        try:
            self._verify_rows(drafts, out)
        except torch.OutOfMemoryError as exc:
            self._out_of_memory([], exc, out)
            return
        except Exception as exc:  # noqa: BLE001  # fails the batch's rows, as a failed decode step does
            self.batch.clear()
            self._fail([r for r in rows if not r.finished], exc, out)
            return
        self.chunk_budget.record_decode(time.perf_counter() - start)

    def _drain(self, out: StepOutputs) -> None:
        """Handle the tokens of the overlapped step still in flight, if any."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            self._commit_ahead(ahead, out)

    def _run_forward(self, forward: Forward, later: list[Forward], out: StepOutputs) -> bool:
        """Run one forward and update its rows. A failure fails the rows it ran (with decode rows,
        the whole batch: its state is unknown); out of memory splits the batch instead. Returns
        False when the step must stop (out of memory)."""
        if forward.decode and not self.batch.size:
            if not forward.items:
                return True
            forward = dataclasses.replace(forward, decode=False)
        rows = list(self.batch.rows) if forward.decode else []
        start = time.perf_counter()
        try:
            logits = self.runner.run(forward, self.batch)
            seconds = time.perf_counter() - start
            completed = self.prefiller.complete(forward)
            if logits is not None:
                self._sample_rows(logits, out)
            if forward.items:
                self.chunk_budget.record_prefill(forward.tokens, seconds, with_decode=forward.decode)
            else:  # a decode step's time includes its sampling, as the rows feel it
                self.chunk_budget.record_decode(time.perf_counter() - start)
            self._join(completed, out)
        except torch.OutOfMemoryError as exc:
            self._out_of_memory([*forward.requests, *(r for f in later for r in f.requests)], exc, out)
            return False
        except Exception as exc:  # noqa: BLE001  # fails this forward's rows only
            if rows:
                self.batch.clear()
            self._fail([*rows, *forward.requests], exc, out)
        return True

    def _out_of_memory(self, new: Sequence[Request], exc: BaseException, out: StepOutputs) -> None:
        """Split the batch and retry: rows beyond half of the live ones (the newly admitted first,
        whose prefill did not complete) go back to the front of the queue and resume later by
        recomputing their cache; a lone row that does not fit fails."""
        batch = self.batch
        batch.remove([i for i, r in enumerate(batch.rows) if r in new])  # no half-made rows stay
        new = [r for r in new if not r.finished]
        self.prefiller.drop(new)  # they start over (the prefix cache may keep part of the work)
        if batch.size + len(new) <= 1:
            self._fail([*batch.rows, *new], exc, out)
            return
        keep = (batch.size + len(new)) // 2
        evicted = batch.rows[keep:]
        batch.remove(list(range(keep, batch.size)))
        self.scheduler.preempt([*evicted, *new], row_limit=keep)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("out of memory: batch split", kept=keep, preempted=len(evicted) + len(new), error=repr(exc))

    def _fail_one(self, request: Request, exc: BaseException, out: StepOutputs) -> None:
        """End ``request`` with a :class:`GenerationError` caused by ``exc`` (its row is removed by the caller)."""
        if request.finished:
            return
        _detach(exc)
        self.scheduler.finish(request, FinishReason.ERROR)
        error = GenerationError(f"generation failed: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        out.add(request, reason=FinishReason.ERROR, error=error)
        log.error("failed", request_id=request.request_id, error=repr(exc))

    def _apply_aborts(self, request_ids: set[str], out: StepOutputs) -> None:
        if not request_ids:
            return
        rows = []
        for request_id in request_ids:
            request = self.scheduler.find(request_id)
            if request is None:
                continue  # already finished
            if request in self.batch.rows:
                rows.append(self.batch.rows.index(request))
            self.scheduler.finish(request, FinishReason.ABORT)
            out.add(request, reason=FinishReason.ABORT, error=RequestAbortedError(f"request {request_id} was aborted"))
            log.info("aborted", request_id=request_id, tokens=len(request.output_ids))
        self.batch.remove(rows)
        self.prefiller.drop(r for r in self.prefiller.requests if r.finished)

    def _fail(self, requests: Sequence[Request], exc: BaseException, out: StepOutputs) -> None:
        for request in requests:
            self._fail_one(request, exc, out)
        # Rows of failed requests may already sit in the batch (a step can fail after merging them).
        self.batch.remove([i for i, r in enumerate(self.batch.rows) if r.finished])
        self.prefiller.drop(requests)


def _detach(exc: BaseException) -> None:
    """Log where ``exc`` (and what it chains) was raised, once, then drop its traceback: the error
    goes to callers, who may keep it, and the engine's frames in a traceback hold the step's
    tensors (a prefill's KV slot among them) for as long as they do."""
    seen: set[int] = set()
    chained: BaseException | None = exc
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        if chained.__traceback__ is not None:
            if chained is exc:
                log.error("step failure traceback", error=repr(exc), traceback="".join(format_exception(exc)))
            traceback.clear_frames(chained.__traceback__)
            chained.__traceback__ = None
        chained = chained.__cause__ or chained.__context__
