"""The update phase of the engine's step: sample each row's next token, apply the finish rule, free
finished rows and emit each request's new tokens to its sink.

:class:`StepUpdate` is mixed into the :class:`~async_llm.engine.core.Engine` (engine thread only): it
reads the batch, the scheduler and the prefix cache the engine owns.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from async_llm.engine.draws import uniforms
from async_llm.engine.finish import finish_reason
from async_llm.engine.logprobs import (
    logprob_records,
    logprob_tensors,
    prompt_logprobs,
    raw_log_softmax,
    rows_wanting_logprobs,
)
from async_llm.engine.output import StepOutputs, TokenLogprob
from async_llm.engine.sampler import Choice, SamplingBatch, apply_penalties, choose, sample
from async_llm.engine.speculative import RowSpeculation, SpeculativeConfig, accept
from async_llm.engine.transfer import device_tensor
from async_llm.log import get_logger
from async_llm.sampling_params import MAX_SEED

if TYPE_CHECKING:
    from async_llm.engine.batch import BatchRows
    from async_llm.engine.prefill import PrefillState
    from async_llm.engine.prefix_cache import PrefixCache
    from async_llm.engine.request import Request
    from async_llm.engine.scheduler import Scheduler

log = get_logger("async_llm.engine.update")


@dataclass
class Ahead:
    """An overlapped decode step whose tokens are on their way to the host.

    Attributes:
        rows: The batch's requests when the step ran, in row order.
        tokens: ``[B]`` their tokens (pinned host memory on CUDA, being copied).
        copied: Recorded after the copy was queued (None off CUDA: the copy is done).
        logprobs: The rows that report logprobs, and their chosen token's log-probability ``[k]``
            and best alternatives ``[k, K]`` (values, ids), copied with the tokens.
    """

    rows: list[Request]
    tokens: torch.Tensor
    copied: torch.cuda.Event | None
    logprobs: tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class StepUpdate:
    """Sampling, the finish rule and outputs, for the rows a forward computed."""

    model: Any
    batch: BatchRows
    scheduler: Scheduler
    prefix_cache: PrefixCache | None
    vocab_size: int
    device: torch.device
    _rng: torch.Generator

    if TYPE_CHECKING:  # the engine's (core.py): fail one request, its row removed by the caller

        def _fail_one(self, request: Request, exc: BaseException, out: StepOutputs) -> None: ...

    def _sample_rows(self, logits: torch.Tensor, out: StepOutputs) -> None:
        """Sample each row's next token from the decode step's ``logits`` [B, V], commit the step,
        and retire the rows that finished."""
        batch = self.batch
        sb = batch.sampling
        assert sb is not None
        counts, prompt_mask = batch.penalty_state()
        choice = choose(logits, batch.rows, sb, counts, prompt_mask, self._uniforms(batch.rows, sb))
        batch.advance(choice.tokens)
        done = self._commit(batch.rows, choice, out)
        self._keep_prefixes([i for i in done if i not in choice.failed])
        batch.remove(done)

    def _join(self, states: list[PrefillState], out: StepOutputs) -> None:
        """Sample the first token of each row of the completed ``states`` and merge them into the
        batch (rows of one context share its keys and values); keep their prompts' blocks."""
        if not states:
            return
        requests = [r for state in states for r in state.requests]
        logits = torch.stack([state.logits for state in states for _ in state.requests])  # type: ignore[misc]
        n = len(requests)
        sb = SamplingBatch.build([r.params for r in requests], self.vocab_size, self.device)
        counts = prompt_mask = None
        if sb.uses_penalties:  # from the tokens, never from the cache: a resumed request's output counts as output
            counts = torch.zeros(n, self.vocab_size, device=self.device)
            prompt_mask = torch.zeros(n, self.vocab_size, dtype=torch.bool, device=self.device)
            for i, r in enumerate(requests):
                prompt_mask[i, device_tensor(r.prompt_ids, device=self.device)] = True
                if r.output_ids:
                    ids = device_tensor(r.output_ids, device=self.device)
                    counts[i].index_add_(0, ids, torch.ones(len(ids), device=self.device))
        prompt_failures = self._send_prompt_logprobs(requests, out)
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

    def _send_prompt_logprobs(self, requests: Sequence[Request], out: StepOutputs) -> dict[int, BaseException]:
        """Add the prompt logprobs of the ``requests`` that ask for them to ``out`` (once per request,
        with its first token). Returns the requests (by position) whose forward failed: they fail,
        the others go on."""
        failures: dict[int, BaseException] = {}
        for i, r in enumerate(requests):
            if r.params.prompt_logprobs is None or r.prompt_logprobs_sent:
                continue
            try:
                out.add(r, prompt_logprobs=prompt_logprobs(self.model, r.prompt_ids, r.params.prompt_logprobs))
                r.prompt_logprobs_sent = True
            except Exception as exc:  # noqa: BLE001  # fails this request only
                failures[i] = exc
        return failures

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

    def _keep_prefixes(self, rows: list[int]) -> None:
        """Keep the blocks of finished rows (prompt and output, as the next turn of a conversation
        resends them) in the prefix cache."""
        if self.prefix_cache is None:
            return
        for i in rows:
            request = self.batch.rows[i]
            tokens = request.prompt_ids + request.output_ids[:-1]  # the last token was never fed
            # An overlapped row computed one step past its end: its columns start with these tokens.
            if len(tokens) <= self.batch.row_lengths[i]:
                self.prefix_cache.insert(tokens, self.batch.row_kv(i)[:, :, :, : len(tokens)])

    # -- overlapped decode steps ------------------------------------------------------------------------
    def _decode_ahead(self, logits: torch.Tensor) -> Ahead:
        """Sample every row's next token from ``logits`` [B, V] and feed it to the next step, all on
        the device; the tokens' copy to the host is started, not waited for (see :meth:`_commit_ahead`)."""
        batch = self.batch
        sb = batch.sampling
        assert sb is not None
        counts, prompt_mask = batch.penalty_state()
        rows = list(batch.rows)
        lp_rows = rows_wanting_logprobs(rows)
        lp_index = device_tensor(lp_rows, dtype=torch.long, device=logits.device) if lp_rows else None
        raw = raw_log_softmax(logits, lp_index) if lp_index is not None else None  # before sampling
        tokens = sample(apply_penalties(logits, sb, counts, prompt_mask), sb, self._uniforms(rows, sb))
        parts = [tokens]
        if raw is not None and lp_index is not None:  # the raw distribution's records, on the device
            top_k = max(rows[i].params.top_logprobs for i in lp_rows)
            parts += logprob_tensors(raw, tokens.index_select(0, lp_index), top_k)
        if tokens.device.type == "cuda":  # every part on its way to pinned memory, then one event
            hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in parts]
            for host, part in zip(hosts, parts, strict=True):
                host.copy_(part, non_blocking=True)
            parts = hosts
            done: torch.cuda.Event | None = torch.cuda.Event()  # type: ignore[no-untyped-call]
            assert done is not None
            done.record(torch.cuda.current_stream(tokens.device))
        else:
            done = None
        # Last: anything above may fail (out of memory) with the batch as it was, and no token lost.
        batch.advance(tokens)
        logprobs = (lp_rows, parts[1], parts[2], parts[3]) if len(parts) > 1 else None
        return Ahead(rows, parts[0], done, logprobs)

    def _commit_ahead(self, ahead: Ahead, out: StepOutputs) -> None:
        """Record the tokens of an overlapped step (waiting for their copy) and retire the rows that
        finished. A row that ended at the step before (or was aborted since) computed this step
        too: its token is dropped."""
        if ahead.copied is not None:
            ahead.copied.synchronize()
        tokens = ahead.tokens.tolist()
        records: dict[int, TokenLogprob] = {}
        if ahead.logprobs is not None:
            lp_rows, chosen, values, indices = ahead.logprobs
            picked = [tokens[i] for i in lp_rows]
            records = logprob_records(lp_rows, ahead.rows, picked, chosen.tolist(), values.tolist(), indices.tolist())
        ended = []
        for i, (request, token) in enumerate(zip(ahead.rows, tokens, strict=True)):
            if not request.finished and self._update(request, token, out, records.get(i), False):
                ended.append(request)
        if ended:
            where = {id(r): i for i, r in enumerate(self.batch.rows)}
            rows = [where[id(r)] for r in ended if id(r) in where]
            self._keep_prefixes(rows)
            self.batch.remove(rows)

    # -- speculative verify steps ------------------------------------------------------------------------
    speculative_config: SpeculativeConfig | None
    spec_draft_tokens: int
    spec_accepted_tokens: int
    spec_verify_steps: int

    def _row_speculation(self, request: Request) -> SpeculativeConfig | None:
        """The speculation ``request`` asks for (its own ``speculative_config``, else the engine's),
        None where it does not speculate: off, or a row whose next token depends on more than its
        logits (token controls, penalties) or that reports logprobs (see :mod:`.speculative`)."""
        own = request.params.speculative_config
        config = self.speculative_config if own is None else own or None
        if config is None or request.controls is not None or request.params.logprobs:
            return None
        p = request.params
        if p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
            return None
        assert isinstance(config, SpeculativeConfig)
        return config

    def _drafts(self) -> list[list[int]] | None:
        """Each row's draft for a verify step, or None when the step decodes plainly (no row has a
        draft, or the batch is past a row's ``disable_by_batch_size``)."""
        rows = self.batch.rows
        drafts: list[list[int]] = []
        for request in rows:
            config = self._row_speculation(request)
            if config is None or len(rows) > config.disable_by_batch_size:
                drafts.append([])
                continue
            if request.speculation is None:
                request.speculation = RowSpeculation(config)
            room = request.params.max_tokens - len(request.output_ids) - 1  # the step adds one more
            drafts.append(request.speculation.draft(request.prompt_ids, request.output_ids)[: max(room, 0)])
        return drafts if any(drafts) else None

    def _verify_rows(self, drafts: list[list[int]], out: StepOutputs) -> None:
        """One verify step: every row's last token and draft in one forward, the draft tokens each
        row accepts and one more emitted (rows without a draft decode one token, through the usual
        choice: controls, penalties, logprobs); then the finished rows retire."""
        batch = self.batch
        rows = list(batch.rows)
        positions = 1 + max(len(d) for d in drafts)
        logits = self.runner.verify(batch, drafts, positions)  # type: ignore[attr-defined]  # [B, T, V]
        emitted: list[list[int]] = [[] for _ in rows]
        plain = [i for i, d in enumerate(drafts) if not d]
        speculating = [i for i, d in enumerate(drafts) if d]
        choice = None
        if plain:
            requests = [rows[i] for i in plain]
            sb = SamplingBatch.build([r.params for r in requests], self.vocab_size, self.device)
            counts, prompt_mask = batch.penalty_state()
            index = device_tensor(plain, device=self.device)
            choice = choose(
                logits[index, 0],
                requests,
                sb,
                None if counts is None else counts[index],
                None if prompt_mask is None else prompt_mask[index],
                self._uniforms(requests, sb),
            )
            for i, token in zip(plain, choice.token_list, strict=True):
                emitted[i] = [token]
        if speculating:
            self._accept_drafts(logits, rows, drafts, speculating, positions, emitted)
        fed = [len(e) for e in emitted]
        batch.advance_verify(fed, positions, device_tensor([e[-1] for e in emitted], device=self.device))
        self.spec_verify_steps += 1
        ended = []
        failed = set()
        where = {i: j for j, i in enumerate(plain)}
        for i, (request, tokens) in enumerate(zip(rows, emitted, strict=True)):
            j = where.get(i)
            if choice is not None and j is not None:
                error = choice.failed.get(j)
                if error is not None:
                    self._fail_one(request, error, out)
                    ended.append(i)
                    failed.add(i)
                    continue
                if self._update(request, tokens[0], out, choice.logprobs.get(j), j in choice.grammar_done):
                    ended.append(i)
                continue
            for token in tokens:
                if self._update(request, token, out, None, False):
                    ended.append(i)
                    break
        self._keep_prefixes([i for i in ended if i not in failed])
        batch.remove(ended)

    def _accept_drafts(
        self,
        logits: torch.Tensor,
        rows: Sequence[Request],
        drafts: Sequence[Sequence[int]],
        speculating: Sequence[int],
        positions: int,
        emitted: list[list[int]],
    ) -> None:
        """Fill ``emitted`` for the ``speculating`` rows (see :func:`~.speculative.accept`) and count
        their drafted and accepted tokens."""
        requests = [rows[i] for i in speculating]
        greedy = [r.params.greedy for r in requests]
        sampling = None
        seeds, counters = [0] * len(requests), [0] * len(requests)
        if not all(greedy):
            sb = SamplingBatch.build([r.params for r in requests], self.vocab_size, self.device)
            sampling = {"temperature": sb.temperature, "top_k": sb.top_k, "top_p": sb.top_p, "min_p": sb.min_p}
            seeds, counters = self._take_draws(requests, 2 * positions)  # see speculative.accept
        index = device_tensor(list(speculating), device=logits.device)
        tokens = accept(logits[index], [drafts[i] for i in speculating], greedy, sampling, seeds, counters)
        for i, r, out in zip(speculating, requests, tokens, strict=True):
            emitted[i] = out
            accepted = len(out) - 1
            self.spec_draft_tokens += len(drafts[i])
            self.spec_accepted_tokens += accepted
            assert r.speculation is not None
            r.speculation.record(len(drafts[i]), accepted, len(r.output_ids) + len(out))

    def _uniforms(self, requests: Sequence[Request], sb: SamplingBatch) -> torch.Tensor | None:
        """One uniform in [0, 1) per row (``[B]`` float32 on the engine's device), or ``None`` when
        every row is greedy.

        A sampled row's draw is a pure function of its request's seed and draw count, computed on
        the device (:func:`~async_llm.engine.draws.uniforms`): the only host->device traffic is one queued
        ``[2, B]`` copy of Python ints, and nothing is read back. A request without a seed of its own
        takes one from the engine's generator when it first samples (so the engine's ``seed`` keeps
        runs reproducible). Greedy rows draw nothing; their value is ignored.
        """
        if sb.all_greedy:
            return None
        seeds, counters = self._take_draws(requests, 1)
        rows = device_tensor([seeds, counters], dtype=torch.long, device=self.device)  # [2, B], queued
        return uniforms(rows[0], rows[1])

    def _take_draws(self, requests: Sequence[Request], count: int) -> tuple[list[int], list[int]]:
        """Each sampled request's draw seed and the index of the first of the ``count`` draws it
        takes now (its draw count moves past them); greedy requests get ``(0, 0)`` and draw nothing.
        A request without a seed of its own takes one from the engine's generator when it first
        samples (a CPU generator: reading its draw is no device sync)."""
        seeds, counters = [0] * len(requests), [0] * len(requests)
        for i, r in enumerate(requests):
            if r.params.greedy:
                continue
            if r.draw_seed is None:
                seed = r.params.seed
                if seed is None:
                    seed = int(torch.randint(MAX_SEED - 1, (), generator=self._rng))
                r.draw_seed = seed
            seeds[i], counters[i] = r.draw_seed, r.draws
            r.draws += count
        return seeds, counters

    def _update(
        self, request: Request, token: int, out: StepOutputs, logprob: TokenLogprob | None, grammar_done: bool
    ) -> bool:
        """Record one new token of a running request and emit it; returns True when the request
        finished (see :func:`~async_llm.engine.finish.finish_reason`)."""
        request.output_ids.append(token)
        self.scheduler.record_tokens(1)
        request.last_progress = time.perf_counter()
        if request.first_token_time is None:
            request.first_token_time = request.last_progress
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
