"""The engine thread: schedule -> prefill/decode -> update -> deliver, one step at a time.

One dedicated thread owns the model and the running batch, so the batch outlives any one event
loop, many loops (and sync callers) can submit at once, and torch computes with the GIL released.
Callers talk to it only through :meth:`Engine.submit` and :meth:`Engine.abort`, both thread-safe.
Results go back to each caller's loop with one ``call_soon_threadsafe`` per loop per step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from async_llm.batch import PaddedBatch
from async_llm.log import get_logger
from async_llm.errors import EngineClosedError, GenerationError, QueueFullError, RequestAbortedError
from async_llm.request import FinishReason, Request
from async_llm.sampling import SamplingBatch, apply_penalties, sample
from async_llm.scheduler import Scheduler
from async_llm.stream import TokenStream

log = get_logger("async_llm.engine")


class _Deliveries:
    """One step's results, grouped per event loop so each loop gets one callback per step."""

    def __init__(self) -> None:
        # stream -> [text parts, token ids, finish reason, error]
        self._items: dict[TokenStream, list[Any]] = {}

    def add(
        self,
        request: Request,
        text: str = "",
        token: int | None = None,
        reason: FinishReason | None = None,
        error: BaseException | None = None,
    ) -> None:
        item = self._items.setdefault(request.stream, [[], [], None, None])
        if text:
            item[0].append(text)
        if token is not None:
            item[1].append(token)
        if reason is not None:
            item[2], item[3] = reason, error
        if request.streamer is not None:
            _feed_streamer(request, token, reason)

    def flush(self) -> list[TokenStream]:
        """Hand every loop its results; returns the streams whose loop is gone (to abort)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[TokenStream, str, list[int], Any, Any]]] = {}
        for stream, (parts, tokens, reason, error) in self._items.items():
            by_loop.setdefault(stream.loop, []).append((stream, "".join(parts), tokens, reason, error))
        self._items.clear()
        orphans: list[TokenStream] = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the caller's loop is closed: nobody will read these streams
                orphans.extend(stream for stream, *_ in items)
        return orphans


def _deliver(items: list[tuple[TokenStream, str, list[int], Any, Any]]) -> None:
    for stream, text, tokens, reason, error in items:
        stream._put(text, tokens, reason, error)


def _feed_streamer(request: Request, token: int | None, reason: FinishReason | None) -> None:
    """Feed a transformers streamer (put/end protocol) from the engine thread.

    A streamer that raises is dropped (and logged): the caller's object must not fail the step of
    every other request in the batch.
    """
    streamer = request.streamer
    try:
        if token is not None and not (reason is FinishReason.STOP and token in request.eos_token_ids):
            streamer.put(torch.tensor([token]))
        if reason is not None:
            streamer.end()
    except Exception as exc:
        request.streamer = None
        log.warning("streamer failed; no longer fed", request_id=request.request_id, error=repr(exc))


class Engine:
    """Owns the model, the tokenizer's pad id, the scheduler and the batch; runs on its own thread.

    Args:
        model: A transformers causal LM, already on its device and in eval mode.
        pad_token_id: Id used for left padding (masked out, any valid id works).
        max_batch_size: Most rows decoded together.
        max_queue_size: Most requests waiting for a row; :meth:`submit` raises past it.
        seed: Seed of the engine's generator, used by sampled requests that have no seed of their own.
    """

    def __init__(
        self,
        model: Any,
        pad_token_id: int,
        max_batch_size: int = 32,
        max_queue_size: int = 1024,
        max_prefill_tokens: int = 8192,
        seed: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        self.model = model
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_queue_size = max_queue_size
        self.scheduler = Scheduler(max_batch_size, max_prefill_tokens)
        self.batch = PaddedBatch(
            num_layers=model.config.get_text_config().num_hidden_layers,
            vocab_size=self.vocab_size,
            max_rows=max_batch_size,
            device=self.device,
            dtype=next(model.parameters()).dtype,
        )
        self._rng = torch.Generator()
        if seed is not None:
            self._rng.manual_seed(seed)
        else:
            self._rng.seed()
        self._lock = threading.Condition()
        self._inbox: list[Request] = []
        self._aborts: set[str] = set()
        self._num_waiting = 0  # scheduler.waiting length as of the last step (read by submitters)
        self._closing = False
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="async-llm-engine", daemon=True)
        self._thread.start()

    # -- thread-safe API ----------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request. Raises :class:`QueueFullError` or :class:`EngineClosedError` at once."""
        with self._lock:
            if self._closing:
                raise EngineClosedError("the LLM is closed; create a new one to generate")
            if len(self._inbox) + self._num_waiting >= self.max_queue_size:
                raise QueueFullError(
                    f"request queue is full ({self.max_queue_size} waiting); retry later or raise max_queue_size"
                )
            self._inbox.append(request)
            self._lock.notify()

    def abort(self, request_id: str) -> None:
        """Abort a request wherever it is; its row is freed at the next step."""
        with self._lock:
            self._aborts.add(request_id)
            self._lock.notify()

    def close(self, timeout: float | None = 60.0) -> None:
        """Fail every pending request with :class:`EngineClosedError` and stop the thread. Idempotent."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("engine thread did not stop in time", timeout=timeout)

    @property
    def closed(self) -> bool:
        return self._closing

    def stats(self) -> dict[str, int]:
        """Counters of the engine (a consistent-enough snapshot; no lock on the hot path)."""
        s = self.scheduler
        return {
            "num_running": len(s.running),
            "num_waiting": len(self._inbox) + self._num_waiting,
            "num_finished": s.num_finished,
            "num_aborted": s.num_aborted,
            "num_failed": s.num_failed,
            "peak_batch_size": s.peak_batch_size,
            "tokens_generated": s.tokens_generated,
            "steps": self.steps,
        }

    # -- engine thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        # The whole thread runs in inference mode: batch tensors are created in one step (prefill)
        # and updated in place in another (aborts, evictions), so every step must agree on the mode.
        with torch.inference_mode():
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not (self._inbox or self._aborts or self.scheduler.has_work or self._closing):
                    self._lock.wait()
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, set()
                closing = self._closing
            out = _Deliveries()
            try:
                for request in inbox:
                    self.scheduler.add(request)
                if closing:
                    self._fail_all(out, EngineClosedError("the LLM was closed before this request finished"))
                    return
                self._apply_aborts(aborts, out)
                self._step(out)
            except Exception as exc:
                # A fault outside a model step (a bug, a broken tokenizer): the engine thread must not
                # die with requests waiting on it. Fail what is live and keep serving.
                log.exception("engine step failed", error=repr(exc))
                self.batch.clear()
                self._fail(list(self.scheduler.all_live()), exc, out)
            finally:
                self._num_waiting = len(self.scheduler.waiting)
                for stream in out.flush():  # streams whose loop is gone: nobody will read them
                    self.abort(stream.request_id)

    def _step(self, out: _Deliveries) -> None:
        new = self.scheduler.admit()
        if new:
            for request in new:
                log.info("admitted", request_id=request.request_id, prompt_tokens=request.num_prompt_tokens)
            try:
                self._prefill(new, out)
            except Exception as exc:  # fail only the rows of this prefill; the batch is untouched
                self._fail(new, exc, out)
        if self.batch.size:
            rows = list(self.batch.rows)
            try:
                self._decode(out)
            except Exception as exc:  # the batch's state is unknown: fail its rows and start afresh
                self.batch.clear()
                self._fail(rows, exc, out)
        self.steps += 1

    def _prefill(self, requests: Sequence[Request], out: _Deliveries) -> None:
        n, p = len(requests), max(r.num_prompt_tokens for r in requests)
        ids = torch.full((n, p), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(n, p, dtype=torch.long)
        for i, r in enumerate(requests):  # left padding: prompts are right-aligned
            ids[i, p - r.num_prompt_tokens :] = torch.tensor(r.prompt_ids)
            mask[i, p - r.num_prompt_tokens :] = 1
            if r.params.seed is not None:
                r.generator = torch.Generator().manual_seed(r.params.seed)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        cache = DynamicCache()  # full-attention layers, whatever the model's sliding-window config
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1].float()  # [n, V]
        sb = SamplingBatch.build([r.params for r in requests], self.vocab_size, self.device)
        counts = prompt_mask = None
        if sb.uses_penalties:
            counts = torch.zeros(n, self.vocab_size, device=self.device)
            prompt_mask = torch.zeros(n, self.vocab_size, dtype=torch.bool, device=self.device)
            prompt_mask.scatter_(1, ids, mask.bool())
        tokens = sample(apply_penalties(logits, sb, counts, prompt_mask), sb, self._uniforms(requests, sb))
        if counts is not None:
            counts.scatter_add_(1, tokens[:, None], torch.ones(n, 1, device=self.device))
        self.batch.add(requests, cache, mask, tokens, counts, prompt_mask)
        first = self.batch.size - n
        done = [first + i for i, (r, t) in enumerate(zip(requests, tokens.tolist())) if self._update(r, t, out)]
        self.batch.remove(done)

    def _decode(self, out: _Deliveries) -> None:
        batch = self.batch
        b = batch.size
        logits = self.model(**batch.decode_inputs(), logits_to_keep=1).logits[:, -1].float()  # [B, V]
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

    def _update(self, request: Request, token: int, out: _Deliveries) -> bool:
        """Record one new token of a running request; returns True when the request finished."""
        request.output_ids.append(token)
        self.scheduler.record_tokens(1)
        if request.first_token_time is None:
            request.first_token_time = time.perf_counter()
        reason = None
        if token in request.eos_token_ids and not request.params.ignore_eos:
            reason = FinishReason.STOP
        elif request.detokenizer.add_token(token):
            reason = FinishReason.STOP
        elif len(request.output_ids) >= request.params.max_tokens:
            reason = FinishReason.LENGTH
        out.add(request, request.detokenizer.take_delta(final=reason is not None), token, reason)
        if reason is not None:
            self.scheduler.finish(request, reason)
            log.info(
                "finished", request_id=request.request_id, reason=reason.value,
                tokens=len(request.output_ids), seconds=round(time.perf_counter() - request.arrival_time, 4),
            )
        return reason is not None

    def _apply_aborts(self, request_ids: set[str], out: _Deliveries) -> None:
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

    def _fail(self, requests: Sequence[Request], exc: Exception, out: _Deliveries) -> None:
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

    def _fail_all(self, out: _Deliveries, error: BaseException) -> None:
        for request in self.scheduler.all_live():
            self.scheduler.finish(request, FinishReason.ABORT)
            out.add(request, reason=FinishReason.ABORT, error=error)
        self.batch.clear()
