"""The running batch on the device: token ids, attention mask, positions and one padded KV cache.

Layout (all rows share one column axis; every row's tokens are right-aligned, left padding):

    kv:   [layers, 2, B_cap, H, L_cap, D]   keys (0) and values (1) of every layer
    mask: [B_cap, L_cap]                    1 where a column holds a real token of that row
    live region: rows [0, B), columns [start, end); each decode step writes column `end`.

Invariants (the engine thread is the only one that touches these tensors):
  * for live rows, mask is 0 outside [start, end);
  * row i's real tokens fill the columns [end - lengths[i], end), so its next position id is lengths[i];
  * capacity grows geometrically, so appending a column is an in-place write, not a concatenation;
  * for live rows, every column of [start, end) holds a token of the row or zeroed padding: the
    buffer is allocated uninitialised, and nothing outside that region (and column `end`, written
    before it is read) is ever read.

Rows join by writing their prefilled cache into free rows (left-padded to the batch's length), leave
by moving the last rows into their slots, and columns that are padding for every row are dropped by
moving `start` (no copy).

A speculative verify step (:meth:`PaddedBatch.verify_inputs`) writes ``T`` columns at once; a row
that keeps fewer of its ``T`` tokens leaves the others as holes (mask 0) inside its span. A row's
span (``row_spans``, the columns from its first token to ``end``) is then longer than its length;
without speculation the two are equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from async_llm.engine.request import Request
from async_llm.engine.sampler import SamplingBatch
from async_llm.engine.speculative import verify_inputs
from async_llm.engine.transfer import device_tensor

_MIN_COLUMNS = 64
#: Most columns reserved past the live region when rows join (see PaddedBatch.add).
_MAX_RESERVED_AHEAD = 512


def _next_capacity(needed: int, current: int, limit: int | None = None) -> int:
    capacity = max(current, 1)
    while capacity < needed:
        capacity *= 2
    return min(capacity, limit) if limit is not None else capacity


class _PaddedLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """What a model's attention layer sees of the shared buffer: write one step, read the live region."""

    def __init__(self, owner: PaddedKVCache, layer_idx: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._owner = owner
        self._layer_idx = layer_idx
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._owner.write(self._layer_idx, key_states, value_states)

    def get_seq_length(self) -> int:
        return self._owner.end - self._owner.start

    def get_mask_sizes(self, query: int | torch.Tensor) -> tuple[int, int]:
        # Newer transformers pass the query length, older ones (5.0) the query's cache positions.
        query_length = query if isinstance(query, int) else int(query.shape[0])
        return self.get_seq_length() + query_length, 0


class PaddedKVCache(Cache):
    """A transformers ``Cache`` backed by the batch's preallocated ``kv`` buffer."""

    def __init__(self, batch: PaddedBatch, num_layers: int) -> None:
        super().__init__(layers=[_PaddedLayer(self, i) for i in range(num_layers)])
        self._batch = batch

    @property
    def start(self) -> int:
        return self._batch.start

    @property
    def end(self) -> int:
        return self._batch.end

    def write(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # keys/values: [B, H, q, D] for the q new columns of every live row.
        b = self._batch
        q = keys.shape[-2]
        kv = b.kv
        assert kv is not None and b.end + q <= kv.shape[4], "capacity is reserved before every forward"
        kv[layer_idx, 0, : b.size, :, b.end : b.end + q] = keys
        kv[layer_idx, 1, : b.size, :, b.end : b.end + q] = values
        live = slice(b.start, b.end + q)
        return kv[layer_idx, 0, : b.size, :, live], kv[layer_idx, 1, : b.size, :, live]


class BatchRows:
    """The rows of a running batch and what sampling needs of them, whatever the KV layout.

    ``rows`` are in row order: row ``i`` of a decode step's logits is ``rows[i]``. The per-row
    tensors here (penalty counts, prompt masks) follow that order; a layout's own tensors (keys and
    values, last tokens, lengths) are its subclass's.
    """

    def __init__(self, vocab_size: int, max_rows: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.max_rows = max_rows
        self.device = device
        self.rows: list[Request] = []
        self.row_lengths: list[int] = []  # host copy of each row's context length (no device sync)
        self.counts: torch.Tensor | None = None  # [B_cap, V] output token counts, only with penalties
        self.prompt_mask: torch.Tensor | None = None  # [B_cap, V] bool, only with penalties
        self.sampling: SamplingBatch | None = None

    @property
    def size(self) -> int:
        return len(self.rows)

    def _add_penalty_rows(self, rows: slice, counts: torch.Tensor | None, prompt_mask: torch.Tensor | None) -> None:
        """Set the penalty state of ``rows`` (zeroed when they have none but the batch has some)."""
        if counts is None or prompt_mask is None:
            if self.counts is not None:
                self.counts[rows] = 0
                self.prompt_mask[rows] = False  # type: ignore[index]
            return
        if self.counts is None:
            self.counts = torch.zeros(self.capacity, self.vocab_size, dtype=torch.float32, device=self.device)
            self.prompt_mask = torch.zeros(self.capacity, self.vocab_size, dtype=torch.bool, device=self.device)
        self.counts[rows] = counts
        self.prompt_mask[rows] = prompt_mask  # type: ignore[index]

    def _compact(
        self, indices: Sequence[int], tensors: Sequence[str], lists: Sequence[str] = ()
    ) -> tuple[list[int], list[int]]:
        """Drop rows ``indices``: the last surviving rows move into the freed places, in the row
        lists (and the subclass's named ``lists``) and in the named ``[B_cap, ...]`` tensors.
        Returns ``(holes, movers)``."""
        gone = set(indices)
        keep = self.size - len(gone)
        holes = [i for i in sorted(gone) if i < keep]
        movers = [i for i in range(keep, self.size) if i not in gone]
        if holes:
            dst = device_tensor(holes, device=self.device)
            src = device_tensor(movers, device=self.device)
            for name in tensors:
                tensor = getattr(self, name)
                if tensor is not None:
                    tensor.index_copy_(0, dst, tensor.index_select(0, src))
        names = ("rows", "row_lengths", *lists)
        for name in names:
            values = getattr(self, name)
            for h, m in zip(holes, movers, strict=True):
                values[h] = values[m]
            del values[keep:]
        return holes, movers

    def _rebuild_sampling(self) -> None:
        if not self.rows:
            self.sampling = None
            return
        self.sampling = SamplingBatch.build([r.params for r in self.rows], self.vocab_size, self.device)
        if self.counts is not None and not self.sampling.uses_penalties:
            self.counts = self.prompt_mask = None  # the last penalised row left

    def penalty_state(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The live rows' output token counts and prompt masks, ``[B, V]`` each (None without penalties)."""
        b = self.size
        counts = self.counts[:b] if self.counts is not None else None
        prompt_mask = self.prompt_mask[:b] if self.prompt_mask is not None else None
        return counts, prompt_mask

    def record_tokens(self, tokens: torch.Tensor) -> None:
        """Count each row's new token for frequency/presence/repetition penalties."""
        if self.counts is not None:
            b = self.size
            self.counts[:b].scatter_add_(1, tokens[:b, None], torch.ones(b, 1, device=self.device))

    def add(
        self,
        requests: Sequence[Request],
        kv_rows: Sequence[torch.Tensor],
        first_tokens: torch.Tensor,
        counts: torch.Tensor | None,
        prompt_mask: torch.Tensor | None,
    ) -> None:
        """Merge freshly prefilled rows into the batch, after the rows it has.

        Args:
            requests: The new rows' requests, in row order.
            kv_rows: Each row's keys and values, ``[layers, 2, H, L_i, D]`` with ``L_i`` its context
                length (rows of one request may share one tensor; see each layout's :meth:`_place`).
            first_tokens: ``[n]`` the token sampled from the prefill, fed at the next decode step.
            counts, prompt_mask: ``[n, V]`` their penalty state, when any of them uses penalties.
        """
        old_b, lengths = self.size, [kv.shape[3] for kv in kv_rows]
        self._place(requests, kv_rows, lengths, first_tokens)
        self._add_penalty_rows(slice(old_b, old_b + len(requests)), counts, prompt_mask)
        self.rows.extend(requests)
        self.row_lengths.extend(lengths)
        self._rows_changed()

    def _rows_changed(self) -> None:
        """Rebuild what follows the rows' order (rows joined or left)."""
        self._rebuild_sampling()

    # -- what each layout implements ------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Rows the per-row tensors hold (``B_cap``)."""
        raise NotImplementedError

    def _place(
        self,
        requests: Sequence[Request],
        kv_rows: Sequence[torch.Tensor],
        lengths: Sequence[int],
        first_tokens: torch.Tensor,
    ) -> None:
        """Put the joining rows' keys and values (``lengths`` columns each) and first tokens in the
        layout, as rows ``[B, B + n)``; the rows themselves are appended after (see :meth:`add`)."""
        raise NotImplementedError

    def remove(self, indices: Sequence[int]) -> None:
        """Drop the rows at ``indices``; the others keep their order."""
        raise NotImplementedError

    def advance(self, tokens: torch.Tensor) -> None:
        """Commit a decode step: its column is part of every row now, and ``tokens`` ``[B]`` are fed next."""
        raise NotImplementedError

    def advance_verify(self, fed: Sequence[int], positions: int, tokens: torch.Tensor) -> None:
        """Commit a speculative verify step of ``positions`` tokens a row: row ``i`` keeps the first
        ``fed[i]`` (its last token and the draft tokens it accepted), and ``tokens`` ``[B]`` are fed next."""
        raise NotImplementedError

    def row_kv(self, index: int) -> torch.Tensor:
        """Row ``index``'s keys and values so far, ``[layers, 2, H, L, D]`` (a view)."""
        raise NotImplementedError

    def clear(self) -> None:
        """Forget every row."""
        raise NotImplementedError

    def holds_rows(self) -> bool:
        """Whether keys and values of a row (or of a prompt on its way to one) are held: False once
        every request has ended (a buffer kept for the next rows holds none of them)."""
        raise NotImplementedError


class PaddedBatch(BatchRows):
    """The rows being decoded together, with everything a decode step needs on the device.

    Args:
        num_layers: Attention layers of the model.
        vocab_size: Size of the logits' last dimension.
        max_rows: Upper bound on rows (the engine's ``max_batch_size``).
        device: Where the tensors live.
        dtype: KV cache dtype (the model's).
    """

    def __init__(
        self, num_layers: int, vocab_size: int, max_rows: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        super().__init__(vocab_size, max_rows, device)
        self.num_layers = num_layers
        self.dtype = dtype
        self.start = 0
        self.end = 0
        self.kv: torch.Tensor | None = None  # [layers, 2, B_cap, H, L_cap, D]
        self._spare: torch.Tensor | None = None  # the last rows' buffer, kept by clear for the next
        self.row_spans: list[int] = []  # host copy: columns from each row's first token to `end`
        self.mask = self.lengths = self.last_tokens = torch.zeros(0)  # [B_cap, L_cap], [B_cap], [B_cap]
        self.clear()
        self.cache = PaddedKVCache(self, num_layers)

    # -- joining ----------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return int(self.mask.shape[0])

    def _place(
        self,
        requests: Sequence[Request],
        kv_rows: Sequence[torch.Tensor],
        lengths: Sequence[int],
        first_tokens: torch.Tensor,
    ) -> None:
        """Copy the joining rows' keys and values in, right-aligned, left-padded to the batch's
        width (growing the buffer when it is too small)."""
        n = len(requests)
        p = max(lengths)
        if self.size == 0:  # an empty batch starts over, at the left of its buffer
            self.start = self.end = p if p < self.mask.shape[1] else 0
        old_b, live = self.size, self.end - self.start
        # Room for the tokens the rows may still generate (up to a cap): a buffer that grows in the
        # middle of decoding copies all of it, a spike in every stream's inter-token latency.
        remaining = max(r.params.max_tokens - len(r.output_ids) for r in [*self.rows, *requests])
        ahead = max(1, min(remaining, _MAX_RESERVED_AHEAD))
        self._reserve(rows=old_b + n, columns=max(live, p), like=kv_rows[0], ahead=ahead)
        assert self.kv is not None
        if p > self.end - self.start:
            # The new rows are longer than the live region: open columns on the left (zeroed mask;
            # zeroed keys and values too, the buffer being uninitialised, see _reserve).
            self.mask[:old_b, self.end - p : self.start] = 0
            self.kv[:, :, :old_b, :, self.end - p : self.start] = 0
            self.start = self.end - p
        rows = slice(old_b, old_b + n)
        self.mask[rows] = 0
        for row, (kv, length) in enumerate(zip(kv_rows, lengths), start=old_b):
            # Zero the padded columns: masked attention multiplies them by 0, and 0 * NaN would poison the row.
            self.kv[:, :, row, :, self.start : self.end - length] = 0
            self.kv[:, :, row, :, self.end - length : self.end] = kv
            self.mask[row, self.end - length : self.end] = 1
        self.lengths[rows] = device_tensor(lengths, device=self.device)
        self.last_tokens[rows] = first_tokens
        self.row_spans.extend(lengths)

    def row_kv(self, index: int) -> torch.Tensor:
        """Row ``index``'s keys and values so far, ``[layers, 2, H, L, D]`` (a view; a copy of its
        columns without the holes when a verify step left some)."""
        assert self.kv is not None
        span, length = self.row_spans[index], self.row_lengths[index]
        if span == length:
            return self.kv[:, :, index, :, self.end - length : self.end]
        first = self.end - span
        columns = self.mask[index, first : self.end].nonzero().squeeze(1) + first
        return self.kv[:, :, index].index_select(3, columns)

    def _reserve(self, rows: int, columns: int, like: torch.Tensor | None = None, ahead: int = 1) -> None:
        """Make room for ``rows`` rows, a live region of ``columns`` columns ending at ``end``, and
        ``ahead`` more columns to write from ``end`` on.

        Reallocates (compacting the live region to the left) only when the buffer is too small, and
        grows geometrically, so almost every step writes in place.
        """
        b_cap, l_cap = self.mask.shape
        if rows <= b_cap and columns <= self.end and self.end + ahead <= l_cap:
            return
        if self.kv is None:
            assert like is not None, "the first reservation comes with a prefill"
            heads, head_dim = like.shape[2], like.shape[4]
        else:
            heads, head_dim = self.kv.shape[3], self.kv.shape[5]
        new_b = _next_capacity(rows, b_cap, self.max_rows)
        live = self.end - self.start
        new_l = _next_capacity(max(columns, live) + max(ahead, _MIN_COLUMNS), max(l_cap, _MIN_COLUMNS))
        spare, self._spare = self._spare, None
        if self.kv is None and spare is not None and spare.shape[2] >= new_b and spare.shape[4] >= new_l:
            # The buffer of the last batch, kept while the engine was idle (see clear).
            kv, new_b, new_l = spare, spare.shape[2], spare.shape[4]
        else:
            # Uninitialised: only the live region is ever read (rows [0, B), columns [start, end]
            # with `end` written first), and every column of it holds a row's token or is zeroed as
            # padding when rows join (add). Zeroing all of it cost a burst's first token 10-60 ms on
            # a CPU (the pages of a fresh buffer faulted in).
            del spare
            kv = torch.empty(self.num_layers, 2, new_b, heads, new_l, head_dim, dtype=self.dtype, device=self.device)
        mask = torch.zeros(new_b, new_l, dtype=torch.long, device=self.device)
        b = self.size
        new_end = max(columns, live)  # right-aligned, room on the left for a longer joiner
        if self.kv is not None and b:
            kv[:, :, :b, :, new_end - live : new_end] = self.kv[:, :, :b, :, self.start : self.end]
            mask[:b, new_end - live : new_end] = self.mask[:b, self.start : self.end]
        self.kv, self.mask = kv, mask
        self.start, self.end = new_end - live, new_end
        if new_b != b_cap:
            self.lengths = self._grow_rows(self.lengths, new_b)
            self.last_tokens = self._grow_rows(self.last_tokens, new_b)
            if self.counts is not None and self.prompt_mask is not None:
                self.counts = self._grow_rows(self.counts, new_b)
                self.prompt_mask = self._grow_rows(self.prompt_mask, new_b)

    def _grow_rows(self, tensor: torch.Tensor, rows: int) -> torch.Tensor:
        grown = torch.zeros((rows, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        grown[: tensor.shape[0]] = tensor
        return grown

    # -- leaving ----------------------------------------------------------------------------------
    def remove(self, indices: Sequence[int]) -> None:
        """Drop rows: the last surviving rows move into the freed slots (copying only them)."""
        if not indices:
            return
        holes, movers = self._compact(
            indices, ("mask", "lengths", "last_tokens", "counts", "prompt_mask"), lists=("row_spans",)
        )
        if holes:
            assert self.kv is not None
            dst = device_tensor(holes, device=self.device)
            self.kv.index_copy_(2, dst, self.kv.index_select(2, device_tensor(movers, device=self.device)))
        if self.rows:
            # Columns left of the widest row are padding for every row: trim them (no copy).
            self.start = self.end - max(self.row_spans)
            self._rebuild_sampling()
        else:
            self.clear()

    # -- one decode step --------------------------------------------------------------------------
    def decode_inputs(self) -> dict[str, Any]:
        """Model inputs for one decode step of every live row (the cache, :attr:`cache`, goes under
        the name the model takes it by); reserves the column it writes."""
        self._reserve(rows=self.size, columns=self.end - self.start)
        b = self.size
        self.mask[:b, self.end] = 1
        return {
            "input_ids": self.last_tokens[:b, None],  # [B, 1]
            "position_ids": self.lengths[:b, None],  # [B, 1]
            "attention_mask": self.mask[:b, self.start : self.end + 1],  # [B, L + 1]
        }

    def advance(self, tokens: torch.Tensor) -> None:
        """Commit the step: the written column becomes live and ``tokens`` [B] are fed next."""
        b = self.size
        self.end += 1
        self.lengths[:b] += 1
        self.row_lengths = [n + 1 for n in self.row_lengths]
        self.row_spans = [n + 1 for n in self.row_spans]
        self.last_tokens[:b] = tokens
        self.record_tokens(tokens)

    # -- one speculative verify step --------------------------------------------------------------
    def verify_inputs(self, drafts: Sequence[Sequence[int]], positions: int) -> dict[str, Any]:
        """Inputs of a verify step: every row feeds its last token and its draft (``drafts[i]``, at
        most ``positions - 1`` tokens; the rest of its ``positions`` are fillers nothing keeps),
        written into the ``positions`` columns from ``end``; reserves them.

        Returns:
            ``input_ids`` and ``position_ids`` ``[B, T]``, and ``attention_mask`` ``[B, L]`` of the
            live region before the step (the new columns' causal mask is the step's own).
        """
        self._reserve(rows=self.size, columns=self.end - self.start, ahead=positions)
        b = self.size
        ids = verify_inputs(self.last_tokens[:b], drafts, positions)
        steps = torch.arange(positions, device=self.device)
        return {
            "input_ids": ids,
            "position_ids": self.lengths[:b, None] + steps,
            "attention_mask": self.mask[:b, self.start : self.end],
        }

    def advance_verify(self, fed: Sequence[int], positions: int, tokens: torch.Tensor) -> None:
        """Commit a verify step of ``positions`` columns: row ``i`` keeps the first ``fed[i]`` of
        them (its last token and the draft tokens it accepted; the others become holes), and
        ``tokens`` ``[B]`` are fed next."""
        b = self.size
        grown = device_tensor(list(fed), dtype=torch.long, device=self.device)
        kept = (torch.arange(positions, device=self.device)[None, :] < grown[:, None]).long()
        self.mask[:b, self.end : self.end + positions] = kept
        self.end += positions
        self.lengths[:b] += grown
        self.row_lengths = [n + f for n, f in zip(self.row_lengths, fed, strict=True)]
        self.row_spans = [n + positions for n in self.row_spans]
        self.last_tokens[:b] = tokens
        self.record_tokens(tokens)

    def holds_rows(self) -> bool:
        return self.kv is not None

    def clear(self) -> None:
        """Forget every row. The key/value buffer is kept aside for the next rows (reused when it is
        large enough, else dropped for a larger one), as a server's preallocated cache is: a fresh
        buffer of a burst of 64 rows is some 200 MB of pages to fault in, zeroed by the kernel, at
        every burst (on a CPU, 5% of the burst's time; twice that after the machine reclaimed the
        idle pages). The memory an idle engine holds is the largest buffer its batch grew to;
        ``holds_rows`` is False all the same: no row holds any of it."""
        self.rows.clear()
        self.row_lengths.clear()
        self.row_spans = []
        self.start = self.end = 0
        if self.kv is not None:
            self._spare = self.kv
        self.kv = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.lengths = torch.zeros(0, dtype=torch.long, device=self.device)
        self.last_tokens = torch.zeros(0, dtype=torch.long, device=self.device)
        self.counts = self.prompt_mask = None
        self.sampling = None
