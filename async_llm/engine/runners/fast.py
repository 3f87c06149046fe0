"""The fast runner: the batch's decode rows and every prompt chunk of a step in one forward of
:class:`~async_llm.engine.runners.fast_forward.FastDecoder` (Llama-family models)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from async_llm.engine.batch import BatchRows, PaddedBatch
from async_llm.engine.prefill import Forward, Items, materialize
from async_llm.engine.runners.fast_forward import Chunk, DecodeRows, FastDecoder, Rows, VerifyRows


class FastRunner:
    """Runs :class:`FastDecoder` (built and checked by ``fast_check.prepare``)."""

    name = "fast"
    fused = True  # chunks ride in the decode step: the weights are read once for both
    can_resume = True  # its own check covers a prefill after a prefix
    speculates = True  # verify steps (see verify): the padded batch takes T columns a step

    def __init__(self, decoder: FastDecoder) -> None:
        self.decoder = decoder

    def forwards(self, items: Items, decoding: bool) -> list[Forward]:
        if decoding:
            return [Forward(items, decode=True)]
        # Nothing decoding yet: the prompts first, then the rows they complete take their first step.
        return [Forward(items), Forward([], decode=True)] if items else [Forward([], decode=True)]

    def run(self, forward: Forward, batch: BatchRows) -> torch.Tensor | None:
        assert isinstance(batch, PaddedBatch), "this runner decodes the padded batch"
        rows = None
        if forward.decode:
            inputs = batch.decode_inputs()
            assert batch.kv is not None
            rows = Rows(inputs["input_ids"], inputs["position_ids"], inputs["attention_mask"], batch.kv, batch.end)
        decode_logits = self._forward(rows, forward, self.decoder.new_kv)
        return decode_logits if rows is not None else None

    def verify(self, batch: BatchRows, drafts: Sequence[Sequence[int]], positions: int) -> torch.Tensor:
        """A speculative verify step of ``batch``'s rows: each feeds its last token and its draft
        (``drafts[i]``, padded to ``positions`` tokens); returns float32 logits ``[B, T, V]``, those
        after each position (see :meth:`PaddedBatch.verify_inputs`). The caller commits it
        (:meth:`PaddedBatch.advance_verify`)."""
        assert isinstance(batch, PaddedBatch), "this runner decodes the padded batch"
        inputs = batch.verify_inputs(drafts, positions)
        assert batch.kv is not None
        rows = VerifyRows(inputs["input_ids"], inputs["position_ids"], inputs["attention_mask"], batch.kv, batch.end)
        logits, _ = self.decoder.step(rows, [])  # [B T, V]
        return logits.view(batch.size, positions, -1)

    def _chunk(self, ids: Sequence[int], kv: torch.Tensor, start: int, logits: bool) -> Chunk:
        """A prompt's tokens ``ids`` to prefill into ``kv`` after its first ``start`` columns."""
        return Chunk(ids, kv, start, logits=logits)

    def _forward(
        self, rows: DecodeRows | None, forward: Forward, new_kv: Callable[[int], torch.Tensor]
    ) -> torch.Tensor:
        """One forward of the decode ``rows`` (None: none) and ``forward``'s prompt chunks, each
        chunk computed into its state's buffer (made by ``new_kv``, the batch's layout, before its
        first chunk); a prompt it completes gets its next-token logits. Returns the rows' float32
        logits ``[B, V]``."""
        chunks = []
        for state, n in forward.items:
            materialize(state, new_kv)
            assert state.kv is not None
            last = state.done + n == len(state.tokens)
            chunks.append(self._chunk(state.tokens[state.done : state.done + n], state.kv, state.done, last))
        decode_logits, logits = self.decoder.step(rows, chunks)  # [B, V], [completed, V]
        completed = [state for (state, _), chunk in zip(forward.items, chunks, strict=True) if chunk.logits]
        for state, row in zip(completed, logits, strict=True):
            state.logits = row
        return decode_logits
