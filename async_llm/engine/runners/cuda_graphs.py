"""The static runner's decode step captured as CUDA graphs, one per (rows, width) bucket pair.

Eager decoding of a small model on a GPU is bound by launching kernels, not by the GPU: a graph
replays the whole step (embeddings through the output projection) as one launch. A graph reads and
writes fixed addresses, so it is captured over the batch's own tensors (``tokens``, ``positions``
and the KV store, see :class:`~async_llm.engine.slot_batch.SlotBatch`), which every step updates in
place; its logits land in one buffer all graphs share (``[max rows, V]``, outside their pool), read
before the next replay.

All graphs share one memory pool (captured largest first, as torch's docs advise, so the smaller
ones fit in what the larger freed): what one step computes between its inputs and its logits is
scratch that the next replay writes over, so no graph keeps memory of its own. A pair that runs out
of memory while capturing stays eager, with one log line. Captures use the thread-local error mode:
another thread's CUDA work (a beam search, an embedding call) neither spoils a capture nor fails.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch

from async_llm.engine.runners.fast_forward import FastDecoder
from async_llm.engine.slot_batch import SlotBatch, SlotRows
from async_llm.log import get_logger

log = get_logger("async_llm.engine.runners.cuda_graphs")

#: Widths captured when the engine starts (with every row bucket): every width of a slot up to this
#: many columns (and the narrowest alone past it); wider steps are captured the first time one runs
#: (a pause of one capture, logged), so a long ``max_model_len`` does not hold the start up.
STARTUP_MAX_WIDTH = 2048


class DecodeGraphs:
    """Captured decode steps of ``decoder`` over ``batch`` (engine thread only).

    Args:
        decoder: The layers (its :meth:`~FastDecoder.decode_rows` is what is captured).
        batch: The batch whose tensors the graphs read and write.
    """

    def __init__(self, decoder: FastDecoder, batch: SlotBatch) -> None:
        self.decoder = decoder
        self.batch = batch
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.eager: set[tuple[int, int]] = set()  # pairs whose capture ran out of memory
        self.capture_seconds = 0.0
        self.broken: str | None = None  # why capturing failed for a reason other than memory
        self._pool: Any = None  # the first graph's memory pool handle, shared by the others
        self._stream: Any = None  # the side stream captures warm up on (one for all)
        self._logits: torch.Tensor | None = None  # [max rows, V]: every graph's logits, in the model's dtype

    def capture(self, pairs: Iterable[tuple[int, int]] | None = None) -> float:
        """Capture ``pairs`` (``(rows, width)``; None: every row bucket at the widths up to
        :data:`STARTUP_MAX_WIDTH`), largest first. Returns the seconds it took."""
        if pairs is None:
            widths = [w for w in self.batch.widths if w <= STARTUP_MAX_WIDTH] or self.batch.widths[:1]
            pairs = [(s, w) for s in self.batch.row_sizes for w in widths]
        start = time.perf_counter()
        for pair in sorted(pairs, reverse=True):
            if self.broken is None:
                self._capture(pair)
        seconds = time.perf_counter() - start
        log.info("decode graphs captured", graphs=len(self.graphs), eager=len(self.eager), seconds=round(seconds, 3))
        return seconds

    def _capture(self, pair: tuple[int, int]) -> None:
        if pair in self.graphs or pair in self.eager:
            return
        start = time.perf_counter()
        rows = self.batch.rows_view(*pair)
        try:
            # Warm up on a side stream (lazy initialisations must not be captured). It computes what
            # the replay will: the same keys at the same columns, so running it between steps is safe.
            if self._stream is None:
                self._stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                warm = self.decoder.decode_rows(rows)
            torch.cuda.current_stream().wait_stream(self._stream)
            if self._logits is None:
                rows_most = max(self.batch.row_sizes)
                self._logits = warm.new_empty((rows_most, warm.shape[-1]))
            del warm
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits = self.decoder.decode_rows(self.batch.rows_view(*pair), out=self._logits[: pair[0]])
        except torch.OutOfMemoryError as exc:
            self.eager.add(pair)
            log.warning(
                "decode graph capture out of memory; that size runs eagerly",
                rows=pair[0],
                width=pair[1],
                error=str(exc),
            )
            torch.cuda.empty_cache()
            return
        except RuntimeError as exc:  # the step cannot be captured here at all: every size runs eagerly
            self.broken = repr(exc)
            log.warning("decode graphs off: the step could not be captured", error=self.broken)
            return
        if self._pool is None:
            self._pool = graph.pool()
        self.graphs[pair] = (graph, logits)
        self.capture_seconds += time.perf_counter() - start

    def run(self, rows: SlotRows) -> torch.Tensor | None:
        """Replay the graph of ``rows``' shape (captured now if it was not): ``[S, V]`` float32
        logits, valid until the next replay; None where that shape runs eagerly."""
        pair = (int(rows.input_ids.shape[0]), rows.width)
        if pair not in self.graphs:
            if pair in self.eager or self.broken is not None:
                return None
            start = time.perf_counter()
            self._capture(pair)
            if pair not in self.graphs:
                return None
            log.info(
                "decode graph captured", rows=pair[0], width=pair[1], seconds=round(time.perf_counter() - start, 3)
            )
        graph, logits = self.graphs[pair]
        graph.replay()
        return logits
