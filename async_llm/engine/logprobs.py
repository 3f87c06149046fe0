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
from async_llm.engine.transfer import device_tensor

if TYPE_CHECKING:
    from async_llm.engine.request import Request


def rows_wanting_logprobs(requests: Sequence[Request]) -> list[int]:
    return [i for i, r in enumerate(requests) if r.params.logprobs]


def raw_log_softmax(logits: torch.Tensor, rows: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``[k, V]`` float32 log-probabilities of ``rows`` of ``logits`` [B, V] (a copy, taken before
    the controls change the logits in place). ``rows``: their indices, or those indices already on
    the logits' device (a list goes there by a queued copy)."""
    if not isinstance(rows, torch.Tensor):
        rows = device_tensor(list(rows), dtype=torch.long, device=logits.device)
    return torch.log_softmax(logits.index_select(0, rows).float(), dim=-1)


def logprob_tensors(
    logprobs: torch.Tensor, tokens: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The device half of :func:`step_logprobs`: each logprob row's chosen token's log-probability
    ``[k]``, and its ``top_k`` best ``[k, top_k]`` (values, then token ids), nothing read back.

    Args:
        logprobs: ``[k, V]`` from :func:`raw_log_softmax`.
        tokens: ``[k]`` the tokens chosen for those rows.
    """
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)  # [k]
    top = logprobs.topk(top_k, dim=-1) if top_k else None
    empty = logprobs.new_empty((logprobs.shape[0], 0))
    return chosen, top.values if top is not None else empty, top.indices if top is not None else empty.long()


def logprob_records(
    rows: Sequence[int],
    requests: Sequence[Request],
    tokens: Sequence[int],
    chosen: Sequence[float],
    values: Sequence[Sequence[float]],
    indices: Sequence[Sequence[int]],
) -> dict[int, TokenLogprob]:
    """The host half of :func:`step_logprobs`: row ``rows[j]``'s record from the ``j``-th of each
    list (its token, its log-probability, and as many of the best as its request asks for)."""
    out = {}
    for j, i in enumerate(rows):
        k = requests[i].params.top_logprobs
        out[i] = TokenLogprob(tokens[j], chosen[j], list(zip(indices[j][:k], values[j][:k], strict=True)))
    return out


def step_logprobs(
    logprobs: torch.Tensor, rows: list[int], tokens: torch.Tensor, requests: Sequence[Request]
) -> dict[int, TokenLogprob]:
    """Each logprob row's chosen token and top alternatives.

    Args:
        logprobs: ``[k, V]`` from :func:`raw_log_softmax` for ``rows``.
        tokens: ``[B]`` the tokens chosen for every row of the batch.
    """
    chosen_tokens = tokens[rows]
    top_k = max(requests[i].params.top_logprobs for i in rows)
    chosen, values, indices = logprob_tensors(logprobs, chosen_tokens, top_k)
    return logprob_records(rows, requests, chosen_tokens.tolist(), chosen.tolist(), values.tolist(), indices.tolist())


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
