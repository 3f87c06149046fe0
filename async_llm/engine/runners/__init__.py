"""Model runners: how a step's forwards run on a kind of device, behind one protocol.

The engine's step is plan -> run -> update (see :mod:`async_llm.engine.core`); the runner is the
"run". It takes a :class:`~async_llm.engine.prefill.Forward` (prompt chunks, and whether the batch's
rows decode), writes the keys and values it computes (each prompt's into its state's buffer, the
decode rows' into the batch's), and returns the decode rows' logits; a prompt it completes gets its
next-token logits. It also says how it can put a step's chunks into forwards (:meth:`forwards`).

Three runners, chosen once when the engine starts (:func:`select_runner`):

- :class:`~async_llm.engine.runners.fast.FastRunner`: Llama-family models, the decode rows and every
  prompt chunk in one fused forward (prepacked oneDNN weights on a CPU), over the padded batch;
- :class:`~async_llm.engine.runners.static.StaticRunner`: the fast runner's layers over a KV store
  preallocated once in fixed slots, with the decode step captured as CUDA graphs (the default on
  CUDA);
- :class:`~async_llm.engine.runners.transformers.TransformersRunner`: any causal LM, through its own
  forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from async_llm.log import get_logger

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from async_llm.engine.batch import BatchRows
    from async_llm.engine.prefill import Forward, Items
    from async_llm.engine.slot_batch import SlotBatch
    from async_llm.engine.start_checks import CheckStore

log = get_logger("async_llm.engine.runners")


class ModelRunner(Protocol):
    """How the engine runs the model (engine thread only).

    Attributes:
        name: ``"fast"`` or ``"transformers"`` (logged, and read by the benchmarks).
        fused: Prompt chunks ride in the decode step's forward (the chunk budget is then measured
            against the decode step; see :class:`~async_llm.engine.planner.ChunkBudget`).
        can_resume: A prefill may continue after a prefix (prefix cache, chunked prefill).
        speculates: It runs speculative verify steps (``verify(batch, drafts, positions)``: the
            fast runner over the padded batch, the static runner over its slots); the transformers
            runner decodes one token per row and step.
    """

    name: str
    fused: bool
    can_resume: bool
    speculates: bool

    def forwards(self, items: Items, decoding: bool) -> list[Forward]:
        """The forwards of a step that prefills ``items`` and, when ``decoding``, decodes the batch
        (in order; the batch decodes in the last, after the prompts completed before it joined)."""
        ...

    def run(self, forward: Forward, batch: BatchRows) -> torch.Tensor | None:
        """Run ``forward``: its chunks' keys and values into their states' buffers (a state whose
        last token it computes gets ``logits`` [V]), and with ``forward.decode`` one decode step of
        ``batch``'s rows (their new column written). Returns the rows' float32 logits ``[B, V]``,
        or None without decode rows."""
        ...


def select_runner(
    model: Any,
    pad_token_id: int,
    cache_kwarg: str,
    fast_path: bool,
    batch_hint: int,
    owned: bool,
    overhead_tokens: float,
    pair_cost: float,
    checks: CheckStore | None = None,
    slots: SlotBatch | None = None,
    cuda_graphs: bool | None = None,
    quantize: str | None = None,
    calibration_ids: Sequence[int] | None = None,
) -> ModelRunner:
    """The runner for ``model``: with ``slots`` (the engine planned a static store), the static one;
    else the fast one where it applies; both are checked on the model first, and either falls back
    to the transformers one (its own checks run then). Runs the model: call it on the engine's
    thread.

    Args:
        cuda_graphs: Capture the static runner's decode step (None: where the device is CUDA).
        quantize: ``"int8"``: the fast and static runners' products in int8 (see :mod:`.int8`);
            the transformers runner runs the model as it is.
        calibration_ids: The int8 calibration's tokens.
    """
    from async_llm.engine.runners.fast import FastRunner
    from async_llm.engine.runners.fast_check import prepare
    from async_llm.engine.runners.static import DYNAMIC_ROPE_TYPES, StaticRunner
    from async_llm.engine.runners.transformers import TransformersRunner

    why: str | None = "fast_path=False"
    if fast_path:
        decoder, why = prepare(
            model,
            pad_token_id,
            cache_kwarg,
            batch_hint=batch_hint,
            owned=owned,
            checks=checks,
            quantize=quantize,
            calibration_ids=calibration_ids,
        )
        if decoder is not None and slots is not None:
            graphs = cuda_graphs if cuda_graphs is not None else slots.device.type == "cuda"
            rope = str(getattr(model.model.rotary_emb, "rope_type", "default"))
            if graphs and rope in DYNAMIC_ROPE_TYPES:
                log.info("decode graphs off: the model's rope frequencies change with the context", rope=rope)
                graphs = False
            return StaticRunner(decoder, slots, graphs=graphs)
        if decoder is not None:
            return FastRunner(decoder)
    # int8 products are the fast step's: without it the model runs in its own dtype (said once, here).
    unquantized = {"quantize": f"{quantize} off (the fast runner's)"} if quantize else {}
    log.info("fast runner off; running the transformers forward", reason=why, **unquantized)
    runner = TransformersRunner(model, cache_kwarg, pad_token_id, overhead_tokens, pair_cost, checks)
    runner.prepare()
    return runner
