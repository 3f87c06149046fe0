"""The fast forward of Llama-family models over the engine's padded KV buffer: the batch's decode
rows and prompt chunks in one pass.

The same arithmetic as the transformers forward, in fewer and larger operations, with no per-step
mask building and no module or keyword dispatch:

- q, k and v are one matrix product, and so are the MLP's gate and up (see :mod:`.fast_linear`: the
  runner's own weights; a model passed in by the caller is never changed);
- attention reads the live region of the batch's KV buffer in place; grouped-query attention runs
  each key/value head against its group of query heads as a short query sequence, so keys and values
  are never repeated; the padding mask is one additive bias shared by every layer;
- on a CPU in float32 every product runs through oneDNN with a prepacked weight.

On a CPU every step's layers (decode rows, verify rows, prompt chunks, or rows and chunks together)
run as one native call (see :mod:`.native`): the same products, and compact kernels for what runs
between them.

Prefills run the same layers over the admitted prompts packed along one token axis (no padding is
computed), each prompt attending causally to itself only. Results equal the transformers step up
to floating-point reassociation; :mod:`.fast_check` checks that on the model at start-up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from async_llm.engine.runners import native
from async_llm.engine.runners.fast_linear import (
    Linear,
    NarrowLinear,
    PlainLinear,
    fused_linear,
    int8_linear,
    onednn_bf16,
    prepacked_linear,
)
from async_llm.engine.transfer import device_tensor

#: Row counts of a prefill are rounded up to a multiple of this, and of a decode step with prompt
#: chunks (small, where every row costs as much as a decode row) to a multiple of the second (see
#: FastDecoder.step).
ROWS_BUCKET = 16
MIXED_ROWS_BUCKET = 4


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

    edits: ClassVar[int] = 0  # assignments to any layer's fields, so far (see FastDecoder._native)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        _Layer.edits += 1


def layer_products(layer: Any) -> tuple[tuple[nn.Linear, ...], ...]:
    """A decoder layer's four products as the fast step runs them, each the linears of one input:
    ``(q, k, v)``, ``(o,)``, ``(gate, up)``, ``(down,)``."""
    attn, mlp = layer.self_attn, layer.mlp
    return (attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FastDecoder:
    """The decode step of a supported model (build it with :func:`prepare`).

    Args:
        model: A transformers causal LM that :func:`unsupported_reason` accepts.
        batch_hint: The batch size oneDNN tunes the prepacked products for (any size works).
        owned: Whether the library loaded ``model`` itself (see :func:`fused_linear`: a model
            passed in is never changed).
        quantize: ``"int8"``: the layers' products with int8 weights and rows quantized on the fly
            (:class:`~async_llm.engine.runners.fast_linear.Int8Linear`; the output projection stays
            a float product, in bfloat16 where the CPU multiplies it in hardware); None: the model's
            dtype.
        smoothing: With int8, each product's smoothing vector, in :func:`layer_products`' order
            (see :mod:`async_llm.engine.runners.int8`); None: none.
    """

    def __init__(
        self,
        model: Any,
        batch_hint: int = 16,
        owned: bool = False,
        quantize: str | None = None,
        smoothing: Sequence[torch.Tensor] | None = None,
    ) -> None:
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
        self.quantize = quantize
        smoothings = iter(smoothing) if smoothing is not None else None

        def product(modules: Sequence[Any]) -> Linear:
            if quantize == "int8":
                return int8_linear(modules, batch_hint, None if smoothings is None else next(smoothings))
            if len(modules) > 1:
                return fused_linear(modules, batch_hint, owned)
            return prepacked_linear(modules[0].weight, modules[0].bias, batch_hint)

        self.layers: list[_Layer] = []
        for layer in body.layers:
            attn = layer.self_attn
            q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
            qkv, o, gate_up, down = layer_products(layer)
            self.layers.append(
                _Layer(
                    input_norm=layer.input_layernorm.weight,
                    qkv=product(qkv),
                    o=product(o),
                    post_norm=layer.post_attention_layernorm.weight,
                    gate_up=product(gate_up),
                    down=product(down),
                    q_norm=None if q_norm is None else q_norm.weight,
                    k_norm=None if k_norm is None else k_norm.weight,
                )
            )
        head = model.get_output_embeddings()
        self.lm_head: Linear
        if quantize == "int8" and head.weight.dtype == torch.float32 and onednn_bf16():
            # The output projection in bfloat16 where the CPU multiplies it in hardware: half the
            # bytes of float32 for no measured cost in perplexity (see async_llm.engine.runners.int8).
            self.lm_head = NarrowLinear(head.weight, head.bias, batch_hint)
        else:
            self.lm_head = prepacked_linear(head.weight, head.bias, batch_hint)
        # The layers as one native call where it runs (see :mod:`.native`; built the first time on a
        # machine, then loaded): the same products, compact kernels between them.
        self.native = True  # False: the Python layers (the same results up to float32 reassociation)
        self.native_steps = 0  # steps the native call ran (decode, verify, prefill, or rows with chunks)
        weight = self.embed.weight
        self._native_runs = weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
        self._native_spec: tuple[tuple[int, ...], tuple[list[torch.Tensor | None], list[int]] | None] = ((-1,), None)
        if self._native_runs:
            self._native_runs = self._native is not None and native.load()

    @property
    def _native(self) -> tuple[list[torch.Tensor | None], list[int]] | None:
        """The native call's ``params`` and ``layout`` for the layers as they are now (see
        :func:`.native.layer_spec`; None: the Python layers). A product or norm replaced after the
        decoder was built (a calibration's recording products, a test's) is seen at the next step."""
        key = (_Layer.edits, id(self.layers), len(self.layers))
        if key != self._native_spec[0]:
            self._native_spec = (key, native.layer_spec(self.layers))
        return self._native_spec[1]

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

    def decode_rows(self, rows: DecodeRows, out: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step of ``rows`` alone, all on the device (no host copy, nothing read back:
        what a CUDA graph captures); returns ``[B, V]`` logits in the model's dtype (the caller
        takes the rows it wants, then converts: a float32 copy of every row is the step's largest
        write at a large batch), written into ``out`` when given (the output projection's product
        straight into it where it is a plain one)."""
        x = self._layers(rows.input_ids[:, 0], rows.position_ids[:, 0], rows, [])  # [B, E]
        x = F.rms_norm(x, x.shape[-1:], self.norm, self.eps)
        if out is None:
            return self.lm_head(x)
        head = self.lm_head
        if isinstance(head, PlainLinear) and len(head.parts) == 1 and head.parts[0][1] is None and x.dtype == out.dtype:
            return torch.mm(x, head.parts[0][0].t(), out=out)
        return out.copy_(head(x))

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

    def sequence_logits(self, ids: Sequence[int]) -> torch.Tensor:
        """``[T, V]`` float32 logits after every token of ``ids`` (one forward from an empty cache, as
        a prefill runs it): what scores a text, for a perplexity."""
        kv = self.new_kv(len(ids))
        positions = torch.arange(len(ids), device=kv.device)
        x = self._layers(device_tensor(list(ids), device=kv.device), positions, None, [Chunk(ids, kv)])
        return self.lm_head(F.rms_norm(x, x.shape[-1:], self.norm, self.eps)).float()

    def step(self, rows: DecodeRows | None, chunks: Sequence[Chunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward of the batch's decode rows and of prompt chunks together.

        Every projection multiplies all their tokens at once, so the weights are read once for both
        (what makes a chunk ride along with the decode step almost for free while the decode step is
        bound by reading the weights). Attention is each part's own: decode rows over the batch's
        buffer, each chunk causally over itself and the columns of its own buffer before it (a
        cached prefix, or the earlier chunks of a long prompt); each chunk's keys and values are
        written into its buffer at columns ``[start, start + n)``.

        Returns:
            ``[B, V]`` float32 logits of the decode rows (``[0, V]`` without; ``[B T, V]`` for a
            verify step's ``T`` tokens per row, row by row), and ``[c, V]`` of the last token of
            each chunk with ``logits`` set.
        """
        device = self.embed.weight.device
        lengths = [len(c.ids) for c in chunks]
        b = 0 if rows is None else rows.input_ids.numel()  # a verify step's rows feed several tokens each
        # With chunks, the token axis is padded to a multiple of ROWS_BUCKET with rows nothing reads:
        # oneDNN builds its kernels for each row count it meets (~1 ms per projection), so row
        # counts are kept to a few that repeat.
        pad = -(b + sum(lengths)) % (ROWS_BUCKET if rows is None else MIXED_ROWS_BUCKET) if chunks else 0
        ids = [device_tensor([t for c in chunks for t in c.ids] + [0] * pad, dtype=torch.long, device=device)]
        positions = [
            *(torch.arange(c.start, c.start + n, device=device) for c, n in zip(chunks, lengths)),
            torch.zeros(pad, dtype=torch.long, device=device),
        ]
        if rows is not None:
            ids.insert(0, rows.input_ids.reshape(-1))
            positions.insert(0, rows.position_ids.reshape(-1))
        x = self._layers(torch.cat(ids), torch.cat(positions), rows, chunks)  # [B + T, E]
        ends = [b + sum(lengths[: i + 1]) - 1 for i, c in enumerate(chunks) if c.logits]
        # The rows, then each chunk's last token (an index queued to the device: no host wait).
        picked = device_tensor([*range(b), *ends], dtype=torch.long, device=x.device) if ends else None
        x = x.index_select(0, picked) if picked is not None else x[:b]
        x = F.rms_norm(x, x.shape[-1:], self.norm, self.eps)
        logits = self.lm_head(x).float()
        return logits[:b], logits[b:]

    def _layers(
        self, ids: torch.Tensor, positions: torch.Tensor, rows: DecodeRows | None, chunks: Sequence[Chunk]
    ) -> torch.Tensor:
        """The decoder layers over ``N = B + T`` tokens (decode rows first); returns hidden states
        ``[N, E]`` before the final norm."""
        n = ids.shape[0]
        b = 0 if rows is None else rows.input_ids.numel()
        d, q_width, kv_width = self.head_dim, self.heads * self.head_dim, self.kv_heads * self.head_dim
        x: torch.Tensor = self.embed(ids)  # [N, E]
        cos, sin = self.rotary(x, positions[None])  # [1, N, D]
        if rows is not None:
            rows.begin(x.dtype)
        spec = self._native if self.native and self._native_runs else None
        if spec is not None and (rows is None or isinstance(rows, Rows)):
            params, layout = spec
            # The rows' buffer, first and written columns, bias, count and tokens each (none: a prefill).
            batch: tuple[Any, ...] = (None, 0, 0, None, 0, 1)
            if rows is not None:
                batch = (rows.kv, rows.first, rows.end, rows.bias, *rows.input_ids.shape)
            layers: torch.Tensor = torch.ops.async_llm_native.step_layers(
                x, cos[0], sin[0], *batch,
                [c.kv for c in chunks], [c.start for c in chunks], [len(c.ids) for c in chunks],
                params, layout, self.eps, self.scaling, self.heads, self.kv_heads, self.head_dim,
            )  # fmt: skip
            self.native_steps += 1
            return layers
        cos, sin = cos[0, :, None], sin[0, :, None]  # [N, 1, D]: broadcast over heads
        groups, grouped = _prompt_groups(chunks, b, x.device)
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
            if rows is not None:
                attn[:b] = rows.attend(i, q[:b], keys[:b], values[:b], self.scaling)
            for group in groups:
                self._attend_group(group, i, q, keys, values, attn)
            for k, (c, (span, mask)) in enumerate(zip(chunks, spans)):
                if k in grouped:
                    continue
                end = c.start + span.stop - span.start
                c.kv[i, 0, :, c.start : end] = keys[span].transpose(0, 1)
                c.kv[i, 1, :, c.start : end] = values[span].transpose(0, 1)
                seen_k, seen_v, grouped_heads = self._attended_kv(
                    x, c.kv[i, 0, None, :, :end], c.kv[i, 1, None, :, :end], masked=mask is not None
                )  # [1, Hkv or Hq, start + n, D]
                attn[span] = F.scaled_dot_product_attention(
                    q[span].transpose(0, 1)[None],  # [1, Hq, n, D]
                    seen_k,
                    seen_v,
                    attn_mask=mask,
                    is_causal=mask is None,
                    scale=self.scaling,
                    enable_gqa=grouped_heads,
                )[0].transpose(0, 1)
            x = x + layer.o(attn.view(n, q_width))
            h = F.rms_norm(x, x.shape[-1:], layer.post_norm, self.eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        return x

    def _attended_kv(
        self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, masked: bool
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """A prompt's keys and values ``[G, Hkv, L, D]`` as its attention call takes them, and that
        call's ``enable_gqa``: grouped as they are, or repeated per query head where
        :func:`repeat_kv` says (``x``: the step's activations, for their device and dtype)."""
        if not repeat_kv(x, self.heads, self.kv_heads, self.head_dim, masked):
            return keys, values, True
        groups = self.heads // self.kv_heads
        return keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1), False

    def _attend_group(
        self,
        group: _PromptGroup,
        layer: int,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attn: torch.Tensor,
    ) -> None:
        """Layer ``layer``'s attention of a group of fresh prompts (see :class:`_PromptGroup`): their
        keys and values written into their buffers, their attention into ``attn`` at their tokens.
        ``q`` ``[N, Hq, D]``, ``keys`` and ``values`` ``[N, Hkv, D]`` are the step's."""
        g, w, d = len(group.chunks), group.width, self.head_dim
        if group.slots is not None and group.columns is not None:
            store = group.chunks[0].store
            assert store is not None
            store[layer, 0][group.slots, :, group.columns] = keys.index_select(0, group.tokens)
            store[layer, 1][group.slots, :, group.columns] = values.index_select(0, group.tokens)
        else:
            for c, start in zip(group.chunks, group.starts, strict=True):
                c.kv[layer, 0, :, : len(c.ids)] = keys[start : start + len(c.ids)].transpose(0, 1)
                c.kv[layer, 1, :, : len(c.ids)] = values[start : start + len(c.ids)].transpose(0, 1)

        def padded(x: torch.Tensor) -> torch.Tensor:  # [N, H, D] -> [G, H, W, D]
            return x.index_select(0, group.gather).view(g, w, -1, d).transpose(1, 2)

        seen_k, seen_v, grouped_heads = self._attended_kv(q, padded(keys), padded(values), masked=False)
        out = F.scaled_dot_product_attention(
            padded(q), seen_k, seen_v, is_causal=True, scale=self.scaling, enable_gqa=grouped_heads
        )  # [G, Hq, W, D]
        attn.index_copy_(0, group.tokens, out.transpose(1, 2).reshape(g * w, -1, d).index_select(0, group.real))


class DecodeRows(Protocol):
    """A decode step's rows as the layers see them: one new token per row, and attention over the
    row's keys and values in whatever layout the batch keeps them."""

    input_ids: torch.Tensor  # [B, 1] the token each row feeds
    position_ids: torch.Tensor  # [B, 1] its position

    def begin(self, dtype: torch.dtype) -> None:
        """Prepare what every layer shares (an attention bias) before the first layer."""
        ...

    def attend(
        self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """Layer ``layer``'s attention: write the rows' new ``keys`` and ``values`` ``[B, Hkv, D]``
        into the batch's store, then attend ``q`` ``[B, Hq, D]`` over each row's context; returns
        ``[B, Hq, D]``."""
        ...


def repeat_kv(x: torch.Tensor, heads: int, kv_heads: int, head_dim: int, masked: bool) -> bool:
    """Whether a prompt's attention (queries ``x``) runs over keys and values repeated per query
    head instead of grouped. On CUDA, grouped heads run on flash attention only, which takes no
    mask, half precision only and heads of at most 256; anywhere else they fall to the math kernel,
    which holds every score at once (``[Hq, n, L]`` per prompt: gigabytes for a long prompt or a
    long chunk over a long prefix). Repeated, the memory-efficient kernel takes them, for
    ``Hq / Hkv`` times the keys' and values' own size. On a CPU grouped heads run as they are."""
    if x.device.type != "cuda" or heads == kv_heads:
        return False
    return masked or x.dtype not in (torch.float16, torch.bfloat16) or head_dim > 256


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention bias: 0 where ``allowed``, -inf elsewhere (same shape)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def verify_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scaling: float
) -> torch.Tensor:
    """A verify step's attention: ``q`` ``[B T, Hq, D]`` (``T`` tokens a row, row by row) against
    each row's ``keys``/``values`` ``[B, Hkv, W, D]`` with an additive ``bias`` ``[B, 1, T, W]``;
    returns ``[B T, Hq, D]``."""
    b = keys.shape[0]
    t, heads, d = q.shape[0] // b, q.shape[1], q.shape[2]
    out = F.scaled_dot_product_attention(
        q.reshape(b, t, heads, d).transpose(1, 2), keys, values, attn_mask=bias, scale=scaling, enable_gqa=True
    )  # [B, Hq, T, D]
    return out.transpose(1, 2).reshape(b * t, heads, d)


def grouped_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scaling: float
) -> torch.Tensor:
    """One query per row and head against ``keys``/``values`` ``[B, Hkv, L, D]`` with an additive
    ``bias`` ``[B, 1, 1, L]``; ``q`` is ``[B, Hq, D]``. Returns ``[B, Hq, D]``.

    The query heads of one key/value head are a "sequence" of ``Hq / Hkv`` queries against it, so
    keys and values are never repeated. Two batched products and a softmax: for one query per head
    against a short cache this is faster than the fused attention kernels, tuned for long queries.
    """
    b, heads, d = q.shape
    kv_heads = keys.shape[1]
    q = q.reshape(b, kv_heads, heads // kv_heads, d)
    if q.dtype != torch.float32:
        # In a narrower dtype the products below would copy the keys and values (their strided
        # views) to contiguous memory every layer; the fused kernel reads them in place and takes
        # its softmax in float32 (2x faster in bf16 at 64 rows on a CPU; equal in float32, where
        # the products stay for their exact agreement with the transformers step).
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scaling)
        return out.reshape(b, heads, d)
    scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(scaling).add_(bias)  # [B, Hkv, G, L]
    # The softmax in float32, as transformers' attention takes it (bf16 would round the weights).
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.matmul(weights, values).view(b, heads, d)


@dataclass
class Rows:
    """The running batch's decode step over the padded buffer (:class:`~async_llm.engine.batch.PaddedBatch`).

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
    _bias: torch.Tensor | None = field(default=None, init=False, repr=False)

    def begin(self, dtype: torch.dtype) -> None:
        # [B, 1, 1, L + 1]: 0 on a row's tokens, -inf on its padding; shared by every layer.
        self._bias = additive_mask(self.attention_mask != 0, dtype)[:, None, None, :]

    @property
    def first(self) -> int:
        """The first column of the live region (the rows' context, then the columns written from ``end``)."""
        return self.end + 1 - self.attention_mask.shape[1]

    @property
    def bias(self) -> torch.Tensor:
        """The attention bias :meth:`begin` made."""
        assert self._bias is not None, "begin() runs before the first layer"
        return self._bias

    def attend(
        self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        b, end, first = q.shape[0], self.end, self.first
        self.kv[layer, 0, :b, :, end] = keys
        self.kv[layer, 1, :b, :, end] = values
        live = slice(first, end + 1)  # [B, Hkv, L + 1, D], read in place
        return grouped_attention(q, self.kv[layer, 0, :b, :, live], self.kv[layer, 1, :b, :, live], self.bias, scaling)


@dataclass
class VerifyRows(Rows):
    """A speculative verify step over the padded buffer: each row feeds ``T`` tokens (its last
    token and its draft), written into the ``T`` columns from ``end``, each attending to the row's
    live region and causally to the new tokens before it.

    The fields are :class:`Rows`' with these shapes: ``input_ids`` and ``position_ids`` ``[B, T]``;
    ``attention_mask`` ``[B, L]``, 1 where a column of the live region *before* the step (columns
    ``end - L`` to ``end - 1``) holds a real token of the row; ``end`` the first column written.
    """

    @property
    def first(self) -> int:
        return self.end - self.attention_mask.shape[1]

    def begin(self, dtype: torch.dtype) -> None:
        b, t = self.input_ids.shape
        device = self.attention_mask.device
        old = self.attention_mask.bool()[:, None, None, :].expand(b, 1, t, self.attention_mask.shape[1])
        causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()[None, None].expand(b, 1, t, t)
        self._bias = additive_mask(torch.cat([old, causal], dim=-1), dtype)  # [B, 1, T, L + T]

    def attend(
        self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        b, t = self.input_ids.shape
        d = q.shape[2]
        end, first = self.end, self.first
        self.kv[layer, 0, :b, :, end : end + t] = keys.reshape(b, t, -1, d).transpose(1, 2)
        self.kv[layer, 1, :b, :, end : end + t] = values.reshape(b, t, -1, d).transpose(1, 2)
        live = slice(first, end + t)  # [B, Hkv, L + T, D], read in place
        return verify_attention(q, self.kv[layer, 0, :b, :, live], self.kv[layer, 1, :b, :, live], self.bias, scaling)


@dataclass
class Chunk:
    """Tokens of one row to prefill, after the ``start`` columns its buffer already holds.

    Attributes:
        ids: The tokens, at positions ``start`` to ``start + len(ids) - 1``.
        kv: The row's ``[layers, 2, Hkv, L, D]`` buffer (see :meth:`FastDecoder.new_kv`).
        start: Columns of ``kv`` computed before (0 for a prompt's first chunk).
        logits: Whether the next token's logits are wanted (the chunk ends the prompt).
        store, slot: Where ``kv`` is ``store[:, :, slot, :, :L]`` (a slot of the static runner's
            store, ``[layers, 2, slots, Hkv, C, D]``): prompts of one store are written together.
    """

    ids: Sequence[int]
    kv: torch.Tensor
    start: int = 0
    logits: bool = True
    store: torch.Tensor | None = None
    slot: int | None = None


#: Fresh prompts (no columns before them) of a step's Python layers are attended in groups of
#: similar length, each group one padded causal attention call per layer; a group's width is its
#: longest prompt rounded up to a power of two, at least this.
GROUP_MIN_WIDTH = 16


@dataclass
class _PromptGroup:
    """Fresh prompts of similar length attended as one padded batch ``[G, H, W, D]``: right padding
    under a causal mask changes no real query's result (it only sees earlier columns), and the
    padded queries' results are dropped.

    Attributes:
        chunks: The prompts (each with ``start == 0``).
        starts: Each one's first token on the step's token axis.
        width: ``W``, the padded length.
        gather: ``[G W]`` the step's token for each padded position (a padding position repeats its
            prompt's last token).
        real: ``[n]`` the real positions among the ``G W``, prompt by prompt.
        tokens: ``[n]`` their tokens on the step's token axis (where their attention goes).
        slots, columns: ``[n]`` each real token's slot and column in the chunks' common store
            (None when they are not slots of one store: each chunk's buffer is written on its own).
    """

    chunks: list[Chunk]
    starts: list[int]
    width: int
    gather: torch.Tensor
    real: torch.Tensor
    tokens: torch.Tensor
    slots: torch.Tensor | None
    columns: torch.Tensor | None


def _prompt_groups(chunks: Sequence[Chunk], first: int, device: torch.device) -> tuple[list[_PromptGroup], set[int]]:
    """The step's fresh prompts in groups of two or more (see :class:`_PromptGroup`), and the
    indices of the chunks they take; ``first`` is the first chunk token's index on the token axis."""
    starts: list[int] = []
    buckets: dict[int, list[int]] = {}
    for i, c in enumerate(chunks):
        starts.append(first)
        first += len(c.ids)
        if c.start == 0 and c.ids:
            width = max(GROUP_MIN_WIDTH, 1 << (len(c.ids) - 1).bit_length())
            buckets.setdefault(width, []).append(i)
    # Every group's indices go to the device in one queued copy, then each is a slice of it.
    values: list[int] = []
    made: list[tuple[list[int], int, list[int], bool]] = []  # members, width, index lengths, one store
    for width, members in buckets.items():
        if len(members) < 2:
            continue
        gather: list[int] = []
        real: list[int] = []
        tokens: list[int] = []
        slots: list[int] = []
        columns: list[int] = []
        for g, i in enumerate(members):
            n, start = len(chunks[i].ids), starts[i]
            gather += [start + min(j, n - 1) for j in range(width)]
            real += range(g * width, g * width + n)
            tokens += range(start, start + n)
            slots += [chunks[i].slot or 0] * n
            columns += range(n)
        store = chunks[members[0]].store
        one_store = store is not None and all(
            chunks[i].store is store and chunks[i].slot is not None and chunks[i].kv.stride() == store[:, :, 0].stride()
            for i in members
        )
        parts = [gather, real, tokens, *((slots, columns) if one_store else ())]
        values += [v for part in parts for v in part]
        made.append((members, width, [len(part) for part in parts], one_store))
    if not made:
        return [], set()
    flat = device_tensor(values, dtype=torch.long, device=device)
    groups: list[_PromptGroup] = []
    offset = 0
    for members, width, lengths, one_store in made:
        index = []
        for n in lengths:
            index.append(flat[offset : offset + n])
            offset += n
        slot_index, column_index = (index[3], index[4]) if one_store else (None, None)
        chosen = [chunks[i] for i in members]
        groups.append(
            _PromptGroup(
                chosen, [starts[i] for i in members], width, index[0], index[1], index[2], slot_index, column_index
            )
        )
    return groups, {i for members, *_ in made for i in members}
