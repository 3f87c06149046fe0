"""Fast prefill and decode steps for Llama-family models, over the engine's padded KV buffer.

The same arithmetic as the transformers forward of one new token per row, in fewer and larger
operations, with no per-step mask building and no module or keyword dispatch:

- q, k and v are one matrix product (their weights concatenated), and so are the MLP's gate and up;
  the original modules keep working on views of the concatenated weights (no extra memory);
- attention reads the live region of the batch's KV buffer in place; grouped-query attention runs
  each key/value head against its group of query heads as a short query sequence, so keys and values
  are never repeated; the padding mask is one additive bias shared by every layer;
- on a CPU in float32 the output projection (vocabulary x hidden, the largest matrix of a small
  model) runs through oneDNN with a prepacked weight, which multiplies it about twice as fast as the
  default kernel (``benchmarks/``); elsewhere it is a plain linear.

Prefills run the same layers over the admitted prompts packed along one token axis (no padding is
computed), each prompt attending causally to itself only. Results equal the transformers step up to floating-point
reassociation (different kernels sum in different orders): logits agree to ~1e-5 relative, and
greedy tokens differ only where two logits tie within that. :func:`prepare` checks this on the model
itself before the engine uses the fast step, and returns the reason when it cannot apply. The
verdict of a model loaded from files is kept (see :mod:`async_llm.engine.start_checks`), so later
starts skip the check's forwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache

from async_llm.engine.model_api import PROBE_PROMPTS, input_device, last_logits, layer_kv, probe_batch
from async_llm.engine.start_checks import remembered
from async_llm.log import get_logger

log = get_logger("async_llm.engine.fast_decode")

#: Architectures whose decoder layers are the Llama layer (RMSNorm, rotary q/k, SiLU-gated MLP);
#: Qwen3 adds per-head q/k norms, Qwen2 biases on q/k/v.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

#: Row counts of a prefill are rounded up to a multiple of this, and of a decode step with prompt
#: chunks (small, where every row costs as much as a decode row) to a multiple of the second (see
#: FastDecoder.step).
ROWS_BUCKET = 16
MIXED_ROWS_BUCKET = 4

#: Largest difference of logits between the fast and the plain step accepted by the check, relative
#: to the largest logit (float32 reassociation stays orders of magnitude below it).
TOLERANCE = 1e-3

Linear = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Layer:
    """One decoder layer: its norms' weights and its four matrix products."""

    input_norm: torch.Tensor  # [E]
    qkv: Linear  # [B, E] -> [B, (Hq + 2 Hkv) D]
    o: Linear  # [B, Hq D] -> [B, E]
    post_norm: torch.Tensor  # [E]
    gate_up: Linear  # [B, E] -> [B, 2 I]
    down: Linear  # [B, I] -> [B, E]
    q_norm: torch.Tensor | None  # [D] (Qwen3)
    k_norm: torch.Tensor | None


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


def _concat_in_place(modules: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of ``modules`` along the output dimension, and make each
    module's parameters views into the result, so nothing is held twice."""
    weight = torch.cat([m.weight.detach() for m in modules])
    biases = [m.bias for m in modules]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [b.detach() if b is not None else weight.new_zeros(m.out_features) for m, b in zip(modules, biases)]
        )
    row = 0
    for m in modules:
        n = m.out_features
        m.weight = nn.Parameter(weight[row : row + n], requires_grad=False)
        if m.bias is not None and bias is not None:
            m.bias = nn.Parameter(bias[row : row + n], requires_grad=False)
        row += n
    return weight, bias


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FastDecoder:
    """The decode step of a supported model (build it with :func:`prepare`).

    Args:
        model: A transformers causal LM that :func:`unsupported_reason` accepts.
        batch_hint: The batch size oneDNN tunes the prepacked output projection for (any size works).
    """

    def __init__(self, model: Any, batch_hint: int = 16) -> None:
        config = model.config
        body = model.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = self.head_dim**-0.5
        self.eps = float(getattr(config, "rms_norm_eps", 1e-6))
        self.embed = body.embed_tokens
        self.rotary = body.rotary_emb
        self.norm = body.norm.weight
        self.layers: list[_Layer] = []
        for layer in body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv, qkv_bias = _concat_in_place([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up, _ = _concat_in_place([mlp.gate_proj, mlp.up_proj])
            q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
            self.layers.append(
                _Layer(
                    input_norm=layer.input_layernorm.weight,
                    qkv=prepacked_linear(qkv, qkv_bias, batch_hint),
                    o=prepacked_linear(attn.o_proj.weight, attn.o_proj.bias, batch_hint),
                    post_norm=layer.post_attention_layernorm.weight,
                    gate_up=prepacked_linear(gate_up, None, batch_hint),
                    down=prepacked_linear(mlp.down_proj.weight, mlp.down_proj.bias, batch_hint),
                    q_norm=None if q_norm is None else q_norm.weight,
                    k_norm=None if k_norm is None else k_norm.weight,
                )
            )
        head = model.get_output_embeddings()
        self.lm_head = prepacked_linear(head.weight, head.bias, batch_hint)

    def decode(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        kv: torch.Tensor,
        end: int,
    ) -> torch.Tensor:
        """One decode step of ``B`` rows (see :class:`Rows`); returns ``[B, V]`` float32 logits."""
        logits, _ = self.step(Rows(input_ids, position_ids, attention_mask, kv, end), [])
        return logits

    def new_kv(self, columns: int) -> torch.Tensor:
        """An empty ``[layers, 2, Hkv, columns, D]`` buffer for one row's keys and values."""
        weight = self.embed.weight
        shape = (len(self.layers), 2, self.kv_heads, columns, self.head_dim)
        return torch.empty(shape, dtype=weight.dtype, device=weight.device)

    def prefill(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        """Prefill ``chunks`` packed along one token axis (see :meth:`step`); returns ``[c, V]``
        float32 logits of the last token of each chunk with ``logits`` set."""
        _, logits = self.step(None, chunks)
        return logits

    def step(self, rows: Rows | None, chunks: Sequence[Chunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward of the batch's decode rows and of prompt chunks together.

        Every projection multiplies all their tokens at once, so the weights are read once for both
        (what makes a chunk ride along with the decode step almost for free while the decode step is
        bound by reading the weights). Attention is each part's own: decode rows over the batch's
        buffer, each chunk causally over itself and the columns of its own buffer before it (a
        cached prefix, or the earlier chunks of a long prompt); each chunk's keys and values are
        written into its buffer at columns ``[start, start + n)``.

        Returns:
            ``[B, V]`` float32 logits of the decode rows (``[0, V]`` without), and ``[c, V]`` of the
            last token of each chunk with ``logits`` set.
        """
        device = self.embed.weight.device
        lengths = [len(c.ids) for c in chunks]
        b = 0 if rows is None else rows.input_ids.shape[0]
        # With chunks, the token axis is padded to a multiple of ROWS_BUCKET with rows nothing reads:
        # oneDNN builds its kernels for each row count it meets (~1 ms per projection), so row
        # counts are kept to a few that repeat.
        pad = -(b + sum(lengths)) % (ROWS_BUCKET if rows is None else MIXED_ROWS_BUCKET) if chunks else 0
        ids = [torch.tensor([t for c in chunks for t in c.ids] + [0] * pad, dtype=torch.long, device=device)]
        positions = [
            *(torch.arange(c.start, c.start + n, device=device) for c, n in zip(chunks, lengths)),
            torch.zeros(pad, dtype=torch.long, device=device),
        ]
        if rows is not None:
            ids.insert(0, rows.input_ids[:, 0])
            positions.insert(0, rows.position_ids[:, 0])
        x = self._layers(torch.cat(ids), torch.cat(positions), rows, chunks)  # [B + T, E]
        ends = [b + sum(lengths[: i + 1]) - 1 for i, c in enumerate(chunks) if c.logits]
        x = F.rms_norm(x[[*range(b), *ends]], x.shape[-1:], self.norm, self.eps)
        logits = self.lm_head(x).float()
        return logits[:b], logits[b:]

    def _layers(
        self, ids: torch.Tensor, positions: torch.Tensor, rows: Rows | None, chunks: Sequence[Chunk]
    ) -> torch.Tensor:
        """The decoder layers over ``N = B + T`` tokens (decode rows first); returns hidden states
        ``[N, E]`` before the final norm."""
        n = ids.shape[0]
        b = 0 if rows is None else rows.input_ids.shape[0]
        d, q_width, kv_width = self.head_dim, self.heads * self.head_dim, self.kv_heads * self.head_dim
        x: torch.Tensor = self.embed(ids)  # [N, E]
        cos, sin = self.rotary(x, positions[None])  # [1, N, D]
        cos, sin = cos[0, :, None], sin[0, :, None]  # [N, 1, D]: broadcast over heads
        bias = None
        if rows is not None:  # [B, 1, 1, L + 1]: 0 on a row's tokens, -inf on its padding; every layer
            bias = torch.zeros(rows.attention_mask.shape, dtype=x.dtype, device=x.device)
            bias = bias.masked_fill_(rows.attention_mask == 0, float("-inf"))[:, None, None, :]
        spans, first = [], b
        for c in chunks:
            # A chunk after a prefix sees all of it: query i may read columns up to start + i.
            mask = None
            if c.start:
                columns = torch.arange(c.start + len(c.ids), device=x.device)
                mask = columns[None, :] <= c.start + torch.arange(len(c.ids), device=x.device)[:, None]
            spans.append((slice(first, first + len(c.ids)), mask))
            first += len(c.ids)
        attn = x.new_zeros(n, self.heads, d)  # padding rows stay 0
        for i, layer in enumerate(self.layers):
            h = F.rms_norm(x, x.shape[-1:], layer.input_norm, self.eps)
            qkv = layer.qkv(h)  # [N, (Hq + 2 Hkv) D]
            qk = qkv[:, : q_width + kv_width].view(n, self.heads + self.kv_heads, d)  # queries, then keys
            if layer.q_norm is not None and layer.k_norm is not None:
                qk = torch.cat(
                    (F.rms_norm(qk[:, : self.heads], (d,), layer.q_norm, self.eps),
                     F.rms_norm(qk[:, self.heads :], (d,), layer.k_norm, self.eps)),
                    dim=1,
                )  # fmt: skip
            qk = qk * cos + _rotate_half(qk) * sin  # one rotation for queries and keys
            q, keys = qk[:, : self.heads], qk[:, self.heads :]  # [N, Hq, D], [N, Hkv, D]
            values = qkv[:, q_width + kv_width :].view(n, self.kv_heads, d)
            if rows is not None and bias is not None:
                attn[:b] = self._decode_attention(i, q[:b], keys[:b], values[:b], rows, bias)
            for c, (span, mask) in zip(chunks, spans):
                end = c.start + span.stop - span.start
                c.kv[i, 0, :, c.start : end] = keys[span].transpose(0, 1)
                c.kv[i, 1, :, c.start : end] = values[span].transpose(0, 1)
                attn[span] = F.scaled_dot_product_attention(
                    q[span].transpose(0, 1)[None],  # [1, Hq, n, D]
                    c.kv[i, 0, None, :, :end],  # [1, Hkv, start + n, D]
                    c.kv[i, 1, None, :, :end],
                    attn_mask=mask,
                    is_causal=mask is None,
                    scale=self.scaling,
                    enable_gqa=True,
                )[0].transpose(0, 1)
            x = x + layer.o(attn.view(n, q_width))
            h = F.rms_norm(x, x.shape[-1:], layer.post_norm, self.eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        return x

    def _decode_attention(
        self,
        i: int,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        rows: Rows,
        bias: torch.Tensor,
    ) -> torch.Tensor:
        """Layer ``i``'s attention of the decode rows (``q`` ``[B, Hq, D]``, their new ``keys`` and
        ``values`` ``[B, Hkv, D]``) over the batch's buffer; returns ``[B, Hq, D]``."""
        b, group, d = q.shape[0], self.heads // self.kv_heads, self.head_dim
        kv, end = rows.kv, rows.end
        first = end + 1 - rows.attention_mask.shape[1]
        kv[i, 0, :b, :, end] = keys
        kv[i, 1, :b, :, end] = values
        # Query heads of one key/value head are a "sequence" of `group` queries against it.
        q = q.reshape(b, self.kv_heads, group, d)
        live_keys = kv[i, 0, :b, :, first : end + 1]  # [B, Hkv, L + 1, D], in place
        live_values = kv[i, 1, :b, :, first : end + 1]
        # Two batched products and a softmax: for one query per head against a short cache this is
        # faster than the fused attention kernels, which are tuned for long queries.
        scores = torch.matmul(q, live_keys.transpose(-1, -2)).mul_(self.scaling).add_(bias)  # [B, Hkv, G, L + 1]
        return torch.matmul(torch.softmax(scores, dim=-1), live_values).view(b, self.heads, d)


@dataclass
class Rows:
    """The running batch's decode step.

    Attributes:
        input_ids: ``[B, 1]`` the token each row feeds.
        position_ids: ``[B, 1]`` its position.
        attention_mask: ``[B, L + 1]`` 1 where a column of the live region (and the new column
            ``end``) holds a real token of the row.
        kv: ``[layers, 2, B_cap, Hkv, L_cap, D]`` the batch's buffer; the live region is the ``L + 1``
            columns ending at ``end`` (inclusive), and column ``end`` is written here.
        end: The column this step writes.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    kv: torch.Tensor
    end: int


@dataclass
class Chunk:
    """Tokens of one row to prefill, after the ``start`` columns its buffer already holds.

    Attributes:
        ids: The tokens, at positions ``start`` to ``start + len(ids) - 1``.
        kv: The row's ``[layers, 2, Hkv, L, D]`` buffer (see :meth:`FastDecoder.new_kv`).
        start: Columns of ``kv`` computed before (0 for a prompt's first chunk).
        logits: Whether the next token's logits are wanted (the chunk ends the prompt).
    """

    ids: Sequence[int]
    kv: torch.Tensor
    start: int = 0
    logits: bool = True


def prepare(
    model: Any, pad_token_id: int, cache_name: str, batch_hint: int = 16
) -> tuple[FastDecoder | None, str | None]:
    """Build the fast step for ``model`` and check it against the plain transformers step.

    Args:
        model: The causal LM.
        pad_token_id: Padding id for the check's prompts.
        cache_name: The keyword the model's forward takes its cache by (see ``model_api.cache_kwarg``).
        batch_hint: Batch size the prepacked output projection is tuned for.

    Returns:
        ``(decoder, None)`` when the fast step applies, else ``(None, why)``.
    """
    reason = unsupported_reason(model)
    if reason is not None:
        return None, reason
    decoder: FastDecoder | None = None

    def check() -> str | None:
        nonlocal decoder
        decoder = FastDecoder(model, batch_hint)
        difference = _difference(decoder, model, pad_token_id, cache_name)
        if difference > TOLERANCE:
            return f"its logits differ from the plain step's by {difference:.1e} of the largest (> {TOLERANCE})"
        return None

    context = {"pad_token_id": str(pad_token_id), "cache_kwarg": cache_name, "batch_hint": str(batch_hint)}
    reason = remembered(model, "fast_decode", context, check, valid=lambda v: v is None or isinstance(v, str))
    if reason is not None:
        return None, reason
    return decoder if decoder is not None else FastDecoder(model, batch_hint), None


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


class _PackedLinear:
    """A linear layer whose weight oneDNN has reordered once for its matrix-multiply kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int) -> None:
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
        self.bias = None if bias is None else bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return out


def prepacked_linear(weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int) -> Linear:
    """``x @ weight.T + bias``: through oneDNN with the weight prepacked once (its own reordered
    copy) on a CPU in float32, where it is faster for these shapes than the default kernel
    (``benchmarks/fast_path.py``); else the plain linear."""
    mkldnn = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and mkldnn:
        try:
            return _PackedLinear(weight, bias, batch_hint)
        except (RuntimeError, AttributeError, NotImplementedError) as exc:  # a torch build without the op
            log.info("prepacked linear unavailable; plain linear", error=repr(exc))
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    return lambda x: F.linear(x, weight, bias)
