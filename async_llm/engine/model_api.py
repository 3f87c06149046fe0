"""How the engine calls a transformers model: the names and shapes that differ across versions."""

from __future__ import annotations

import inspect
from typing import Any

import torch


def cache_kwarg(model: Any) -> str:
    """The name under which ``model.forward`` takes the KV cache: ``cache`` in the transformers
    versions that have it (``past_key_values`` is deprecated there), ``past_key_values`` before.

    Read from the model's class, so a forward wrapped on the instance (accelerate's hooks, a test's
    spy) does not hide it."""
    try:
        parameters = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):  # a forward without a signature: assume the long-standing name
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def input_device(model: Any) -> torch.device:
    """Where input ids go: the embedding's device (also right for accelerate-dispatched models)."""
    device: torch.device = model.get_input_embeddings().weight.device
    return device


def probe_prompts(vocab_size: int) -> tuple[tuple[int, ...], ...]:
    """The prompts of the engine's start-up checks (packed against padded prefill, fast against
    plain decode): two short ones of different lengths, so one row is left-padded. Their tokens are
    taken from the middle of the vocabulary, ordinary text pieces in a BPE vocabulary: the special
    tokens at its start can drive a model's activations so high that its own bfloat16 forward is
    off by most of a logit's size (measured on the default model), which would make a reference of
    it useless."""
    first = max(0, vocab_size // 2 - 4)
    return tuple(range(first, first + 3)), tuple(range(first + 3, first + 8))


def probe_batch(pad_token_id: int, device: torch.device, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`probe_prompts` left-padded: ids and attention mask, both ``[2, 5]``."""
    prompts = probe_prompts(vocab_size)
    width = max(len(p) for p in prompts)
    ids = [[pad_token_id] * (width - len(p)) + list(p) for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def vocab_size(model: Any) -> int:
    """Rows of the model's output projection."""
    return int(model.get_output_embeddings().weight.shape[0])


def last_logits(model: Any, cache_name: str, cache: Any, **inputs: Any) -> torch.Tensor:
    """Float32 logits ``[B, V]`` of each row's last position, from one forward that fills ``cache``
    (passed as ``cache_name``, see :func:`cache_kwarg`)."""
    output = model(**inputs, use_cache=True, logits_to_keep=1, **{cache_name: cache})
    logits: torch.Tensor = output.logits[:, -1].float()
    return logits


def layer_kv(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values ``[B, H, L, D]`` of one layer of a prefill's cache.

    Raises:
        TypeError: The layer holds no key/value tensors (the recurrent state of a linear-attention
            layer, as hybrid models have): such a cache does not fit the padded batch.
    """
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise TypeError(f"cache layer {type(layer).__name__} holds no key/value tensors; the padded batch needs them")
    return keys, values


def default_prefix_cache_bytes(device: torch.device) -> int:
    """1 GiB on a CPU; on an accelerator, a tenth of its memory free when the engine is built."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 10)
    return 1 << 30


def attention_pair_cost(model: Any) -> float:
    """Attention FLOPs of one (query, key) pair over linear-layer FLOPs of one token, for the
    prefill cost model: ``4 * heads * head_dim * layers`` over twice the non-embedding parameters."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    embeddings = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    params = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    return float(4 * heads * head_dim * config.num_hidden_layers / max(2 * params, 1))
