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
from transformers.cache_utils import DynamicCache

from async_llm.engine.batch import PaddedBatch
from async_llm.engine.fast_decode import FastDecoder, prepare
from async_llm.engine.model_api import PROBE_PROMPTS, cache_kwarg, input_device, last_logits, layer_kv, probe_batch
from async_llm.engine.output import StepOutputs
from async_llm.engine.request import FinishReason, Request
from async_llm.engine.sampler import SamplingBatch, apply_penalties, sample
from async_llm.engine.scheduler import Scheduler, prefill_groups
from async_llm.engine.worker import Worker
from async_llm.errors import GenerationError, RequestAbortedError
from async_llm.log import get_logger

log = get_logger("async_llm.engine.core")


_KV = list[tuple[torch.Tensor, torch.Tensor]]

#: Prompts admitted together are prefilled in several forwards only when that saves at least this
#: share of the compute of one (see :func:`prefill_groups`).
PREFILL_MIN_SAVING = 0.25


def _attention_pair_cost(model: Any) -> float:
    """Attention FLOPs of one (query, key) pair over linear-layer FLOPs of one token, for the
    prefill cost model: ``4 * heads * head_dim * layers`` over twice the non-embedding parameters."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    embeddings = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    params = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    return float(4 * heads * head_dim * config.num_hidden_layers / max(2 * params, 1))


def _can_pack(model: Any) -> bool:
    """Whether prefills may pack prompts with a custom 4-D mask: SDPA attention (which takes one as
    given), and no sliding-window layers (their own mask would be replaced by it)."""
    config = model.config.get_text_config()
    sliding = getattr(config, "sliding_window", None) or "sliding_attention" in (
        getattr(config, "layer_types", None) or ()
    )
    return getattr(model.config, "_attn_implementation", None) == "sdpa" and not sliding


class Engine(Worker):
    """Continuous batching: owns the scheduler and the padded batch; runs on its own thread.

    Args:
        model: A transformers causal LM, already on its device and in eval mode.
        pad_token_id: Id used for left padding (masked out, any valid id works).
        max_batch_size: Most rows decoded together.
        max_queue_size: Most requests waiting for a row; :meth:`submit` raises past it.
        max_prefill_tokens: Most prompt tokens prefilled in one step.
        prefill_overhead_tokens: The fixed cost of one forward, in tokens of compute: prompts
            admitted together are split into prefill batches by length when the padding saved is
            worth more than the extra forwards. The default, 48 on CPU and 512 elsewhere, is the
            time of one forward at no tokens divided by the time of one more token, measured with
            ``benchmarks/profile_step.py`` on the default model and rounded up: erring toward fewer
            forwards (on an accelerator, kernel launches dominate a small forward).
        seed: Seed of the engine's generator, used by sampled requests that have no seed of their own.
        fast_path: Prefill and decode with :mod:`async_llm.engine.fast_decode` where it applies
            (checked on the model when the engine starts; otherwise, or when False, the
            transformers forward).
    """

    def __init__(
        self,
        model: Any,
        pad_token_id: int,
        max_batch_size: int = 32,
        max_queue_size: int = 1024,
        max_prefill_tokens: int = 8192,
        seed: int | None = None,
        prefill_overhead_tokens: int | None = None,
        fast_path: bool = True,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        super().__init__("async-llm-engine", Scheduler(max_batch_size, max_prefill_tokens), max_queue_size)
        self.model = model
        self.pad_token_id = pad_token_id
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self._cache_kwarg = cache_kwarg(model)
        self._rng = torch.Generator()
        if seed is not None:
            self._rng.manual_seed(seed)
        else:
            self._rng.seed()
        self.batch = self._new_batch()
        if prefill_overhead_tokens is None:
            prefill_overhead_tokens = 48 if self.device.type == "cpu" else 512
        self.prefill_overhead_tokens = prefill_overhead_tokens
        self._pair_cost = _attention_pair_cost(model)
        self.fast_path = fast_path
        # Decided when the engine starts (on its own thread, see _prepare): both run the model.
        self._can_pack = False
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
        self._prepare()  # the fast step holds the weights of the old device

    def _prepare(self) -> None:
        """Checks that run the model, once, on the engine's thread before its first step: whether
        packed prefills agree with padded ones, and whether the fast decode step applies."""
        self._can_pack = _can_pack(self.model) and self._packing_agrees()
        why: str | None = "fast_path=False"
        self.fast_decoder = None
        if self.fast_path:
            hint = min(16, self.scheduler.max_batch_size)
            self.fast_decoder, why = prepare(self.model, self.pad_token_id, self._cache_kwarg, batch_hint=hint)
        if self.fast_decoder is None:
            log.info("fast decode step off; decoding with the transformers forward", reason=why)

    # -- Worker hooks (engine thread) -------------------------------------------------------------------
    def _accept(self, requests: list[Request]) -> None:
        for request in requests:
            self.scheduler.add(request)

    def _fail_live(self, error: BaseException, out: StepOutputs, reason_closed: bool) -> None:
        self.batch.clear()
        if reason_closed:
            for request in self.scheduler.all_live():
                self.scheduler.finish(request, FinishReason.ABORT)
                out.add(request, reason=FinishReason.ABORT, error=error)
        else:
            self._fail(list(self.scheduler.all_live()), error, out)

    def _step(self, out: StepOutputs, admit: bool = True) -> bool:
        """schedule -> prefill the admitted -> one decode step of the batch -> (outputs flushed by the worker)."""
        new = self.scheduler.admit() if admit else []
        groups = self._prefill_batches(new)
        for g, (group, packed) in enumerate(groups):
            if not self._run_prefill(group, packed, [r for later, _ in groups[g + 1 :] for r in later], out):
                break
            self._flush(out)  # first tokens go out now, not after the batch's decode forward
        if self.batch.size:
            self._run_decode(out)
        return bool(new or self.batch.size)

    def _run_prefill(self, group: list[Request], packed: bool, later: list[Request], out: StepOutputs) -> bool:
        """Prefill ``group`` and merge it into the batch; a failure fails only these rows. Returns
        False when out of memory (``group`` and ``later`` then wait for a smaller batch)."""
        for request in group:
            event = "resumed" if request.output_ids else "admitted"
            log.info(event, request_id=request.request_id, prompt_tokens=request.num_prompt_tokens)
        try:
            self._prefill(group, out, packed)
        except torch.OutOfMemoryError as exc:
            self._out_of_memory([*group, *later], exc, out)
            return False
        except Exception as exc:  # noqa: BLE001  # any failure fails these rows only; the batch is untouched
            self._fail(group, exc, out)
        return True

    def _run_decode(self, out: StepOutputs) -> None:
        """One decode step of every running row; a failure fails the batch's rows (its state is unknown)."""
        rows = list(self.batch.rows)
        try:
            self._decode(out)
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

    def _prefill_batches(self, requests: list[Request]) -> list[tuple[list[Request], bool]]:
        """The admitted requests in the prefill forwards that cost the least (see
        :func:`prefill_groups`), each padded or packed; requests with the same context stay together
        (they share one row of the forward)."""
        if len(requests) == 1 or self.fast_decoder is not None:  # the fast prefill computes no padding
            return [(requests, self.fast_decoder is not None)] if requests else []
        by_context: dict[tuple[int, ...], list[Request]] = {}
        for r in requests:
            by_context.setdefault(tuple(r.context_ids), []).append(r)
        contexts = list(by_context.values())
        groups = prefill_groups(
            [len(c[0].context_ids) for c in contexts],
            self.prefill_overhead_tokens,
            self._pair_cost,
            self._can_pack,
            min_saving=PREFILL_MIN_SAVING,
        )
        return [([r for i in group for r in contexts[i]], packed) for group, packed in groups]

    def _prefill(self, requests: Sequence[Request], out: StepOutputs, packed: bool = False) -> None:
        for r in requests:
            if r.params.seed is not None and r.generator is None:
                r.generator = torch.Generator().manual_seed(r.params.seed)
        # Rows with the same prompt (the n completions of one request) share one prefill row.
        unique: dict[tuple[int, ...], int] = {}
        row_of = [unique.setdefault(tuple(r.context_ids), len(unique)) for r in requests]
        prompts = list(unique)
        n, u, p = len(requests), len(prompts), max(len(k) for k in prompts)
        ids = torch.full((u, p), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(u, p, dtype=torch.long)
        for i, prompt in enumerate(prompts):  # left padding: prompts are right-aligned
            ids[i, p - len(prompt) :] = torch.tensor(prompt)
            mask[i, p - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        if self.fast_decoder is not None:
            logits, kv = self.fast_decoder.prefill(prompts, p)
        elif packed:
            logits, kv = self._forward_packed(prompts, p)
        else:
            logits, kv = self._forward_padded(ids, mask)
        if u < n:
            index = torch.tensor(row_of, device=self.device)
            kv = [(keys.index_select(0, index), values.index_select(0, index)) for keys, values in kv]
            ids, mask, logits = ids[index], mask[index], logits[index]
        sb = SamplingBatch.build([r.params for r in requests], self.vocab_size, self.device)
        counts = prompt_mask = None
        if sb.uses_penalties:
            counts = torch.zeros(n, self.vocab_size, device=self.device)
            prompt_mask = torch.zeros(n, self.vocab_size, dtype=torch.bool, device=self.device)
            prompt_mask.scatter_(1, ids, mask.bool())
            for i, r in enumerate(requests):  # a resumed request's earlier output counts as output
                if r.output_ids:
                    prompt_mask[i] = False
                    prompt_mask[i, r.prompt_ids] = True
                    counts[i].index_add_(
                        0,
                        torch.tensor(r.output_ids, device=self.device),
                        torch.ones(len(r.output_ids), device=self.device),
                    )
        tokens = sample(apply_penalties(logits, sb, counts, prompt_mask), sb, self._uniforms(requests, sb))
        if counts is not None:
            counts.scatter_add_(1, tokens[:, None], torch.ones(n, 1, device=self.device))
        self.batch.add(requests, kv, mask, tokens, counts, prompt_mask)
        first = self.batch.size - n
        done = [first + i for i, (r, t) in enumerate(zip(requests, tokens.tolist())) if self._update(r, t, out)]
        self.batch.remove(done)

    def _forward_padded(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, _KV]:
        """Prefill left-padded ``ids`` [u, P]: last-token logits [u, V] and per layer (keys, values) [u, H, P, D]."""
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        cache = DynamicCache()  # full-attention layers, whatever the model's sliding-window config
        logits = last_logits(
            self.model, self._cache_kwarg, cache, input_ids=ids, attention_mask=mask, position_ids=positions
        )
        return logits, [layer_kv(layer) for layer in cache.layers]

    def _packing_agrees(self) -> bool:
        """Check once, on two short prompts, that a packed prefill gives this model's padded logits.
        An architecture that does not honour a custom 4-D mask, or derives something else from the
        2-D one (ALiBi biases, for one), would not; it then keeps padded prefills only."""
        ids, mask = probe_batch(self.pad_token_id, self.device)
        try:
            with torch.inference_mode():
                padded, _ = self._forward_padded(ids, mask)
                packed, _ = self._forward_packed(list(PROBE_PROMPTS), ids.shape[1])
        except torch.OutOfMemoryError:
            raise  # not a property of the architecture: the model does not fit, say so
        except Exception as exc:  # noqa: BLE001  # whatever the model rejects, padded prefills remain
            log.info("packed prefill unavailable", error=repr(exc))
            return False
        agrees = bool((padded - packed).abs().max() <= 0.02 * padded.abs().max())
        if not agrees:
            log.info("packed prefill disagrees with padded prefill for this model; prefills stay padded")
        return agrees

    def _forward_packed(self, prompts: list[tuple[int, ...]], p: int) -> tuple[torch.Tensor, _KV]:
        """Prefill ``prompts`` packed into one sequence (no padding): each attends only to itself,
        causally, through a block-diagonal 4-D mask, with positions restarting at 0 for each. Returns
        the same as :meth:`_forward_padded`, the keys and values gathered into left-padded rows."""
        device = self.device
        lengths = torch.tensor([len(x) for x in prompts])
        total, u = int(lengths.sum()), len(prompts)
        ids = torch.tensor([t for x in prompts for t in x], device=device)[None]  # [1, T]
        segment = torch.repeat_interleave(torch.arange(u), lengths).to(device)  # [T]
        starts = (torch.cumsum(lengths, 0) - lengths).to(device)
        positions = torch.arange(total, device=device) - starts[segment]
        column = torch.arange(total, device=device)
        allowed = (segment[:, None] == segment[None, :]) & (column[None, :] <= column[:, None])  # [T, T]
        ends = starts + lengths.to(device) - 1
        cache = DynamicCache()
        logits = (
            self.model(
                input_ids=ids,
                attention_mask=allowed[None, None],
                position_ids=positions[None],
                use_cache=True,
                logits_to_keep=ends,
                **{self._cache_kwarg: cache},
            )
            .logits[0]
            .float()
        )  # [u, V]: the last token of each prompt
        # Row i, column c of the padded layout holds packed position starts[i] + c - (p - len_i);
        # columns left of the prompt read position 0 (any will do: batch.add zeroes padding).
        source = (starts[:, None] + torch.arange(p, device=device)[None, :] - (p - lengths.to(device))[:, None]).clamp_(
            min=0
        )
        flat = source.reshape(-1)
        kv = []
        for layer in cache.layers:  # [1, H, T, D] -> [u, H, P, D]
            keys, values = (
                t[0].index_select(1, flat).view(t.shape[1], u, p, -1).transpose(0, 1) for t in layer_kv(layer)
            )
            kv.append((keys, values))
        return logits, kv

    def _decode(self, out: StepOutputs) -> None:
        batch = self.batch
        b = batch.size
        inputs = batch.decode_inputs()
        if self.fast_decoder is not None:
            assert batch.kv is not None
            logits = self.fast_decoder.decode(
                inputs["input_ids"], inputs["position_ids"], inputs["attention_mask"], batch.kv, batch.end
            )
        else:
            logits = last_logits(self.model, self._cache_kwarg, batch.cache, **inputs)  # [B, V]
        sb = batch.sampling
        assert sb is not None
        counts = batch.counts[:b] if batch.counts is not None else None
        prompt_mask = batch.prompt_mask[:b] if batch.prompt_mask is not None else None
        tokens = sample(apply_penalties(logits, sb, counts, prompt_mask), sb, self._uniforms(batch.rows, sb))
        batch.advance(tokens)
        done = [i for i, (r, t) in enumerate(zip(batch.rows, tokens.tolist())) if self._update(r, t, out)]
        batch.remove(done)

    def _uniforms(self, requests: Sequence[Request], sb: SamplingBatch) -> torch.Tensor | None:
        """One uniform per row: from the request's own generator when seeded, else the engine's."""
        if sb.all_greedy:
            return None
        u = torch.rand(len(requests), generator=self._rng)
        for i, r in enumerate(requests):
            if r.generator is not None and not r.params.greedy:
                u[i] = torch.rand((), generator=r.generator)
        return u.to(self.device)

    def _update(self, request: Request, token: int, out: StepOutputs) -> bool:
        """Record one new token of a running request; returns True when the request finished."""
        request.output_ids.append(token)
        self.scheduler.record_tokens(1)
        if request.first_token_time is None:
            request.first_token_time = time.perf_counter()
        reason = None
        if token in request.eos_token_ids and not request.params.ignore_eos or request.detokenizer.add_token(token):
            reason = FinishReason.STOP
        elif len(request.output_ids) >= request.params.max_tokens:
            reason = FinishReason.LENGTH
        out.add(request, request.detokenizer.take_delta(final=reason is not None), (token,), reason)
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

    def _fail(self, requests: Sequence[Request], exc: BaseException, out: StepOutputs) -> None:
        for request in requests:
            if request.finished:
                continue
            self.scheduler.finish(request, FinishReason.ERROR)
            error = GenerationError(f"generation failed: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            out.add(request, reason=FinishReason.ERROR, error=error)
            log.error("failed", request_id=request.request_id, error=repr(exc))
        # Rows of failed requests may already sit in the batch (a step can fail after merging them).
        self.batch.remove([i for i, r in enumerate(self.batch.rows) if r.finished])
