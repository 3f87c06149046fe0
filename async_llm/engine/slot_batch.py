"""The static runner's batch: a KV store allocated once, one fixed slot per row; rows never move.

Layout (the engine thread is the only one that touches these tensors):

    kv:        [layers, 2, slots, Hkv, columns + 1, D]  keys (0) and values (1); column ``columns`` is scratch
    tokens:    [slots] long   the token each slot feeds at the next decode step
    positions: [slots] long   its position: the tokens its slot holds (``columns`` for a free slot)

A row's token ``j`` is at column ``j`` of its slot. A prompt is prefilled straight into the slot it
will decode in (:meth:`SlotBatch.new_kv`); joining the batch then writes only its first token and
length, and leaving writes nothing but frees the slot. Memory is ``slots x columns`` tokens, fixed at
start: the documented limit of fixed slots (a paged store would hold tokens in use instead).

A decode step runs the slots ``[0, S)``, ``S`` the row bucket (:mod:`~async_llm.engine.buckets`) that
holds the highest slot in use, over the width bucket ``W`` that holds the longest row. Free slots
inside that range compute a throwaway row: position ``columns``, so their key lands in the scratch
column, outside every width, and their logits are never read. Slots are handed out lowest first,
so the range in use stays dense.

Invariants:
  * ``rows[i]`` decodes in slot ``slots[i]``; ``slot_index`` is ``slots`` on the device;
  * a slot is free, pending (a prefill writes into it; it is freed when its buffer is dropped), or
    a row's, and nothing else writes into it;
  * ``positions[slots[i]] == row_lengths[i]`` and ``tokens[slots[i]]`` is ``rows[i]``'s last token.
"""

from __future__ import annotations

import heapq
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from async_llm.engine.batch import BatchRows
from async_llm.engine.buckets import bucket, row_buckets, width_buckets
from async_llm.engine.request import Request
from async_llm.engine.runners.fast_forward import additive_mask, grouped_attention, verify_attention
from async_llm.engine.speculative import verify_inputs
from async_llm.engine.transfer import device_tensor


class SlotBatch(BatchRows):
    """The rows being decoded, in a KV store preallocated for ``max_rows`` rows of ``columns`` tokens.

    Args:
        num_layers, kv_heads, head_dim: The model's attention geometry.
        vocab_size: Size of the logits' last dimension.
        max_rows: Most rows at once (the engine's ``max_batch_size``): the store's slots.
        columns: Tokens one row may hold (prompt and output: ``max_model_len``).
        device, dtype: Where the store lives and its dtype (the model's).
    """

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        vocab_size: int,
        max_rows: int,
        columns: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(vocab_size, max_rows, device)
        self.columns = columns
        self.row_sizes = row_buckets(max_rows)
        self.widths = width_buckets(columns)
        slots = self.row_sizes[-1]
        shape = (num_layers, 2, slots, kv_heads, columns + 1, head_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.positions = torch.full((slots,), columns, dtype=torch.long, device=device)
        self.slots: list[int] = []
        self.slot_index = torch.zeros(0, dtype=torch.long, device=device)  # [B]
        self._free = list(range(slots))  # a heap: the lowest free slot first
        self._pending: dict[int, weakref.finalize[Any, Any]] = {}
        # Slots whose prefill buffer was dropped; the finalizer may run on any thread (a garbage
        # collection), so it only queues the slot and the engine thread frees it (see _reclaim).
        self._released: deque[int] = deque()

    @property
    def num_slots(self) -> int:
        return int(self.kv.shape[2])

    # -- slots -----------------------------------------------------------------------------------------
    def _reclaim(self) -> None:
        while self._released:
            slot = self._released.popleft()
            if self._pending.pop(slot, None) is not None:
                heapq.heappush(self._free, slot)

    def _take(self) -> int:
        self._reclaim()
        if not self._free:
            # Every slot holds a row or a prefill: the engine's out-of-memory path sends the
            # newest requests back to the queue, and they resume when rows leave.
            raise torch.OutOfMemoryError(f"all {self.num_slots} KV slots are in use")
        return heapq.heappop(self._free)

    def new_kv(self, columns: int) -> torch.Tensor:
        """A prefill's buffer: a free slot's first ``columns`` columns, ``[layers, 2, Hkv, columns, D]``
        (a view of the store). The slot is the row's when its prefill joins the batch, and free
        again when the buffer is dropped before that.

        Raises:
            ValueError: ``columns`` is more than a slot holds.
            torch.OutOfMemoryError: No slot is free.
        """
        if columns > self.columns:
            raise ValueError(f"a context of {columns} tokens is longer than a slot's {self.columns} (max_model_len)")
        slot = self._take()
        view = self.kv[:, :, slot, :, :columns]
        self._pending[slot] = weakref.finalize(view, self._released.append, slot)
        return view

    def slot_of(self, kv: torch.Tensor) -> int | None:
        """The slot a view of the store (from :meth:`new_kv` or :meth:`row_kv`) is in, else None."""
        if kv.untyped_storage().data_ptr() != self.kv.untyped_storage().data_ptr():
            return None
        slot, rest = divmod(int(kv.storage_offset()) - int(self.kv.storage_offset()), self.kv.stride(2))
        return slot if rest == 0 and 0 <= slot < self.num_slots else None

    # -- joining and leaving ---------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.num_slots

    def _place(
        self,
        requests: Sequence[Request],
        kv_rows: Sequence[torch.Tensor],
        lengths: Sequence[int],
        first_tokens: torch.Tensor,
    ) -> None:
        """Each row takes the slot of its prefill's buffer (:meth:`new_kv`; rows of one request share
        it, and all but the first get a copy in a slot of their own); any other buffer is copied
        into a free slot."""
        self._reclaim()
        taken: list[int] = []
        try:
            for kv in kv_rows:
                slot = self.slot_of(kv)
                finalizer = self._pending.pop(slot, None) if slot is not None else None
                if finalizer is not None:
                    finalizer.detach()  # the row's now: dropping the prefill's buffer must not free it
                else:
                    slot = self._take()
                    self.kv[:, :, slot, :, : kv.shape[3]] = kv
                assert slot is not None
                taken.append(slot)
        except BaseException:
            for slot in taken:  # none of the rows joins
                heapq.heappush(self._free, slot)
            raise
        index = device_tensor(taken, device=self.device)
        self.tokens[index] = first_tokens
        self.positions[index] = device_tensor(list(lengths), device=self.device)
        self.slots.extend(taken)

    def remove(self, indices: Sequence[int]) -> None:
        """Drop rows: their slots are free again (nothing is copied but the rows' penalty state)."""
        if not indices:
            return
        freed = [self.slots[i] for i in indices]
        index = device_tensor(freed, device=self.device)
        self.positions[index] = self.columns  # the scratch column: free slots compute a throwaway row
        self.tokens[index] = 0
        for slot in freed:
            heapq.heappush(self._free, slot)
        self._compact(indices, ("counts", "prompt_mask"), lists=("slots",))
        self._rows_changed()

    def _rows_changed(self) -> None:
        self.slot_index = device_tensor(self.slots, dtype=torch.long, device=self.device)
        self._rebuild_sampling()

    def row_kv(self, index: int) -> torch.Tensor:
        """Row ``index``'s keys and values so far, ``[layers, 2, Hkv, L, D]`` (a view)."""
        return self.kv[:, :, self.slots[index], :, : self.row_lengths[index]]

    def usage(self) -> float:
        """The share of slots held, read from any thread (a slot whose prompt was dropped counts
        until the engine's thread reclaims it)."""
        return (self.num_slots - len(self._free)) / self.num_slots

    def slots_in_use(self) -> int:
        """Slots held by a row or by a prompt being prefilled."""
        self._reclaim()
        return self.num_slots - len(self._free)

    def holds_rows(self) -> bool:
        return self.slots_in_use() > 0

    def clear(self) -> None:
        """Forget every row (the store stays allocated; pending prefills keep their slots)."""
        if self.rows:
            self.remove(list(range(self.size)))
        self.counts = self.prompt_mask = None
        self.sampling = None

    # -- one decode step -------------------------------------------------------------------------------
    def decode_rows(self) -> SlotRows:
        """The next decode step's rows: slots ``[0, S)`` over ``W`` columns (both bucketed)."""
        s = bucket(max(self.slots) + 1, self.row_sizes)
        # A row one step past its end (an overlapped step, see the engine) may sit at `columns`:
        # it writes the scratch column, and its token is never used.
        w = bucket(min(max(self.row_lengths) + 1, self.columns), self.widths)
        return self.rows_view(s, w)

    def rows_view(self, s: int, w: int) -> SlotRows:
        """Slots ``[0, s)`` over ``w`` columns, as views of the batch's tensors (the same tensors at
        every step: what a captured graph reads)."""
        return SlotRows(self.tokens[:s, None], self.positions[:s, None], self.kv, w)

    def verify_rows(self, drafts: Sequence[Sequence[int]], positions: int) -> SlotVerifyRows:
        """A verify step's rows: each row's last token and its draft (``drafts[i]``, at most
        ``positions - 1`` tokens; fillers after it), at the positions that follow its context."""
        ids = verify_inputs(self.tokens[self.slot_index], drafts, positions)
        steps = torch.arange(positions, device=self.device)
        # A filler past a row's last column writes the scratch column: its result is never kept.
        where = (self.positions[self.slot_index, None] + steps).clamp_(max=self.columns)
        width = min(max(self.row_lengths) + positions, self.columns + 1)
        return SlotVerifyRows(ids, where, self.slot_index, self.kv, width)

    def advance_verify(self, fed: Sequence[int], positions: int, tokens: torch.Tensor) -> None:
        """Commit a verify step: row ``i`` keeps the first ``fed[i]`` of its ``positions`` tokens'
        keys and values (the rest are written over later) and ``tokens`` ``[B]`` are fed next."""
        del positions  # a slot's columns are its positions: nothing to mask
        self.tokens[self.slot_index] = tokens
        self.positions[self.slot_index] += device_tensor(list(fed), dtype=torch.long, device=self.device)
        self.row_lengths = [n + f for n, f in zip(self.row_lengths, fed, strict=True)]
        self.record_tokens(tokens)

    def advance(self, tokens: torch.Tensor) -> None:
        """Commit the step: each row's written column becomes part of its context and ``tokens``
        ``[B]`` (row order) are fed next."""
        self.tokens[self.slot_index] = tokens
        self.positions[self.slot_index] += 1
        self.row_lengths = [n + 1 for n in self.row_lengths]
        self.record_tokens(tokens)


@dataclass
class SlotVerifyRows:
    """A speculative verify step over a :class:`SlotBatch`: each row feeds ``T`` tokens (its last
    token and its draft) at positions ``p .. p + T - 1`` of its slot, which are also the columns
    their keys are written to; a refused draft token's column is simply written over later (the
    row's length counts what it kept). Only the rows' own slots are written and read.

    Attributes:
        input_ids, position_ids: ``[B, T]``, in row order.
        slots: ``[B]`` each row's slot.
        kv: The store, ``[layers, 2, slots, Hkv, columns + 1, D]``.
        width: Columns attended: every position written is below it.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    slots: torch.Tensor
    kv: torch.Tensor
    width: int
    _bias: torch.Tensor | None = field(default=None, init=False, repr=False)

    def begin(self, dtype: torch.dtype) -> None:
        columns = torch.arange(self.width, device=self.position_ids.device)
        # [B, 1, T, W]: token j of a row sees its columns up to its own position.
        self._bias = additive_mask(columns[None, None, :] <= self.position_ids[:, :, None], dtype)[:, None]

    def attend(
        self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        assert self._bias is not None, "begin() runs before the first layer"
        b, t = self.input_ids.shape
        d = q.shape[2]
        where = (self.slots[:, None], slice(None), self.position_ids)  # [B, T] (slot, position) pairs
        self.kv[layer, 0][where] = keys.reshape(b, t, -1, d)
        self.kv[layer, 1][where] = values.reshape(b, t, -1, d)
        k = self.kv[layer, 0, :, :, : self.width].index_select(0, self.slots)  # [B, Hkv, W, D]
        v = self.kv[layer, 1, :, :, : self.width].index_select(0, self.slots)
        return verify_attention(q, k, v, self._bias, scaling)


@dataclass
class SlotRows:
    """A decode step over the slots ``[0, S)`` of a :class:`SlotBatch` (see
    :class:`~async_llm.engine.runners.fast_forward.DecodeRows`).

    Attributes:
        input_ids: ``[S, 1]`` the token each slot feeds.
        position_ids: ``[S, 1]`` its position, which is also the column its key is written to.
        kv: The store, ``[layers, 2, slots, Hkv, columns + 1, D]``.
        width: Columns attended: every live row's position is below it.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    kv: torch.Tensor
    width: int
    _bias: torch.Tensor | None = field(default=None, init=False, repr=False)
    _slots: torch.Tensor | None = field(default=None, init=False, repr=False)

    def begin(self, dtype: torch.dtype) -> None:
        s = self.input_ids.shape[0]
        positions = self.position_ids[:, 0]
        columns = torch.arange(self.width, device=positions.device)
        # [S, 1, 1, W]: a row sees its columns up to its position (the key written this step).
        self._bias = additive_mask(columns[None, :] <= positions[:, None], dtype)[:, None, None, :]
        self._slots = torch.arange(s, device=positions.device)

    def attend(
        self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        assert self._bias is not None and self._slots is not None, "begin() runs before the first layer"
        s, positions = q.shape[0], self.position_ids[:, 0]
        self.kv[layer, 0, self._slots, :, positions] = keys  # [S, Hkv, D] at (slot, position)
        self.kv[layer, 1, self._slots, :, positions] = values
        live = self.kv[layer, :, :s, :, : self.width]  # [2, S, Hkv, W, D], read in place
        return grouped_attention(q, live[0], live[1], self._bias, scaling)
