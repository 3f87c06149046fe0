"""Vectorised per-row sampling: penalties, temperature, top-k, top-p, min-p, seeded draws.

Every row of the batch has its own parameters, held as ``[B]`` tensors; one call samples the whole
batch. Randomness is one uniform number per sampled row per step, a pure function of the request's
seed and draw count (:mod:`async_llm.engine.draws`, so a row's text does not depend on what else is
in the batch), turned into a token by inverse-CDF lookup.

:func:`sample` and :func:`apply_penalties` never read a tensor back to the host (no ``.item()``,
``.tolist()``, ``int(tensor)``): whatever they need as a Python value is computed once, in
:meth:`SamplingBatch.build`. The one sync of a step is :func:`choose` reading the chosen ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from async_llm.engine.controls import advance, apply_controls
from async_llm.engine.logprobs import raw_log_softmax, rows_wanting_logprobs, step_logprobs
from async_llm.engine.output import TokenLogprob
from async_llm.engine.runners import native
from async_llm.engine.transfer import device_tensor
from async_llm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from async_llm.engine.request import Request


@dataclass
class SamplingBatch:
    """Sampling parameters of the batch's rows as tensors; ``None`` where no row uses the feature.

    Shapes: every tensor is ``[B]``.
    """

    greedy: torch.Tensor  # bool
    all_greedy: bool
    temperature: torch.Tensor  # float, 1.0 on greedy rows
    top_k: torch.Tensor | None  # long, vocab size where off
    top_k_max: int  # the largest k of the sampled rows (vocab size when one is off): a Python int, no sync
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    repetition_penalty: torch.Tensor | None
    frequency_penalty: torch.Tensor | None
    presence_penalty: torch.Tensor | None

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty is not None or self.frequency_penalty is not None

    @classmethod
    def build(cls, params: Sequence[SamplingParams], vocab_size: int, device: torch.device) -> SamplingBatch:
        """Stack the rows' parameters (called only when the batch's rows change)."""

        def column(values: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return device_tensor(values, dtype=dtype, device=device)

        def optional(
            values: Sequence[float], neutral: float, dtype: torch.dtype = torch.float32
        ) -> torch.Tensor | None:
            return column(values, dtype) if any(v != neutral for v in values) else None

        greedy = [p.greedy for p in params]
        sampled = [p for p in params if not p.greedy]
        # k <= 0 turns top-k off; a k beyond the vocabulary keeps every token, as off does.
        row_k = [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in sampled]
        top_k_max = max(row_k, default=vocab_size)
        # A greedy row's sampled token is thrown away: its k is the batch's largest, costing nothing.
        sampled_k = iter(row_k)
        top_k = [top_k_max if p.greedy else next(sampled_k) for p in params]
        penalties = any(p.frequency_penalty or p.presence_penalty for p in params)
        return cls(
            greedy=column(greedy, torch.bool),
            all_greedy=not sampled,
            temperature=column([1.0 if p.greedy else p.effective_temperature for p in params]),
            top_k=optional(top_k, vocab_size, torch.long) if sampled else None,
            top_k_max=top_k_max,
            top_p=optional([1.0 if p.greedy else p.top_p for p in params], 1.0) if sampled else None,
            min_p=optional([0.0 if p.greedy else p.min_p for p in params], 0.0) if sampled else None,
            repetition_penalty=optional([p.repetition_penalty for p in params], 1.0),
            frequency_penalty=column([p.frequency_penalty for p in params]) if penalties else None,
            presence_penalty=column([p.presence_penalty for p in params]) if penalties else None,
        )


def apply_penalties(
    logits: torch.Tensor, sb: SamplingBatch, counts: torch.Tensor | None, prompt_mask: torch.Tensor | None
) -> torch.Tensor:
    """Repetition (transformers' rule) then frequency/presence (OpenAI's rule) penalties.

    Args:
        logits: ``[B, V]`` float32.
        counts: ``[B, V]`` float, occurrences of each token in each row's output so far.
        prompt_mask: ``[B, V]`` bool, tokens present in each row's prompt.
    """
    if counts is None or not sb.uses_penalties:
        return logits
    in_output = counts > 0
    if sb.repetition_penalty is not None:
        assert prompt_mask is not None
        penalty = sb.repetition_penalty[:, None]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(prompt_mask | in_output, penalised, logits)
    if sb.frequency_penalty is not None and sb.presence_penalty is not None:
        logits = logits - sb.frequency_penalty[:, None] * counts - sb.presence_penalty[:, None] * in_output
    return logits


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax over the last dimension: the first index of the maximum, as
    ``argmax`` (a NaN counts as the maximum). On a CPU, the native step's kernel where it is loaded
    (rows in parallel, sixteen lanes at a time); else ``max(dim).indices``, documented to return the
    same index and about 2.5x faster than ``argmax`` over a vocabulary-wide row on a CPU (1 against
    2.7 ms for 64 rows of 49,152 on 2 cores), whose reduction is not vectorised there."""
    if logits.dim() >= 2:
        chosen = native.greedy(logits.reshape(-1, logits.shape[-1]))  # None off a CPU
        if chosen is not None:
            return chosen.reshape(logits.shape[:-1])
    return logits.max(dim=-1).indices


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of unnormalised ``probs`` [B, V] with one uniform in [0, 1) per row."""
    cdf = probs.cumsum(dim=-1)
    target = uniforms[:, None] * cdf[:, -1:]
    # right=True: the first index whose cdf exceeds the target, so zero-probability tokens are never chosen.
    index = torch.searchsorted(cdf, target, right=True)
    return index.clamp_(max=probs.shape[-1] - 1).squeeze(-1)


def sample(logits: torch.Tensor, sb: SamplingBatch, uniforms: torch.Tensor | None) -> torch.Tensor:
    """Choose the next token of every row.

    Args:
        logits: ``[B, V]`` float32, penalties already applied.
        sb: The rows' parameters.
        uniforms: ``[B]`` uniform draws in [0, 1); may be ``None`` when every row is greedy.

    Returns:
        ``[B]`` long token ids.
    """
    greedy = greedy_tokens(logits)
    if sb.all_greedy:
        return greedy
    assert uniforms is not None
    scores = logits / sb.temperature[:, None]
    if sb.top_k is not None and sb.top_p is None:
        # Only top-k: a partial sort to the largest k is enough.
        k_max = sb.top_k_max
        kth = scores.topk(k_max, dim=-1).values.gather(1, (sb.top_k - 1).clamp(max=k_max - 1)[:, None])
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if sb.top_p is None:
        if sb.min_p is not None:
            probs = probs.masked_fill(probs < sb.min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
        sampled = _inverse_cdf(probs, uniforms)
    else:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [B, V]
        if sb.top_k is not None:
            ranks = torch.arange(sorted_probs.shape[-1], device=probs.device)
            sorted_probs = sorted_probs.masked_fill(ranks[None, :] >= sb.top_k[:, None], 0.0)
        # Drop a token once the mass before it already reaches top_p (the first token is always kept).
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(
            mass_before >= sb.top_p[:, None] * sorted_probs.sum(-1, keepdim=True), 0.0
        )
        if sb.min_p is not None:
            sorted_probs = sorted_probs.masked_fill(sorted_probs < sb.min_p[:, None] * sorted_probs[:, :1], 0.0)
        sampled = order.gather(1, _inverse_cdf(sorted_probs, uniforms)[:, None]).squeeze(-1)
    return torch.where(sb.greedy, greedy, sampled)


@dataclass
class Choice:
    """The tokens chosen for a batch's rows, and what else the step learnt about each row."""

    tokens: torch.Tensor  # [B] long
    token_list: list[int]
    logprobs: dict[int, TokenLogprob] = field(default_factory=dict)  # rows that asked for them
    failed: dict[int, BaseException] = field(default_factory=dict)  # rows whose controls failed
    grammar_done: set[int] = field(default_factory=set)  # rows whose grammar is complete


def choose(
    logits: torch.Tensor,
    requests: Sequence[Request],
    sb: SamplingBatch,
    counts: torch.Tensor | None,
    prompt_mask: torch.Tensor | None,
    uniforms: torch.Tensor | None,
) -> Choice:
    """One step's tokens: raw logprobs (rows that ask), then the rows' controls, penalties and
    sampling; then each grammar row's matcher takes its token.

    Args:
        logits: ``[B, V]`` float32, changed in place.
        requests: The request of each row.
    """
    lp_rows = rows_wanting_logprobs(requests)
    raw = raw_log_softmax(logits, lp_rows) if lp_rows else None
    failed = apply_controls(logits, requests)
    if failed:
        logits[list(failed)] = 0.0  # any finite row: its token is thrown away with its request
    tokens = sample(apply_penalties(logits, sb, counts, prompt_mask), sb, uniforms)
    token_list = tokens.tolist()
    choice = Choice(tokens, token_list, failed=failed)
    if raw is not None:
        choice.logprobs = step_logprobs(raw, lp_rows, tokens, requests)
    for i, error in advance(requests, token_list).items():
        if i in failed:
            continue
        if error is None:
            choice.grammar_done.add(i)
        else:
            failed[i] = error
    return choice
