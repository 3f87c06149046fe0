"""Embeddings from a causal LM: one forward of the base model (no LM head), pooled per input.

The way embedding models built on causal LMs work (Qwen3-Embedding, GTE-Qwen, E5-Mistral): the
final hidden state of the **last** token (the model reads the whole input before it), or the
**mean** over the input's tokens, optionally cut to the first ``dimensions`` (Matryoshka-trained
models keep their quality there) and L2-normalised.

Inputs are right-padded into one batch with an attention mask, so every row sees only its own
tokens at the positions it would have alone; pooling reads real tokens only, and each row may be
pooled its own way (rows of different requests share a forward).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["POOLINGS", "base_model", "embed_rows", "finish", "hidden_size"]

POOLINGS = ("last", "mean")


def base_model(model: Any) -> Any:
    """The causal LM's body (its decoder stack and final norm, without the LM head)."""
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        decoder = get_decoder()
        if decoder is not None and decoder is not model:
            return decoder
    return getattr(model, getattr(model, "base_model_prefix", "model"), model)


def hidden_size(model: Any) -> int:
    return int(model.config.get_text_config().hidden_size)


@torch.inference_mode()
def embed_rows(
    model: Any, rows: Sequence[Sequence[int]], pad_token_id: int, device: torch.device, poolings: Sequence[str]
) -> torch.Tensor:
    """Pooled final hidden states ``[len(rows), hidden]`` (float32, on the CPU, not normalised) of
    token-id ``rows``, each row pooled its own way (``poolings[i]``: ``"last"`` or ``"mean"``)."""
    for pooling in poolings:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    lengths = torch.tensor([len(row) for row in rows], device=device)
    width = int(lengths.max())
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long, device=device)
        mask[i, : len(row)] = 1
    body = base_model(model)
    # No KV cache: a causal model's forward keeps every layer's keys and values of the whole batch
    # otherwise (its config's use_cache), held until the pooling is done.
    no_cache = {"use_cache": False} if _takes_use_cache(body) else {}
    out = body(input_ids=ids, attention_mask=mask, **no_cache)
    hidden = torch.as_tensor(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])
    last = hidden[torch.arange(len(rows), device=device), lengths - 1].float()
    if not any(p == "mean" for p in poolings):  # no float32 copy of every position
        return last.cpu()
    mean = (hidden.float() * mask[..., None]).sum(dim=1) / lengths[:, None]
    use_mean = torch.tensor([p == "mean" for p in poolings], device=device)[:, None]
    result: torch.Tensor = torch.where(use_mean, mean, last).cpu()
    return result


def _takes_use_cache(module: Any) -> bool:
    """Whether ``module``'s forward takes ``use_cache`` (by name, or through ``**kwargs``)."""
    try:
        parameters = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False
    return "use_cache" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def finish(vector: torch.Tensor, dimensions: int | None, normalize: bool) -> list[float]:
    """A pooled vector as returned: cut to ``dimensions``, then L2-normalised when asked."""
    if dimensions is not None:
        vector = vector[:dimensions]
    if normalize:
        vector = F.normalize(vector, dim=-1)
    return [float(x) for x in vector.tolist()]
