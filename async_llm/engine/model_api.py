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


#: The prompts of the engine's start-up checks (packed against padded prefill, fast against plain
#: decode): two short ones of different lengths, so one row is left-padded.
PROBE_PROMPTS: tuple[tuple[int, ...], ...] = ((1, 2, 3), (4, 5, 6, 7, 8))


def probe_batch(pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:data:`PROBE_PROMPTS` left-padded: ids and attention mask, both ``[2, 5]``."""
    width = max(len(p) for p in PROBE_PROMPTS)
    ids = [[pad_token_id] * (width - len(p)) + list(p) for p in PROBE_PROMPTS]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in PROBE_PROMPTS]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


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
