"""Embeddings from a causal LM: one forward of the base model (no LM head), pooled per input.

The way embedding models built on causal LMs work (Qwen3-Embedding, GTE-Qwen, E5-Mistral): the
final hidden state of the **last** token (the model reads the whole input before it), or the
**mean** over the input's tokens, optionally cut to the first ``dimensions`` (Matryoshka-trained
models keep their quality there) and L2-normalised.

Inputs are right-padded into one batch with an attention mask, so every row sees only its own
tokens at the positions it would have alone; pooling reads real tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["POOLINGS", "base_model", "embed_rows", "hidden_size"]

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
    model: Any,
    rows: Sequence[Sequence[int]],
    pad_token_id: int,
    device: torch.device,
    pooling: str,
    normalize: bool = True,
    dimensions: int | None = None,
) -> torch.Tensor:
    """Embeddings ``[len(rows), dimensions or hidden]`` (float32, on the CPU) of token-id ``rows``."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    lengths = torch.tensor([len(row) for row in rows], device=device)
    width = int(lengths.max())
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long, device=device)
        mask[i, : len(row)] = 1
    out = base_model(model)(input_ids=ids, attention_mask=mask)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    hidden = torch.as_tensor(hidden).float()
    if pooling == "last":
        pooled = hidden[torch.arange(len(rows), device=device), lengths - 1]
    else:
        pooled = (hidden * mask[..., None]).sum(dim=1) / lengths[:, None]
    if dimensions is not None:
        pooled = pooled[:, :dimensions]
    if normalize:
        pooled = F.normalize(pooled, dim=-1)
    result: torch.Tensor = pooled.cpu()
    return result
