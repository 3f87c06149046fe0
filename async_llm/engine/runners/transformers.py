"""The transformers runner: any causal LM through its own forward.

Prompts computed whole from nothing are padded or packed together as
:func:`~async_llm.engine.runners.transformers_prefill.prefill_groups` finds cheapest; a chunk after a prefix runs alone,
with the prefix passed as the model's cache; the decode step runs the model over the batch's buffer
(:class:`~async_llm.engine.batch.PaddedKVCache`). What the model allows is checked on it when the
engine starts (:meth:`TransformersRunner.prepare`): models where a prefill after a prefix does not
give the logits of a whole prefill are prefilled whole and keep no prefix cache.
"""

from __future__ import annotations

from typing import Any

import torch

from async_llm.engine.batch import BatchRows, PaddedBatch
from async_llm.engine.model_api import input_device, last_logits, probe_batch, probe_prompts, vocab_size
from async_llm.engine.prefill import Forward, Items, PrefillState, materialize
from async_llm.engine.runners.transformers_prefill import (
    forward_packed,
    forward_padded,
    forward_resume,
    prefill_groups,
    sliding,
)
from async_llm.engine.start_checks import CheckStore, remembered
from async_llm.log import get_logger

log = get_logger("async_llm.engine.runners.transformers")

#: Prompts admitted together are prefilled in several forwards only when that saves at least this
#: share of the compute of one (see :func:`prefill_groups`).
PREFILL_MIN_SAVING = 0.25


class TransformersRunner:
    """Runs the model's own forward.

    Args:
        model: The causal LM.
        cache_kwarg: The keyword its forward takes a cache by (``model_api.cache_kwarg``).
        pad_token_id: Padding id of padded prefills.
        overhead_tokens, pair_cost: The prefill cost model (see :func:`prefill_groups`).
        checks: Verdicts of the start-up checks kept for the model's files, or None.
    """

    name = "transformers"
    speculates = False
    fused = False  # a chunk is a forward of its own

    def __init__(
        self,
        model: Any,
        cache_kwarg: str,
        pad_token_id: int,
        overhead_tokens: float,
        pair_cost: float,
        checks: CheckStore | None = None,
    ) -> None:
        self.checks = checks
        self.model = model
        self.cache_kwarg = cache_kwarg
        self.pad_token_id = pad_token_id
        self.overhead_tokens = overhead_tokens
        self.pair_cost = pair_cost
        self.can_pack = False  # prompts may be packed into one sequence (checked by prepare)
        self.can_resume = False  # a prefill may continue after a prefix (checked by prepare)

    # -- start-up checks (engine thread) ----------------------------------------------------------------
    def prepare(self) -> None:
        """Decide, on the model itself, whether prompts may be packed and a prefill may continue
        after a prefix (verdicts kept for models loaded from files)."""
        context = {"pad_token_id": str(self.pad_token_id), "cache_kwarg": self.cache_kwarg}
        self.can_pack = remembered(
            self.checks,
            self.model,
            "packed_prefill",
            context,
            self._packing_agrees,
            valid=lambda v: isinstance(v, bool),
        )
        why = (
            "sliding-window attention layers"
            if sliding(self.model)
            else remembered(
                self.checks,
                self.model,
                "prefill_resume",
                context,
                self._resume_disagrees,
                valid=lambda v: v is None or isinstance(v, str),
            )  # fmt: skip
        )
        self.can_resume = why is None
        if why is not None:
            log.info("prefix cache and chunked prefill off for this model; prompts prefill whole", reason=why)

    def _packing_agrees(self) -> bool:
        """A packed prefill of two short prompts gives this model's padded logits. An architecture
        that does not honour a custom 4-D mask, or derives something else from the 2-D one (ALiBi
        biases, for one), would not; it then keeps padded prefills only."""
        if getattr(self.model.config, "_attn_implementation", None) != "sdpa" or sliding(self.model):
            return False
        ids, mask = probe_batch(self.pad_token_id, input_device(self.model), vocab_size(self.model))
        try:
            with torch.inference_mode():
                padded, _ = forward_padded(self.model, self.cache_kwarg, ids, mask)
                packed, _ = forward_packed(
                    self.model, self.cache_kwarg, [list(p) for p in probe_prompts(vocab_size(self.model))], ids.shape[1]
                )
        except torch.OutOfMemoryError:
            raise  # not a property of the architecture: the model does not fit, say so
        except Exception as exc:  # noqa: BLE001  # whatever the model rejects, padded prefills remain
            log.info("packed prefill unavailable", error=repr(exc))
            return False
        agrees = bool((padded - packed).abs().max() <= 0.02 * padded.abs().max())
        if not agrees:
            log.info("packed prefill disagrees with padded prefill for this model; prefills stay padded")
        return agrees

    def _resume_disagrees(self) -> str | None:
        """Why a prefill that continues after a prefix (its keys and values passed as the cache) does
        not give this model's logits of the whole prompt, or None when it does."""
        tokens = list(probe_prompts(vocab_size(self.model))[1])
        try:
            with torch.inference_mode():
                whole = forward_resume(self.model, self.cache_kwarg, tokens, None, 0, len(tokens))[0]
                kv = forward_resume(self.model, self.cache_kwarg, tokens, None, 0, 2)[1]
                resumed = forward_resume(self.model, self.cache_kwarg, tokens, kv, 2, len(tokens) - 2)[0]
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001  # whatever the model rejects, whole prefills remain
            return f"a prefill after a prefix fails: {exc!r}"
        difference = float((whole - resumed).abs().max() / whole.abs().max().clamp(min=1e-6))
        return None if difference <= 1e-3 else f"a prefill after a prefix differs by {difference:.1e}"

    # -- a step's forwards ----------------------------------------------------------------------------
    def forwards(self, items: Items, decoding: bool) -> list[Forward]:
        """Whole prompts grouped by :func:`prefill_groups`, then each chunk after a prefix alone,
        then the decode step."""
        fresh = [(s, n) for s, n in items if s.done == 0 and n == s.remaining]
        resumed = [Forward([item], "resume") for item in items if item not in fresh]
        if len(fresh) == 1:
            forwards = [Forward(fresh, "padded")]
        else:
            groups = prefill_groups(
                [len(s.tokens) for s, _ in fresh],
                self.overhead_tokens,
                self.pair_cost,
                self.can_pack,
                min_saving=PREFILL_MIN_SAVING,
            )
            forwards = [
                Forward([fresh[i] for i in group], "packed" if packed else "padded") for group, packed in groups
            ]
        return [*forwards, *resumed, Forward([], decode=True)]

    def run(self, forward: Forward, batch: BatchRows) -> torch.Tensor | None:
        assert isinstance(batch, PaddedBatch), "this runner decodes the padded batch"
        if forward.decode:
            if forward.items:
                raise ValueError("the transformers runner decodes in a forward of its own")
            return last_logits(self.model, self.cache_kwarg, batch.cache, **batch.decode_inputs())  # [B, V]
        if forward.mode == "resume":
            ((state, n),) = forward.items
            self._resume(state, n)
        else:
            self._whole([s for s, _ in forward.items], packed=forward.mode == "packed")
        return None

    def _resume(self, state: PrefillState, n: int) -> None:
        """``n`` more tokens of ``state`` after the columns it holds (the prefix passed as the cache)."""
        materialize(state, None)
        logits, kv = forward_resume(self.model, self.cache_kwarg, state.tokens, state.kv, state.done, n)
        if state.kv is None:
            state.kv = kv.new_empty(*kv.shape[:3], len(state.tokens), kv.shape[4])
        state.kv[:, :, :, state.done : state.done + n] = kv[:, :, :, state.done :]
        state.logits = logits[0]

    def _whole(self, states: list[PrefillState], packed: bool) -> None:
        """Whole prompts, padded or packed; each state gets its columns ``[layers, 2, H, L, D]``."""
        u, p = len(states), max(len(s.tokens) for s in states)
        if packed:
            logits, kv = forward_packed(self.model, self.cache_kwarg, [s.tokens for s in states], p)
        else:
            ids = torch.full((u, p), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros(u, p, dtype=torch.long)
            for i, state in enumerate(states):  # left padding: prompts are right-aligned
                ids[i, p - len(state.tokens) :] = torch.tensor(state.tokens)
                mask[i, p - len(state.tokens) :] = 1
            device = input_device(self.model)
            logits, kv = forward_padded(self.model, self.cache_kwarg, ids.to(device), mask.to(device))
        stacked = torch.stack([torch.stack(pair, dim=1) for pair in kv])  # [layers, u, 2, H, P, D]
        for i, state in enumerate(states):
            state.kv = stacked[:, i, :, :, p - len(state.tokens) :].contiguous()
            state.logits = logits[i]
