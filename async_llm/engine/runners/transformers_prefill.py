"""The transformers forward as a prefill: whole prompts padded or packed together (grouped into
forwards by the cost model :func:`prefill_groups`), or one prompt continued after a prefix whose keys
and values are passed as the model's cache. Used by the transformers runner."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from async_llm.engine.model_api import input_device, last_logits, layer_kv

KV = list[tuple[torch.Tensor, torch.Tensor]]


def sliding(model: Any) -> bool:
    """Whether the model has sliding-window attention layers (a custom mask or a cached prefix would
    not respect their window)."""
    config = model.config.get_text_config()
    return bool(getattr(config, "sliding_window", None)) or "sliding_attention" in (
        getattr(config, "layer_types", None) or ()
    )


def forward_padded(model: Any, cache_kwarg: str, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, KV]:
    """Prefill left-padded ``ids`` [u, P]: last-token logits [u, V] and per layer (keys, values) [u, H, P, D]."""
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)
    cache = DynamicCache()  # full-attention layers, whatever the model's sliding-window config
    logits = last_logits(model, cache_kwarg, cache, input_ids=ids, attention_mask=mask, position_ids=positions)
    return logits, [layer_kv(layer) for layer in cache.layers]


def forward_packed(model: Any, cache_kwarg: str, prompts: Sequence[Sequence[int]], p: int) -> tuple[torch.Tensor, KV]:
    """Prefill ``prompts`` packed into one sequence (no padding): each attends only to itself,
    causally, through a block-diagonal 4-D mask, with positions restarting at 0 for each. Returns
    the same as :func:`forward_padded`, the keys and values gathered into left-padded rows."""
    device = input_device(model)
    lengths = torch.tensor([len(x) for x in prompts])
    total, u = int(lengths.sum()), len(prompts)
    ids = torch.tensor([t for x in prompts for t in x], device=device)[None]  # [1, T]
    segment = torch.repeat_interleave(torch.arange(u), lengths).to(device)  # [T]
    starts = (torch.cumsum(lengths, 0) - lengths).to(device)
    positions = torch.arange(total, device=device) - starts[segment]
    column = torch.arange(total, device=device)
    allowed = (segment[:, None] == segment[None, :]) & (column[None, :] <= column[:, None])  # [T, T]
    ends = starts + lengths.to(device) - 1
    cache = DynamicCache()
    logits = (
        model(
            input_ids=ids,
            attention_mask=allowed[None, None],
            position_ids=positions[None],
            use_cache=True,
            logits_to_keep=ends,
            **{cache_kwarg: cache},
        )
        .logits[0]
        .float()
    )  # [u, V]: the last token of each prompt
    # Row i, column c of the padded layout holds packed position starts[i] + c - (p - len_i);
    # columns left of the prompt read position 0 (any will do: the batch zeroes padding).
    source = (starts[:, None] + torch.arange(p, device=device)[None, :] - (p - lengths.to(device))[:, None]).clamp_(
        min=0
    )
    flat = source.reshape(-1)
    kv = []
    for layer in cache.layers:  # [1, H, T, D] -> [u, H, P, D]
        keys, values = (t[0].index_select(1, flat).view(t.shape[1], u, p, -1).transpose(0, 1) for t in layer_kv(layer))
        kv.append((keys, values))
    return logits, kv


def forward_resume(
    model: Any, cache_kwarg: str, tokens: Sequence[int], kv: torch.Tensor | None, start: int, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill ``tokens[start : start + n]`` after the ``start`` columns of ``kv`` ``[layers, 2,
    H, L, D]`` (passed as the model's cache). Returns the last token's logits ``[1, V]`` and the
    keys and values of all ``start + n`` columns, ``[layers, 2, H, start + n, D]``."""
    device = input_device(model)
    cache = DynamicCache()
    if start:
        assert kv is not None
        for i in range(kv.shape[0]):
            cache.update(kv[i, 0, None, :, :start], kv[i, 1, None, :, :start], i)
    ids = torch.tensor([tokens[start : start + n]], device=device)
    logits = last_logits(
        model,
        cache_kwarg,
        cache,
        input_ids=ids,
        attention_mask=torch.ones(1, start + n, dtype=torch.long, device=device),
        position_ids=torch.arange(start, start + n, device=device)[None],
    )
    layers = [layer_kv(layer) for layer in cache.layers]
    return logits, torch.stack([torch.stack((k[0], v[0])) for k, v in layers])


def prefill_groups(
    lengths: list[int],
    overhead_tokens: float,
    pair_cost: float = 0.0,
    packing: bool = False,
    min_saving: float = 0.0,
) -> list[tuple[list[int], bool]]:
    """Split prompts into prefill forwards that cost the least in all.

    Costs are in tokens of compute (the linear layers' work for one token):

    - a forward's fixed part (reading every weight once, launching every kernel) is worth
      ``overhead_tokens``;
    - each (query, key) pair of attention is worth ``pair_cost`` (attention FLOPs per pair over
      linear FLOPs per token, computed from the model's config);
    - ``k`` prompts left-padded to the longest, ``L``, cost ``k * L`` tokens and ``k * L²`` pairs:
      a short prompt padded to a long one wastes the difference;
    - packed into one sequence (``packing``; block-diagonal causal mask, no padding), they cost
      ``T = sum(lengths)`` tokens but ``T²`` pairs (dense attention over the whole sequence).

    With the prompts sorted by length, the best split into runs of neighbours, each padded or
    packed, is found by dynamic programming (O(n²), n <= the batch size). Without packing that is
    the best split of all; with it, a split that mixes non-neighbours can be marginally cheaper.

    Args:
        lengths: Token count of each prompt.
        overhead_tokens: The fixed cost of one forward (0: every distinct length alone, unpacked).
        pair_cost: The cost of one attention pair, in tokens.
        packing: Whether a forward may pack its prompts instead of padding them.
        min_saving: Split only when that saves at least this share of one forward's cost. Every
            prompt admitted in one step waits for all of its forwards before the batch decodes
            again, so a split that saves little computes its first tokens no sooner in all and
            stalls the rows of its earlier forwards (an inter-token gap as long as the later ones).

    Returns:
        ``(indices into lengths, packed)`` per forward, shortest prompts first.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the j shortest prompts
    cut, packed = [0] * (n + 1), [False] * (n + 1)
    for j in range(1, n + 1):
        longest, total = lengths[order[j - 1]], 0
        for i in range(j - 1, -1, -1):  # prompts i..j-1 in one forward
            total += lengths[order[i]]
            k = j - i
            padded = overhead_tokens + k * longest + k * longest * longest * pair_cost
            cost, pack = padded, False
            if packing and k > 1:
                packed_cost = overhead_tokens + total + total * total * pair_cost
                if packed_cost < padded:
                    cost, pack = packed_cost, True
            if best[i] + cost <= best[j]:  # on a tie, the larger group: fewer forwards
                best[j], cut[j], packed[j] = best[i] + cost, i, pack
    if n > 1 and cut[n] > 0:  # the best plan splits: is it worth the wait it adds?
        longest, total = lengths[order[-1]], sum(lengths)
        whole = overhead_tokens + n * longest + n * longest * longest * pair_cost
        pack_whole = packing and overhead_tokens + total + total * total * pair_cost < whole
        if pack_whole:
            whole = overhead_tokens + total + total * total * pair_cost
        if best[n] > (1.0 - min_saving) * whole:
            return [(order, pack_whole)]
    groups: list[tuple[list[int], bool]] = []
    j = n
    while j > 0:
        groups.append((order[cut[j] : j], packed[j]))
        j = cut[j]
    return groups[::-1]
