"""Whether the fast forward serves a model: its layout (:func:`unsupported_reason`) and, on the model
itself, its logits against the transformers forward's (:func:`prepare`).

Results equal the transformers step up to floating-point reassociation (different kernels sum in
different orders): logits agree to ~1e-5 relative in float32, and greedy tokens differ only where two
logits tie within that. The verdict of a model loaded from files is kept (see
:mod:`async_llm.engine.start_checks`), so later starts skip the check's forwards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from async_llm.engine.model_api import PROBE_PROMPTS, input_device, last_logits, layer_kv, probe_batch
from async_llm.engine.runners.fast_forward import Chunk, FastDecoder
from async_llm.engine.start_checks import CheckStore, remembered

#: Architectures whose decoder layers are the Llama layer (RMSNorm, rotary q/k, SiLU-gated MLP);
#: Qwen3 adds per-head q/k norms, Qwen2 biases on q/k/v.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

#: Largest difference of logits between the fast and the plain step accepted by the check, relative
#: to the largest logit (float32 reassociation stays orders of magnitude below it).
TOLERANCE = 1e-3


def unsupported_reason(model: Any) -> str | None:
    """Why the fast step cannot serve ``model`` (None when it can, pending the numeric check)."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"architecture {model_type!r} is not one of {sorted(SUPPORTED_MODEL_TYPES)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (the fast step implements silu)"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(config, "quantization_config", None) is not None:
        return "a quantized model"
    body = getattr(model, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(body, "rotary_emb"):
        return "not the Llama module layout (model.layers, model.rotary_emb)"
    for module in model.modules():
        if hasattr(module, "_hf_hook"):
            return "weights dispatched by accelerate (device_map)"
    for layer in body.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = [(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
        linears = [getattr(owner, n, None) for owner, n in names]
        if any(type(m) is not nn.Linear for m in linears):
            return "a layer whose projections are not plain nn.Linear (another layout, quantized or adapted)"
        if any(m is not None and m.bias is not None for m in linears[4:6]):  # gate_proj, up_proj
            return "an MLP with biases"
    return None


def prepare(
    model: Any,
    pad_token_id: int,
    cache_name: str,
    batch_hint: int = 16,
    owned: bool = False,
    checks: CheckStore | None = None,
) -> tuple[FastDecoder | None, str | None]:
    """Build the fast step for ``model`` and check it against the plain transformers step.

    Args:
        model: The causal LM.
        pad_token_id: Padding id for the check's prompts.
        cache_name: The keyword the model's forward takes its cache by (see ``model_api.cache_kwarg``).
        batch_hint: Batch size the prepacked products are tuned for.
        owned: Whether the library loaded ``model`` (see :class:`FastDecoder`).
        checks: Verdicts kept for the model's files (see :mod:`async_llm.engine.start_checks`).

    Returns:
        ``(decoder, None)`` when the fast step applies, else ``(None, why)``.
    """
    reason = unsupported_reason(model)
    if reason is not None:
        return None, reason
    decoder: FastDecoder | None = None

    def check() -> str | None:
        nonlocal decoder
        decoder = FastDecoder(model, batch_hint, owned)
        difference = _difference(decoder, model, pad_token_id, cache_name)
        if difference > TOLERANCE:
            return f"its logits differ from the plain step's by {difference:.1e} of the largest (> {TOLERANCE})"
        return None

    context = {"pad_token_id": str(pad_token_id), "cache_kwarg": cache_name, "batch_hint": str(batch_hint)}
    reason = remembered(checks, model, "fast_decode", context, check, valid=lambda v: v is None or isinstance(v, str))
    if reason is not None:
        return None, reason
    return decoder if decoder is not None else FastDecoder(model, batch_hint, owned), None


def _difference(decoder: FastDecoder, model: Any, pad_token_id: int, name: str) -> float:
    """Largest difference of next-token logits, fast against plain, relative to the largest logit:
    of a prefill of two short prompts, and of the decode step after it."""
    device = input_device(model)
    ids, mask = probe_batch(pad_token_id, device)
    rows, width = ids.shape
    cache = DynamicCache()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    prefill = last_logits(model, name, cache, input_ids=ids, attention_mask=mask, position_ids=positions)
    tokens = prefill.argmax(-1, keepdim=True)  # [rows, 1]
    layers = [layer_kv(layer) for layer in cache.layers]
    keys = layers[0][0]
    shape = (len(layers), 2, rows, keys.shape[1], width + 1, keys.shape[3])
    kv = torch.zeros(shape, dtype=keys.dtype, device=device)
    keep = mask.bool()[:, None, :, None]
    for i, (k, v) in enumerate(layers):  # the batch's layout: padding zeroed, one free column
        kv[i, 0, :, :, :width] = torch.where(keep, k, 0)
        kv[i, 1, :, :, :width] = torch.where(keep, v, 0)
    full = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    positions = mask.sum(-1, keepdim=True)  # [rows, 1]
    plain = last_logits(model, name, cache, input_ids=tokens, attention_mask=full, position_ids=positions)
    fast = decoder.decode(tokens, positions, full, kv, end=width)
    # The fast prefill of the same prompts, the longer one in two chunks (its second after a prefix).
    short, long = PROBE_PROMPTS
    buffers = [decoder.new_kv(len(short)), decoder.new_kv(len(long))]
    fast_prefill = decoder.prefill([Chunk(short, buffers[0]), Chunk(long[:2], buffers[1], logits=False)])
    fast_prefill = torch.cat([fast_prefill, decoder.prefill([Chunk(long[2:], buffers[1], start=2)])])
    return max(
        float((plain - fast).abs().max() / plain.abs().max().clamp(min=1e-6)),
        float((prefill - fast_prefill).abs().max() / prefill.abs().max().clamp(min=1e-6)),
    )
