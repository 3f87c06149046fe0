"""The engine thread: schedule -> prefill/decode -> update -> deliver, one step at a time.

One dedicated thread owns the model and the running batch, so the batch outlives any one event
loop, many loops (and sync callers) can submit at once, and torch computes with the GIL released.
Callers talk to it only through the thread-safe :class:`Worker` API (submit, abort, close).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from async_llm.engine.batch import PaddedBatch
from async_llm.engine.config import EngineConfig
from async_llm.engine.fast_decode import FastDecoder, Rows, prepare
from async_llm.engine.finish import finish_reason
from async_llm.engine.logprobs import send_prompt_logprobs
from async_llm.engine.model_api import (
    attention_pair_cost,
    cache_kwarg,
    default_prefix_cache_bytes,
    input_device,
    last_logits,
)
from async_llm.engine.output import FinishReason, StepOutputs, TokenLogprob
from async_llm.engine.prefill import Prefiller, PrefillState, Work
from async_llm.engine.prefix_cache import PrefixCache
from async_llm.engine.request import Request
from async_llm.engine.sampler import Choice, SamplingBatch, choose
from async_llm.engine.scheduler import ChunkBudget, Scheduler
from async_llm.engine.worker import Worker
from async_llm.errors import GenerationError, RequestAbortedError
from async_llm.log import get_logger

log = get_logger("async_llm.engine.core")


class Engine(Worker):
    """Continuous batching: owns the scheduler and the padded batch; runs on its own thread.

    Args:
        model: A transformers causal LM, already on its device and in eval mode.
        pad_token_id: Id used for left padding (masked out, any valid id works).
        config: How to batch, schedule and run (see :class:`~async_llm.engine.config.EngineConfig`).
    """

    def __init__(self, model: Any, pad_token_id: int, config: EngineConfig | None = None) -> None:
        config = config if config is not None else EngineConfig()
        self.config = config
        super().__init__(
            "async-llm-engine", Scheduler(config.max_batch_size, config.max_prefill_tokens), config.max_queue_size
        )
        self.model = model
        self.pad_token_id = pad_token_id
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self._cache_kwarg = cache_kwarg(model)
        self._rng = torch.Generator()
        if config.seed is not None:
            self._rng.manual_seed(config.seed)
        else:
            self._rng.seed()
        self.batch = self._new_batch()
        prefill_overhead_tokens = config.prefill_overhead_tokens
        if prefill_overhead_tokens is None:
            prefill_overhead_tokens = 48 if self.device.type == "cpu" else 512
        self.prefill_overhead_tokens = prefill_overhead_tokens
        self.chunk_budget = ChunkBudget(config.prefill_chunk_tokens)
        self.fast_path = config.fast_path
        self.prefix_cache: PrefixCache | None = None
        if config.prefix_cache:
            budget = config.prefix_cache_bytes
            if budget is None:
                budget = default_prefix_cache_bytes(self.device)
            self.prefix_cache = PrefixCache(budget)
        self.prefiller = Prefiller(
            model,
            self._cache_kwarg,
            pad_token_id,
            prefill_overhead_tokens,
            attention_pair_cost(model),
            self.prefix_cache,
        )
        # Decided when the engine starts (on its own thread, see _prepare): the checks run the model.
        self.fast_decoder: FastDecoder | None = None
        # A burst of submits made together is prefilled together (see Worker._gather_burst).
        self.burst_gap_s, self.burst_window_s = 0.001, 0.02

    def _new_batch(self) -> PaddedBatch:
        self.device = input_device(self.model)
        return PaddedBatch(
            num_layers=self.model.config.get_text_config().num_hidden_layers,
            vocab_size=self.vocab_size,
            max_rows=self.scheduler.max_batch_size,
            device=self.device,
            dtype=next(self.model.parameters()).dtype,
        )

    def move_to(self, device: torch.device) -> None:
        """Move the model once nothing is running (engine thread only, through call_when_idle)."""
        self.model.to(device)
        self.batch = self._new_batch()
        if self.prefix_cache is not None:
            self.prefix_cache.clear()  # blocks on the old device
        self._prepare()  # the fast step holds the weights of the old device

    def _prepare(self) -> None:
        """Checks that run the model, once, on the engine's thread before its first step: whether
        the fast steps apply, and what the transformers prefill may do (see Prefiller.prepare)."""
        why: str | None = "fast_path=False"
        self.fast_decoder = None
        if self.fast_path:
            hint = min(16, self.scheduler.max_batch_size)
            self.fast_decoder, why = prepare(self.model, self.pad_token_id, self._cache_kwarg, batch_hint=hint)
        if self.fast_decoder is None:
            log.info("fast decode step off; decoding with the transformers forward", reason=why)
        self.prefiller.prepare(self.fast_decoder)
        # A chunk rides along with the decode step only in the fast step; a forward of its own costs
        # about a decode step before its first token, so without it chunks are fixed and larger.
        self.chunk_budget.fused = self.fast_decoder is not None
        if self.prefix_cache is not None and not self.prefiller.can_resume:
            self.prefix_cache = self.prefiller.prefix_cache = None

    def stats(self) -> dict[str, int]:
        counters = super().stats()
        cache = self.prefix_cache
        counters["prefix_cache_hit_tokens"] = cache.hit_tokens if cache else 0
        counters["prefix_cache_queried_tokens"] = cache.queried_tokens if cache else 0
        counters["prefix_cache_bytes"] = cache.bytes if cache else 0
        counters["prefill_computed_tokens"] = self.prefiller.computed_tokens
        return counters

    # -- Worker hooks (engine thread) -------------------------------------------------------------------
    def _accept(self, requests: list[Request]) -> None:
        for request in requests:
            self.scheduler.add(request)

    def _fail_live(self, error: BaseException, out: StepOutputs, reason_closed: bool) -> None:
        self.batch.clear()
        self.prefiller.clear()
        if reason_closed:
            for request in self.scheduler.all_live():
                self.scheduler.finish(request, FinishReason.ABORT)
                out.add(request, reason=FinishReason.ABORT, error=error)
        else:
            self._fail(list(self.scheduler.all_live()), error, out)

    def _step(self, out: StepOutputs, admit: bool = True) -> bool:
        """schedule -> prefill (whole prompts, or chunks within the budget) -> one decode step of the
        batch -> (outputs flushed by the worker)."""
        new = self.scheduler.admit() if admit else []
        self._recount_waiting()
        for request in new:
            event = "resumed" if request.output_ids else "admitted"
            log.info(event, request_id=request.request_id, prompt_tokens=request.num_prompt_tokens)
        self.prefiller.add(new)
        # With rows decoding, a long prompt goes in chunks between their steps; else as much as allowed.
        if self.batch.size:
            works = self.prefiller.plan(self.chunk_budget.tokens(), self.chunk_budget.whole())
        else:
            works = self.prefiller.plan(self.scheduler.max_prefill_tokens)
        if self.batch.size and works and works[0].mode == "fast":  # one forward: chunks ride with the decode
            self._run_mixed(works[0], out)
            return True
        for w, work in enumerate(works):
            if not self._run_prefill(work, [r for later in works[w + 1 :] for r in later.requests], out):
                break
            self._flush(out)  # first tokens go out now, not after the batch's decode forward
        if self.batch.size:
            self._run_decode(out)
        return bool(new or works or self.batch.size)

    def _run_prefill(self, work: Work, later: list[Request], out: StepOutputs) -> bool:
        """Run one prefill forward and merge the prompts it completes into the batch; a failure fails
        only its rows. Returns False when out of memory (its rows and ``later`` then wait for a
        smaller batch)."""
        start = time.perf_counter()
        try:
            completed = self.prefiller.run(work)
            self.chunk_budget.record_prefill(work.tokens, time.perf_counter() - start)
            self._join(completed, out)
        except torch.OutOfMemoryError as exc:
            self._out_of_memory([*work.requests, *later], exc, out)
            return False
        except Exception as exc:  # noqa: BLE001  # any failure fails these rows only; the batch is untouched
            self._fail(work.requests, exc, out)
        return True

    def _run_mixed(self, work: Work, out: StepOutputs) -> None:
        """The batch's decode step and ``work``'s prompt chunks in one fast forward; the prompts it
        completes join the batch after it. A failure fails both (the batch's state is unknown)."""
        batch, rows = self.batch, list(self.batch.rows)
        start = time.perf_counter()
        try:
            inputs = batch.decode_inputs()
            assert batch.kv is not None
            decode = Rows(inputs["input_ids"], inputs["position_ids"], inputs["attention_mask"], batch.kv, batch.end)
            completed = self.prefiller.run(work, decode)
            seconds = time.perf_counter() - start
            self.chunk_budget.record_prefill(work.tokens, seconds, with_decode=True)
            assert work.decode_logits is not None
            self._sample_rows(work.decode_logits, out)
            self._join(completed, out)
        except torch.OutOfMemoryError as exc:
            self._out_of_memory(work.requests, exc, out)
        except Exception as exc:  # noqa: BLE001  # the batch's state is unknown: fail its rows and the chunks'
            batch.clear()
            self._fail([*rows, *work.requests], exc, out)

    def _run_decode(self, out: StepOutputs) -> None:
        """One decode step of every running row; a failure fails the batch's rows (its state is unknown)."""
        rows = list(self.batch.rows)
        start = time.perf_counter()
        try:
            self._decode(out)
            self.chunk_budget.record_decode(time.perf_counter() - start)
        except torch.OutOfMemoryError as exc:
            self._out_of_memory([], exc, out)
        except Exception as exc:  # noqa: BLE001  # the batch's state is unknown: fail its rows, start afresh
            self.batch.clear()
            self._fail(rows, exc, out)

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

    def _join(self, states: list[PrefillState], out: StepOutputs) -> None:
        """Sample the first token of each row of the completed ``states`` and merge them into the
        batch (rows of one context share its keys and values); keep their prompts' blocks."""
        if not states:
            return
        requests = [r for state in states for r in state.requests]
        for r in requests:
            if r.params.seed is not None and r.generator is None:
                r.generator = torch.Generator().manual_seed(r.params.seed)
        logits = torch.stack([state.logits for state in states for _ in state.requests])  # type: ignore[misc]
        n = len(requests)
        sb = SamplingBatch.build([r.params for r in requests], self.vocab_size, self.device)
        counts = prompt_mask = None
        if sb.uses_penalties:  # from the tokens, never from the cache: a resumed request's output counts as output
            counts = torch.zeros(n, self.vocab_size, device=self.device)
            prompt_mask = torch.zeros(n, self.vocab_size, dtype=torch.bool, device=self.device)
            for i, r in enumerate(requests):
                prompt_mask[i, torch.tensor(r.prompt_ids, device=self.device)] = True
                if r.output_ids:
                    ids = torch.tensor(r.output_ids, device=self.device)
                    counts[i].index_add_(0, ids, torch.ones(len(ids), device=self.device))
        prompt_failures = send_prompt_logprobs(self.model, requests, out)
        choice = choose(logits, requests, sb, counts, prompt_mask, self._uniforms(requests, sb))
        choice.failed.update(prompt_failures)
        if counts is not None:
            counts.scatter_add_(1, choice.tokens[:, None], torch.ones(n, 1, device=self.device))
        kv_rows = [state.kv for state in states for _ in state.requests]
        self.batch.add(requests, kv_rows, choice.tokens, counts, prompt_mask)  # type: ignore[arg-type]
        if self.prefix_cache is not None:
            for state in states:
                assert state.kv is not None
                self.prefix_cache.insert(state.tokens, state.kv)
        first = self.batch.size - n
        self.batch.remove([first + i for i in self._commit(requests, choice, out)])

    def _commit(self, requests: Sequence[Request], choice: Choice, out: StepOutputs) -> list[int]:
        """Record each row's chosen token (or its failure); returns the rows that ended."""
        ended = []
        for i, (request, token) in enumerate(zip(requests, choice.token_list, strict=True)):
            error = choice.failed.get(i)
            if error is not None:
                self._fail_one(request, error, out)
                ended.append(i)
            elif self._update(request, token, out, choice.logprobs.get(i), i in choice.grammar_done):
                ended.append(i)
        return ended

    def _decode(self, out: StepOutputs) -> None:
        batch = self.batch
        inputs = batch.decode_inputs()
        if self.fast_decoder is not None:
            assert batch.kv is not None
            logits = self.fast_decoder.decode(
                inputs["input_ids"], inputs["position_ids"], inputs["attention_mask"], batch.kv, batch.end
            )
        else:
            logits = last_logits(self.model, self._cache_kwarg, batch.cache, **inputs)  # [B, V]
        self._sample_rows(logits, out)

    def _sample_rows(self, logits: torch.Tensor, out: StepOutputs) -> None:
        """Sample each row's next token from the decode step's ``logits`` [B, V], commit the step,
        and retire the rows that finished."""
        batch = self.batch
        b = batch.size
        sb = batch.sampling
        assert sb is not None
        counts = batch.counts[:b] if batch.counts is not None else None
        prompt_mask = batch.prompt_mask[:b] if batch.prompt_mask is not None else None
        choice = choose(logits, batch.rows, sb, counts, prompt_mask, self._uniforms(batch.rows, sb))
        batch.advance(choice.tokens)
        done = self._commit(batch.rows, choice, out)
        self._keep_prefixes([i for i in done if i not in choice.failed])
        batch.remove(done)

    def _keep_prefixes(self, rows: list[int]) -> None:
        """Keep the blocks of finished rows (prompt and output, as the next turn of a conversation
        resends them) in the prefix cache."""
        if self.prefix_cache is None:
            return
        for i in rows:
            request = self.batch.rows[i]
            tokens = request.prompt_ids + request.output_ids[:-1]  # the last token was never fed
            if len(tokens) == self.batch.row_lengths[i]:
                self.prefix_cache.insert(tokens, self.batch.row_kv(i))

    def _uniforms(self, requests: Sequence[Request], sb: SamplingBatch) -> torch.Tensor | None:
        """One uniform per row: from the request's own generator when seeded, else the engine's."""
        if sb.all_greedy:
            return None
        u = torch.rand(len(requests), generator=self._rng)
        for i, r in enumerate(requests):
            if r.generator is not None and not r.params.greedy:
                u[i] = torch.rand((), generator=r.generator)
        return u.to(self.device)

    def _update(
        self, request: Request, token: int, out: StepOutputs, logprob: TokenLogprob | None, grammar_done: bool
    ) -> bool:
        """Record one new token of a running request; returns True when the request finished
        (eos, a stop token or string, a complete grammar, or max_tokens)."""
        request.output_ids.append(token)
        self.scheduler.record_tokens(1)
        if request.first_token_time is None:
            request.first_token_time = time.perf_counter()
        reason = finish_reason(request, token, grammar_done)
        out.add(request, request.detokenizer.take_delta(final=reason is not None), (token,), reason, logprob=logprob)
        if reason is not None:
            self.scheduler.finish(request, reason)
            log.info(
                "finished",
                request_id=request.request_id,
                reason=reason.value,
                tokens=len(request.output_ids),
                seconds=round(time.perf_counter() - request.arrival_time, 4),
            )
        return reason is not None

    def _fail_one(self, request: Request, exc: BaseException, out: StepOutputs) -> None:
        """End ``request`` with a :class:`GenerationError` caused by ``exc`` (its row is removed by the caller)."""
        if request.finished:
            return
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
