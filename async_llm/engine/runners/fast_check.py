"""Whether the fast forward serves a model: its layout (:func:`unsupported_reason`) and, on the model
itself, its logits against the transformers forward's (:func:`prepare`).

Results equal the transformers step up to floating-point rounding (different kernels sum in
different orders, fuse products, round intermediate results at different points). In float32 logits
agree to ~1e-5 relative and greedy tokens differ only where two logits tie within that. In bfloat16
or float16 every rounding is the dtype's (half an ulp), and logits differ by about its precision (1 to
5 eps of the largest on random Llamas): the verdict (:func:`agreement`, which other runners reuse)
then takes a tolerance scaled to the dtype and compares greedy tokens over a few decode steps. The
verdict of a model loaded from files is kept (see :mod:`async_llm.engine.start_checks`), so later
starts skip the check's forwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from async_llm.engine.model_api import input_device, last_logits, probe_batch, probe_prompts, vocab_size
from async_llm.engine.runners.fast_forward import Chunk, FastDecoder
from async_llm.engine.start_checks import CheckStore, remembered
from async_llm.log import get_logger

log = get_logger("async_llm.engine.runners.fast_check")

#: Architectures whose decoder layers are the Llama layer (RMSNorm, rotary q/k, SiLU-gated MLP);
#: Qwen3 adds per-head q/k norms, Qwen2 biases on q/k/v.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

#: Largest difference of logits between the fast and the plain step accepted by the check in float32
#: (and float64), relative to the largest logit (float32 reassociation stays orders of magnitude below it).
TOLERANCE = 1e-3

#: The dtypes :data:`TOLERANCE` applies to; narrower ones get :data:`LOW_PRECISION_EPS`.
FULL_PRECISION = frozenset({torch.float32, torch.float64})

#: In a narrower dtype, the largest difference accepted in units of its machine epsilon (relative to
#: the largest logit): 8 eps, 6.3e-2 in bfloat16, 7.8e-3 in float16. Two correct forwards there differ
#: by their roundings: every product and every residual addition rounds to the dtype (half an ulp),
#: differently where one fuses what the other does in two, the rounded hidden state reaches the logits
#: through the final norm and the head, and each decode step reads keys and values so rounded.
#: Measured over the check's forwards (prefill and 4 decode steps), bf16 and fp16 alike: 1 to 2 eps on
#: random Llamas of 8 to 24 layers with weights of the usual spread, up to 5 eps on the test suite's
#: 2-layer ones whose wide weights (std 0.3) amplify roundings. 8 eps is above all of those, while a
#: wrong forward (rotary, mask, norm, a missing bias, a wrong weight) moves logits by their own size;
#: the greedy comparison (:func:`agreement`) is the finer test within it.
LOW_PRECISION_EPS = 8

#: Greedy decode steps the check compares in a narrower dtype (one in full precision).
GREEDY_STEPS = 4


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
    quantize: str | None = None,
    calibration_ids: Sequence[int] | None = None,
) -> tuple[FastDecoder | None, str | None]:
    """Build the fast step for ``model`` and check it against the plain transformers step.

    Args:
        model: The causal LM.
        pad_token_id: Padding id for the check's prompts.
        cache_name: The keyword the model's forward takes its cache by (see ``model_api.cache_kwarg``).
        batch_hint: Batch size the prepacked products are tuned for.
        owned: Whether the library loaded ``model`` (see :class:`FastDecoder`).
        checks: Verdicts kept for the model's files (see :mod:`async_llm.engine.start_checks`).
        quantize: ``"int8"``: the fast step's products in int8 (see :mod:`.int8`), once the float
            step passed its check; where int8 cannot run, the float step, with one log line.
        calibration_ids: The int8 calibration's tokens (None: tokens drawn from the vocabulary).

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
        return _difference(decoder, model, pad_token_id, cache_name)

    context = {
        "pad_token_id": str(pad_token_id),
        "cache_kwarg": cache_name,
        "batch_hint": str(batch_hint),
        # The verdict holds for the dtype the forwards ran in only (its tolerance is the dtype's).
        "compute_dtype": str(_compute_dtype(model)),
    }
    reason = remembered(checks, model, "fast_decode", context, check, valid=lambda v: v is None or isinstance(v, str))
    if reason is not None:
        return None, reason

    def float_decoder() -> FastDecoder:
        return decoder if decoder is not None else FastDecoder(model, batch_hint, owned)

    if quantize == "int8":
        from async_llm.engine.runners import int8

        why = int8.unavailable_reason(model)
        if why is None:
            ids = calibration_ids if calibration_ids is not None else int8.drawn_ids(vocab_size(model))
            smoothing = int8.smoothing_for(model, float_decoder, ids, checks, context)
            decoder = None  # its packed weights go before the int8 ones are made
            return FastDecoder(model, batch_hint, owned, quantize="int8", smoothing=smoothing), None
        log.info("int8 off; the fast step runs in the model's dtype", reason=why)
    return float_decoder(), None


def tolerance(dtype: torch.dtype) -> float:
    """Largest difference of logits accepted between two forwards of the same model computed in
    ``dtype``, relative to the largest logit: :data:`TOLERANCE` in float32 and float64,
    :data:`LOW_PRECISION_EPS` of the dtype's machine epsilon in a narrower one.

    Raises:
        ValueError: ``dtype`` is not a floating-point dtype.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"logits are computed in a floating-point dtype, not {dtype}")
    if dtype in FULL_PRECISION:
        return TOLERANCE
    return max(TOLERANCE, LOW_PRECISION_EPS * torch.finfo(dtype).eps)


def agreement(reference: torch.Tensor, candidate: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Whether a runner's logits agree with the plain transformers forward's, both computed in
    ``dtype``: the start-up check's verdict on one forward.

    In float32 and float64 the logits must agree within :data:`TOLERANCE` of the largest. In a
    narrower dtype, within :func:`tolerance` of it, and the greedy token of every row must be the
    reference's, unless the reference's logit of the token taken is within that tolerance of its
    top one (a near-tie that rounding may flip).

    Args:
        reference: ``[N, V]`` float32 logits of the plain forward.
        candidate: ``[N, V]`` float32 logits of the runner under check, of the same inputs.
        dtype: The dtype both forwards computed in.

    Returns:
        None when they agree, else why not (for the log line "fast runner off; ... reason=").

    Raises:
        ValueError: ``dtype`` is not a floating-point dtype.
    """
    limit = tolerance(dtype)
    bound = f"{limit:g}" if dtype in FULL_PRECISION else f"{limit:g} in {str(dtype).removeprefix('torch.')}"
    scale = reference.abs().max().clamp(min=1e-6)
    difference = float((reference - candidate).abs().max() / scale)
    if not difference <= limit:  # NaN too (an overflow in float16 say): it compares false
        return f"its logits differ from the plain step's by {difference:.1e} of the largest (> {bound})"
    if dtype in FULL_PRECISION:
        return None
    taken = candidate.argmax(-1, keepdim=True)  # [N, 1]
    gaps = (reference.max(-1, keepdim=True).values - reference.gather(-1, taken))[:, 0] / scale  # [N]
    row = int(gaps.argmax())
    if float(gaps[row]) > limit:
        expected = int(reference[row].argmax())
        return (
            f"its greedy token differs from the plain step's ({int(taken[row])} for {expected}, whose logits"
            f" are {float(gaps[row]):.1e} of the largest apart: > {bound})"
        )
    return None


def compared_logits(
    decoder: FastDecoder, model: Any, pad_token_id: int, cache_name: str, steps: int
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """The logits of the plain transformers forward and of ``decoder`` on the probe prompts
    (:func:`~async_llm.engine.model_api.probe_prompts`), side by side: after their prefill (the fast
    one packed, the longer prompt in two chunks, its second after a prefix), then after each of
    ``steps`` greedy decode steps.

    Each side decodes on its own: the plain one over its DynamicCache, the fast one over a padded
    batch buffer holding its own prefill's keys and values, each fed its own greedy tokens. A row
    whose tokens parted (a near-tie flipped, see :func:`agreement`) is compared no further, its
    inputs differing from then on.

    Yields:
        ``(where, reference, candidate)``: which forward (for the reason), and the ``[n, V]``
        float32 logits of the ``n`` rows still compared.
    """
    device = input_device(model)
    ids, mask = probe_batch(pad_token_id, device, vocab_size(model))  # [rows, width], left-padded
    rows, width = ids.shape
    cache = DynamicCache()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    reference = last_logits(model, cache_name, cache, input_ids=ids, attention_mask=mask, position_ids=positions)
    # The fast prefill of the same prompts, the longer one in two chunks (its second after a prefix).
    short, long = probe_prompts(vocab_size(model))
    buffers = [decoder.new_kv(len(short)), decoder.new_kv(len(long))]  # [layers, 2, Hkv, n, D] each
    candidate = decoder.prefill([Chunk(short, buffers[0]), Chunk(long[:2], buffers[1], logits=False)])
    candidate = torch.cat([candidate, decoder.prefill([Chunk(long[2:], buffers[1], start=2)])])
    yield "after the prompts", reference, candidate
    # The batch's layout: [layers, 2, rows, Hkv, width + steps, D], prompts left-padded, a free column
    # per step, padding zeroed (it is masked, but a NaN of uninitialised memory would get through).
    layers, _, kv_heads, _, head_dim = buffers[0].shape
    kv = buffers[0].new_zeros(layers, 2, rows, kv_heads, width + steps, head_dim)
    for row, buffer in enumerate(buffers):
        kv[:, :, row, :, width - buffer.shape[3] : width] = buffer
    live = torch.ones(rows, dtype=torch.bool, device=device)  # rows whose inputs are still the same
    for step in range(steps):
        plain_tokens = reference.argmax(-1, keepdim=True)  # [rows, 1]
        fast_tokens = candidate.argmax(-1, keepdim=True)
        live &= (plain_tokens == fast_tokens)[:, 0]
        if not bool(live.any()):
            return
        full = torch.cat([mask, torch.ones_like(mask[:, :1]).expand(rows, step + 1)], dim=1)
        positions = mask.sum(-1, keepdim=True) + step  # [rows, 1]
        reference = last_logits(
            model, cache_name, cache, input_ids=plain_tokens, attention_mask=full, position_ids=positions
        )
        candidate = decoder.decode(fast_tokens, positions, full, kv, end=width + step)
        yield f"decode step {step + 1}", reference[live], candidate[live]


def _difference(decoder: FastDecoder, model: Any, pad_token_id: int, name: str) -> str | None:
    """The check's forwards (:func:`compared_logits`, one decode step in full precision, a few in a
    narrower dtype), each judged by :func:`agreement`: None when all agree, else why not."""
    dtype = _compute_dtype(model)
    steps = 1 if dtype in FULL_PRECISION else GREEDY_STEPS
    for where, reference, candidate in compared_logits(decoder, model, pad_token_id, name, steps):
        why = agreement(reference, candidate, dtype)
        if why is not None:
            return f"{why}, {where}"
    return None


def _compute_dtype(model: Any) -> torch.dtype:
    """The dtype the fast step computes in: its hidden states start as the embedding's rows."""
    dtype: torch.dtype = model.get_input_embeddings().weight.dtype
    return dtype
