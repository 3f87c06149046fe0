"""The plain-transformers baselines: one ``model.generate`` per request (sequential), per batch
collected in a window (static batching), and transformers' own continuous batching.

Timestamps: the sequential and static baselines take a streamer's ``put`` per decoding step (on CPU
``generate`` calls it right after each step's token is chosen); the static baseline streams too, so
its time to first token is when its batch's first token came out, not when the whole batch
returned. transformers-cb: per streamed output taken off the manager's queue by the consuming thread.
"""

from __future__ import annotations

import inspect
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from async_llm.bench.metrics import RequestRecord
from async_llm.bench.runner import OnDone, Runner, SystemConfig, load_hf, new_records, pad_id, sleep_until
from async_llm.bench.workloads import RequestSpec

__all__ = ["SequentialRunner", "StaticBatchRunner", "TransformersCBRunner"]


class _StepTimes:
    """A ``generate`` streamer that only timestamps each decoding step (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


class _GenerateRunner(Runner):
    """Shared by the plain-transformers baselines: one padded ``model.generate`` call per batch."""

    def load(self) -> None:
        self.model, self.tokenizer = load_hf(self.config)
        self.pad = pad_id(self.tokenizer, self.model)

    def _generate(self, batch: Sequence[RequestSpec]) -> list[float]:
        """Generate for ``batch`` (left-padded to its longest prompt); returns the step timestamps."""
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        new = max(r.max_new_tokens for r in batch)
        streamer = _StepTimes()
        with torch.inference_mode():
            # min_new_tokens = max_new_tokens: exactly `new` tokens, eos never ends a row early.
            self.model.generate(
                ids.to(self.config.device),
                attention_mask=mask.to(self.config.device),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=self.pad,
                streamer=streamer,
            )
        return streamer.times


class SequentialRunner(_GenerateRunner):
    name = "transformers-sequential"
    description = "plain transformers, one model.generate call per request, first come first served"

    def run(self, requests: Sequence[RequestSpec], on_done: OnDone) -> tuple[list[RequestRecord], float]:
        start = time.perf_counter()
        records = new_records(requests, start)
        for spec, record in sorted(zip(requests, records), key=lambda pair: pair[1].arrival):
            sleep_until(record.arrival)
            record.token_times = self._generate([spec])[: spec.max_new_tokens]
            on_done(1)
        return records, start


class StaticBatchRunner(_GenerateRunner):
    name = "transformers-static"
    description = (
        "transformers static batching: up to max_batch_size requests collected in a window (from the first "
        "waiting request's arrival), one left-padded model.generate per batch"
    )

    def run(self, requests: Sequence[RequestSpec], on_done: OnDone) -> tuple[list[RequestRecord], float]:
        start = time.perf_counter()
        records = new_records(requests, start)
        pending = deque(sorted(zip(requests, records), key=lambda pair: pair[1].arrival))
        limit, window = self.config.max_batch_size, self.config.static_window_s
        batches = 0
        while pending:
            sleep_until(pending[0][1].arrival)
            close_at = pending[0][1].arrival + window
            # Wait for the batch to fill, at most until the window closes (a request that waited through
            # the previous batch has already used its window: go at once). Like a real server, it does
            # not know whether more requests are coming, so a partial batch waits out its window.
            while True:
                now = time.perf_counter()
                arrived = sum(1 for _, r in pending if r.arrival <= now)
                if arrived >= limit or now >= close_at:
                    break
                nxt = pending[arrived][1].arrival if arrived < len(pending) else math.inf
                sleep_until(min(close_at, nxt))
            now = time.perf_counter()
            batch: list[tuple[RequestSpec, RequestRecord]] = []
            while pending and len(batch) < limit and pending[0][1].arrival <= now:
                batch.append(pending.popleft())
            times = self._generate([spec for spec, _ in batch])
            for spec, record in batch:
                record.token_times = times[: spec.max_new_tokens]
                on_done(1)
            batches += 1
        self.extra = {"batches": batches}
        return records, start


#: transformers-cb sizing: KV pages of 64 tokens; at most this many tokens per forward (prefill chunking).
CB_PAGE_SIZE = 64
CB_MAX_BATCH_TOKENS = 4096


class TransformersCBRunner(Runner):
    name = "transformers-cb"
    description = (
        "transformers' own continuous batching (init_continuous_batching, paged KV cache, streaming outputs), "
        f"sized for the workload: pages of {CB_PAGE_SIZE} tokens, {CB_MAX_BATCH_TOKENS} tokens per step"
    )

    @classmethod
    def unavailable(cls, config: SystemConfig) -> str | None:
        from transformers import GenerationMixin

        if not hasattr(GenerationMixin, "init_continuous_batching"):
            return "this transformers version has no init_continuous_batching (needs transformers >= 5)"
        return None

    def load(self) -> None:
        from transformers import GenerationConfig

        self.model, self.tokenizer = load_hf(self.config)
        # eos_token_id=-1: no eos, every request runs to its max_new_tokens.
        self.generation_config = GenerationConfig(
            do_sample=False, eos_token_id=-1, pad_token_id=pad_id(self.tokenizer, self.model), max_new_tokens=16
        )

    def _manager(self, requests: Sequence[RequestSpec]) -> Any:
        from transformers import ContinuousBatchingConfig

        # Left unsized, the cache is sized from free memory (many GiB on a CPU host, slow to allocate).
        longest = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
        rows = min(len(requests), self.config.max_batch_size)
        # The page's size is ``page_size`` in recent transformers, ``block_size`` before (5.17).
        page = "page_size" if "page_size" in inspect.signature(ContinuousBatchingConfig).parameters else "block_size"
        sizing: dict[str, Any] = {page: CB_PAGE_SIZE}
        cb_config = ContinuousBatchingConfig(
            **sizing,
            num_blocks=rows * (math.ceil(longest / CB_PAGE_SIZE) + 1) + 8,
            max_batch_tokens=CB_MAX_BATCH_TOKENS,
            max_requests_per_batch=self.config.max_batch_size,
            seed=0,
        )
        manager = self.model.init_continuous_batching(
            generation_config=self.generation_config, continuous_batching_config=cb_config
        )
        manager.start()
        while manager.batch_processor is None:  # the cache is allocated on the manager's thread
            if not manager.is_running():
                raise RuntimeError("transformers continuous batching failed to start")
            time.sleep(0.005)
        return manager

    def run(self, requests: Sequence[RequestSpec], on_done: OnDone) -> tuple[list[RequestRecord], float]:
        manager = self._manager(requests)
        try:
            return self._run(manager, requests, on_done)
        finally:
            manager.stop(block=True, timeout=60)
            manager.destroy()

    def _run(self, manager: Any, requests: Sequence[RequestSpec], on_done: OnDone) -> tuple[list[RequestRecord], float]:
        start = time.perf_counter()
        records = new_records(requests, start)
        by_id = {f"req-{spec.index}": record for spec, record in zip(requests, records)}

        def submit() -> None:
            for spec, record in sorted(zip(requests, records), key=lambda pair: pair[1].arrival):
                sleep_until(record.arrival)
                manager.add_request(
                    list(spec.prompt_ids),
                    request_id=f"req-{spec.index}",
                    max_new_tokens=spec.max_new_tokens,
                    streaming=True,
                    eos_token_id=-1,
                )

        submitter = threading.Thread(target=submit, name="bench-cb-submit", daemon=True)
        submitter.start()
        seen = dict.fromkeys(by_id, 0)
        finished = 0
        while finished < len(records):
            output = manager.get_result(timeout=1.0)
            if output is None:
                if not manager.is_running():
                    raise RuntimeError("transformers continuous batching stopped before finishing the workload")
                continue
            now = time.perf_counter()
            if output.error is not None:
                raise RuntimeError(f"transformers continuous batching failed a request: {output.error}")
            count = len(output.generated_tokens)
            by_id[output.request_id].add_tokens(count - seen[output.request_id], now)
            seen[output.request_id] = count
            if output.is_finished():
                finished += 1
                on_done(1)
        submitter.join()
        return records, start
