"""Log-probabilities of sampled tokens and of prompts, from the model's raw distribution.

Raw means ``log_softmax`` of the logits the model returned, before temperature, penalties, biases
and masks (vLLM's default ``logprobs_mode``): what the model thinks of each token, comparable across
requests whatever their sampling parameters. Only the rows that ask for them are computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from async_llm.engine.model_api import input_device
from async_llm.engine.output import TokenLogprob

if TYPE_CHECKING:
    from async_llm.engine.request import Request


def rows_wanting_logprobs(requests: Sequence[Request]) -> list[int]:
    return [i for i, r in enumerate(requests) if r.params.logprobs]


def raw_log_softmax(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``[k, V]`` float32 log-probabilities of ``rows`` of ``logits`` [B, V] (a copy, taken before
    the controls change the logits in place)."""
    return torch.log_softmax(logits[rows].float(), dim=-1)


def step_logprobs(
    logprobs: torch.Tensor, rows: list[int], tokens: torch.Tensor, requests: Sequence[Request]
) -> dict[int, TokenLogprob]:
    """Each logprob row's chosen token and top alternatives (one device-to-host copy).

    Args:
        logprobs: ``[k, V]`` from :func:`raw_log_softmax` for ``rows``.
        tokens: ``[B]`` the tokens chosen for every row of the batch.
    """
    chosen = logprobs.gather(1, tokens[rows][:, None]).squeeze(1)  # [k]
    top_k = max(requests[i].params.top_logprobs for i in rows)
    top = logprobs.topk(top_k, dim=-1) if top_k else None
    chosen_list = chosen.tolist()
    values = top.values.tolist() if top is not None else [[] for _ in rows]
    indices = top.indices.tolist() if top is not None else [[] for _ in rows]
    token_list = tokens[rows].tolist()
    out = {}
    for j, i in enumerate(rows):
        k = requests[i].params.top_logprobs
        out[i] = TokenLogprob(token_list[j], chosen_list[j], list(zip(indices[j][:k], values[j][:k], strict=True)))
    return out


@torch.inference_mode()
def prompt_logprobs(model: Any, prompt_ids: list[int], k: int) -> list[TokenLogprob | None]:
    """Log-probabilities of each prompt token given the ones before it (``None`` for the first),
    from one plain forward of the model over the prompt."""
    device = input_device(model)
    ids = torch.tensor([prompt_ids], device=device)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0, :-1]  # [L-1, V]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = ids[0, 1:]
    chosen = logprobs.gather(1, targets[:, None]).squeeze(1).tolist()
    top = logprobs.topk(k, dim=-1) if k else None
    values = top.values.tolist() if top is not None else [[] for _ in chosen]
    indices = top.indices.tolist() if top is not None else [[] for _ in chosen]
    out: list[TokenLogprob | None] = [None]
    for j, token in enumerate(prompt_ids[1:]):
        out.append(TokenLogprob(token, chosen[j], list(zip(indices[j], values[j], strict=True))))
    return out
