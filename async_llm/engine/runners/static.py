"""The static runner: the fast runner's layers over a KV store preallocated once, with the decode
step captured as CUDA graphs. The default on CUDA; it also runs (eagerly) on a CPU, where the tests
check it.

- The batch is a :class:`~async_llm.engine.slot_batch.SlotBatch`: one fixed slot per row, sized from
  the KV budget when the engine starts; a prompt is prefilled straight into the slot it decodes in.
- A step with prompt chunks runs them and the decode rows in one forward, eagerly (as the fast
  runner); a decode-only step replays a captured graph (:mod:`.cuda_graphs`) of its bucketed shape.
- The decode step's logits come back in the batch's row order: ``[B, V]``, gathered on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch

from async_llm.engine.batch import BatchRows
from async_llm.engine.config import EngineConfig
from async_llm.engine.kv_budget import (
    DEFAULT_STATIC_ROWS,
    SlotPlan,
    default_max_model_len,
    kv_budget_bytes,
    kv_bytes_per_token,
    plan_slots,
)
from async_llm.engine.model_api import vocab_size
from async_llm.engine.prefill import Forward
from async_llm.engine.runners.cuda_graphs import DecodeGraphs
from async_llm.engine.runners.fast import FastRunner
from async_llm.engine.runners.fast_check import unsupported_reason
from async_llm.engine.runners.fast_forward import Chunk, FastDecoder, layer_products
from async_llm.engine.slot_batch import SlotBatch
from async_llm.errors import InvalidParameterError
from async_llm.log import get_logger

log = get_logger("async_llm.engine.runners.static")

#: Rope types whose frequencies depend on the longest position seen (transformers reads it back
#: to the host every forward): their decode step cannot be captured as a graph.
DYNAMIC_ROPE_TYPES = frozenset({"dynamic", "longrope"})


def wants_static(model: Any, config: EngineConfig, device: torch.device) -> bool:
    """Whether the engine runs ``model`` with the static runner: asked for (``runner="static"``),
    or by default on CUDA where the model's layout is supported.

    Raises:
        InvalidParameterError: ``runner="static"`` for a model it cannot run (``.param`` ``"runner"``).
    """
    requested = config.requested_runner
    why = unsupported_reason(model)
    if requested == "static" and why is not None:
        raise InvalidParameterError("runner", f"runner='static' cannot run this model: {why}")
    if requested is not None:
        return requested == "static"
    return device.type == "cuda" and why is None


def activation_bytes(model: Any, rows: int, prefill_tokens: int) -> int:
    """Memory a forward needs besides the weights and the KV store, kept out of the KV budget: the
    hidden states of the largest prefill (its widest intermediate a few times over) and the decode
    step's float32 logits with the sampler's copies of them."""
    text = model.config.get_text_config()
    dtype = next(model.parameters()).dtype
    width = text.hidden_size * 4 + getattr(text, "intermediate_size", 4 * text.hidden_size) * 3
    return int(prefill_tokens * width * dtype.itemsize * 2 + rows * vocab_size(model) * 4 * 4)


def fused_copy_bytes(model: Any) -> int:
    """What the fast step's fused products (q, k and v; gate and up) hold besides a model passed in
    by the caller, whose own weights stay as they are: a copy of those weights (the library's own
    model shares them instead, see :func:`~async_llm.engine.runners.fast_linear.fused_linear`)."""
    total = 0
    for layer in model.model.layers:
        for modules in layer_products(layer):
            if len(modules) > 1:
                total += sum(p.numel() * p.element_size() for m in modules for p in m.parameters(recurse=False))
    return total


def plan_static(model: Any, config: EngineConfig, device: torch.device, owned: bool = False) -> SlotPlan | None:
    """The static runner's store for ``model`` (None when another runner runs it): ``max_model_len``
    columns per slot and as many slots as the budget holds (or ``max_batch_size``). The budget
    keeps back the largest forward's activations and, for a model passed in (not ``owned``), the
    fast step's copy of its fused weights (:func:`fused_copy_bytes`).

    Raises:
        InvalidParameterError: The budget cannot hold what is asked (see
            :func:`~async_llm.engine.kv_budget.plan_slots`), or the runner cannot run the model.
    """
    if not wants_static(model, config, device):
        return None
    text = model.config.get_text_config()
    columns = default_max_model_len(text, config.max_model_len)
    dtype = next(model.parameters()).dtype
    rows_hint = config.max_batch_size or DEFAULT_STATIC_ROWS
    reserve = activation_bytes(model, rows_hint, config.max_prefill_tokens)
    if not owned and config.quantize is None:  # int8 holds its own weights instead (no float copy)
        reserve += fused_copy_bytes(model)
    budget = kv_budget_bytes(device, config.gpu_memory_utilization, config.kv_cache_bytes, activation_bytes=reserve)
    plan = plan_slots(kv_bytes_per_token(text, dtype), budget, columns, config.max_batch_size)
    log.info("static KV store planned", rows=plan.rows, columns=plan.columns, bytes=plan.bytes)
    return plan


class StaticRunner(FastRunner):
    """Runs :class:`FastDecoder` over a :class:`SlotBatch`, with captured decode graphs when given
    (the fast runner's forwards otherwise: prompt chunks ride in the decode step's forward).

    Args:
        decoder: The layers (built and checked by ``fast_check.prepare``).
        batch: The engine's batch; the runner reads its store and writes prompts into its slots.
        graphs: Whether to capture the decode step as CUDA graphs (a CUDA device only).
    """

    name = "static"
    speculates = True  # verify steps run eagerly (the graphs capture the one-token decode step)

    def __init__(self, decoder: FastDecoder, batch: SlotBatch, graphs: bool) -> None:
        super().__init__(decoder)
        self.batch = batch
        self.graphs = DecodeGraphs(decoder, batch) if graphs else None
        if self.graphs is not None:
            self.graphs.capture()  # the start-up sizes; their time is logged and kept on the graphs

    def verify(self, batch: BatchRows, drafts: Sequence[Sequence[int]], positions: int) -> torch.Tensor:
        """A speculative verify step over the slots (see :meth:`SlotBatch.verify_rows`); returns
        float32 logits ``[B, T, V]`` in row order."""
        batch = cast(SlotBatch, batch)
        assert batch is self.batch, "the static runner runs the batch it was built with"
        logits, _ = self.decoder.step(batch.verify_rows(drafts, positions), [])  # [B T, V]
        return logits.view(batch.size, positions, -1)

    def _chunk(self, ids: Sequence[int], kv: torch.Tensor, start: int, logits: bool) -> Chunk:
        """As the fast runner's, with the slot of the store ``kv`` is in: the step's fresh prompts
        write their keys and values into the store together (see :class:`Chunk`)."""
        slot = self.batch.slot_of(kv)
        store = self.batch.kv if slot is not None else None
        return Chunk(ids, kv, start, logits=logits, store=store, slot=slot)

    def run(self, forward: Forward, batch: BatchRows) -> torch.Tensor | None:
        batch = cast(SlotBatch, batch)
        assert batch is self.batch, "the static runner runs the batch it was built with"
        rows = batch.decode_rows() if forward.decode else None
        logits = None
        if rows is not None and not forward.items and self.graphs is not None:
            logits = self.graphs.run(rows)  # [S, V]
        if logits is None:
            logits = self._forward(rows, forward, batch.new_kv)  # [S, V]; prompts into their slots
        return logits[batch.slot_index].float() if rows is not None else None  # [B, V], the rows' order
