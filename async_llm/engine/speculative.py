"""Speculative decoding without a second model: n-gram (prompt-lookup) drafts, verified in one
forward of ``k + 1`` positions per row inside the running batch (the fast runner's padded batch, or
the static runner's slots, eagerly).

A row's draft is what followed the last time its latest ``n`` tokens appeared earlier in its own
context (prompt and output), ``n`` from ``prompt_lookup_max`` down to ``prompt_lookup_min``: where
an answer copies its input (a summary quoting it, code rewritten, fields extracted), the next tokens
are often the ones that followed before. The verify step feeds each row its last token and its
draft; the logits at each position say what the model would have produced there, so:

- a greedy row takes the draft's tokens while they are the argmax, then the argmax where they part
  (or after the last): the output is token for token what decoding one token at a time gives;
- a sampled row takes draft token ``d`` with probability ``p(d)`` (the row's distribution after
  temperature, top-k, top-p and min-p) and, where it refuses it, samples from ``p`` without ``d``,
  renormalised: rejection sampling for a draft that is one token for sure, so every token has
  exactly the distribution it would have had (Leviathan et al., 2023).

Every step yields at least one token per row, and up to ``k + 1``.

What does not speculate (the row decodes one token per step, in the same verify forward): rows with
token controls (grammars, logit bias, banned or allowed tokens, ``min_tokens``, logits processors:
their masks depend on every token before), with penalties (the same), with logprobs, and rows whose
drafts were mostly refused lately (:data:`MIN_ACCEPTANCE`). The whole step decodes plainly when the
batch has more rows than ``disable_by_batch_size`` (a verify step computes ``k + 1`` positions per
row; past a few rows that costs more than the accepted tokens save) or no row has a draft.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from async_llm.engine.draws import uniforms
from async_llm.engine.transfer import device_tensor
from async_llm.errors import InvalidParameterError, ParameterTypeError

#: The methods ``speculative_config`` knows.
METHODS = ("ngram",)

#: Largest ``num_speculative_tokens``: a verify step computes that many positions more per row.
MAX_SPECULATIVE_TOKENS = 16

#: Defaults (vLLM's names): draft length, the longest and shortest n-grams looked up.
DEFAULT_SPECULATIVE_TOKENS = 4
DEFAULT_LOOKUP_MAX = 4
DEFAULT_LOOKUP_MIN = 2

#: Rows above which a step decodes plainly (measured on a CPU with the default model: see
#: ``benchmarks/README.md``, speculation).
DEFAULT_DISABLE_BY_BATCH_SIZE = 2

#: A row's first draft length, and the shortest it drafts after a refusal (see RowSpeculation).
START_DRAFT = 4
MIN_DRAFT = 2

#: A row whose drafts were accepted at less than this rate over its last :data:`ACCEPTANCE_WINDOW`
#: drafted tokens stops drafting for :data:`BACKOFF_TOKENS` tokens (then tries again). A verify step
#: of one row costs 1.1x (bf16) to 1.3x (fp32) a plain step on a CPU (``benchmarks/README.md``), so
#: drafts pay from about 0.3 accepted tokens a step: 0.1 of 4 drafted, the bar kept.
MIN_ACCEPTANCE = 0.1
ACCEPTANCE_WINDOW = 16
BACKOFF_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    """How rows speculate (the ``speculative_config`` of :class:`~async_llm.HuggingFaceLLM`, and of
    a request).

    Attributes:
        method: ``"ngram"`` (prompt lookup; the only method).
        num_speculative_tokens: Draft tokens per row and step (1 to :data:`MAX_SPECULATIVE_TOKENS`).
        prompt_lookup_max: Longest n-gram looked up.
        prompt_lookup_min: Shortest n-gram looked up.
        disable_by_batch_size: Steps with more rows than this decode plainly.
    """

    method: str = "ngram"
    num_speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS
    prompt_lookup_max: int = DEFAULT_LOOKUP_MAX
    prompt_lookup_min: int = DEFAULT_LOOKUP_MIN
    disable_by_batch_size: int = DEFAULT_DISABLE_BY_BATCH_SIZE

    @classmethod
    def parse(cls, value: object, param: str = "speculative_config") -> SpeculativeConfig | None:
        """A config from what a caller gives: a mapping of the fields above (vLLM's keys), a
        :class:`SpeculativeConfig`, or None (no speculation).

        Raises:
            ParameterTypeError, InvalidParameterError: Naming ``param`` (or ``param.key``): not a
                mapping, an unknown key or method, a value of the wrong type or out of range.
        """
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, Mapping):
            raise ParameterTypeError(param, f"{param} must be a dict such as {{'method': 'ngram'}}, got {value!r}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(str(k) for k in value if k not in known)
        if unknown:
            raise InvalidParameterError(param, f"{param} has unknown keys {unknown}; it takes {sorted(known)}")
        method = value.get("method", "ngram")
        if method not in METHODS:
            raise InvalidParameterError(
                f"{param}.method", f"{param}.method must be one of {list(METHODS)}, got {method!r}"
            )
        ints = {}
        for key, low, high, default in (
            ("num_speculative_tokens", 1, MAX_SPECULATIVE_TOKENS, DEFAULT_SPECULATIVE_TOKENS),
            ("prompt_lookup_max", 1, 64, DEFAULT_LOOKUP_MAX),
            ("prompt_lookup_min", 1, 64, None),
            ("disable_by_batch_size", 1, 1 << 20, DEFAULT_DISABLE_BY_BATCH_SIZE),
        ):
            number = value.get(key, default)
            if number is None:
                continue
            name = f"{param}.{key}"
            if isinstance(number, bool) or not isinstance(number, int):
                raise ParameterTypeError(name, f"{name} must be an int in [{low}, {high}], got {number!r}")
            if not low <= number <= high:
                raise InvalidParameterError(name, f"{name} must be an int in [{low}, {high}], got {number!r}")
            ints[key] = number
        lookup_max = ints["prompt_lookup_max"]
        lookup_min = ints.get("prompt_lookup_min", min(DEFAULT_LOOKUP_MIN, lookup_max))
        if lookup_min > lookup_max:
            raise InvalidParameterError(
                f"{param}.prompt_lookup_min",
                f"{param}.prompt_lookup_min ({lookup_min}) must be <= prompt_lookup_max ({lookup_max})",
            )
        return cls(
            method=str(method),
            num_speculative_tokens=ints["num_speculative_tokens"],
            prompt_lookup_max=lookup_max,
            prompt_lookup_min=lookup_min,
            disable_by_batch_size=ints["disable_by_batch_size"],
        )


class NgramIndex:
    """Where each n-gram of a token sequence last occurred (``n`` in ``[low, high]``), kept up to date
    as the sequence grows: a lookup is one dictionary read per ``n``, whatever the context's length.

    ``following[n][gram]`` is the position of the token that followed ``gram``'s latest occurrence
    whose continuation is known (so never the sequence's own last ``n`` tokens).
    """

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high
        self.tokens: list[int] = []
        self.following: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(low, high + 1)}

    def extend(self, tokens: Sequence[int]) -> None:
        """Append ``tokens`` to the sequence."""
        seq = self.tokens
        for token in tokens:
            seq.append(token)
            end = len(seq) - 1  # the new token's position: it follows the grams ending just before it
            for n, table in self.following.items():
                if end >= n:
                    table[tuple(seq[end - n : end])] = end

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the sequence's last
        ``n`` tokens, the longest ``n`` that has one; ``[]`` when none has."""
        seq = self.tokens
        for n in range(self.high, self.low - 1, -1):
            if len(seq) <= n:
                continue
            start = self.following[n].get(tuple(seq[-n:]))
            if start is not None:
                return seq[start : start + k]
        return []


class RowSpeculation:
    """A request's speculation state (engine thread only): its n-gram index and recent acceptance."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.index = NgramIndex(config.prompt_lookup_min, config.prompt_lookup_max)
        self.drafted = 0  # in the current acceptance window
        self.accepted = 0
        self.paused_until = 0  # output length before which the row does not draft (low acceptance)
        # Draft length: doubles after a draft accepted whole (up to num_speculative_tokens), drops to
        # one past the accepted tokens after a refusal (at least MIN_DRAFT): a copy in progress gets
        # long drafts, text that parts from its context short ones.
        self.length = min(START_DRAFT, config.num_speculative_tokens)

    def draft(self, prompt: Sequence[int], output: Sequence[int]) -> list[int]:
        """The row's draft for its next step, its tokens so far being ``prompt`` then ``output``."""
        if len(output) < self.paused_until:
            return []
        indexed = len(self.index.tokens)
        if indexed < len(prompt):
            self.index.extend(prompt[indexed:])
            indexed = len(prompt)
        self.index.extend(output[indexed - len(prompt) :])
        return self.index.draft(self.length)

    def record(self, drafted: int, accepted: int, produced: int) -> None:
        """Count a verified draft; pause drafting when the recent acceptance rate is too low."""
        self.drafted += drafted
        self.accepted += accepted
        limit = self.config.num_speculative_tokens
        if accepted >= drafted:
            self.length = min(limit, 2 * self.length)
        else:
            self.length = min(limit, max(MIN_DRAFT, accepted + 1))
        if self.drafted >= ACCEPTANCE_WINDOW:
            if self.accepted < MIN_ACCEPTANCE * self.drafted:
                self.paused_until = produced + BACKOFF_TOKENS
            self.drafted = self.accepted = 0


def verify_inputs(last: torch.Tensor, drafts: Sequence[Sequence[int]], positions: int) -> torch.Tensor:
    """A verify step's tokens ``[B, T]``: each row's ``last`` token (``[B]``, the one it feeds
    next) then its draft, the positions past a draft filled with the last token again (fillers:
    their results are never kept)."""
    rows = [[*draft, *[-1] * (positions - 1 - len(draft))] for draft in drafts]
    filled = device_tensor(rows, dtype=torch.long, device=last.device).reshape(len(drafts), positions - 1)
    ids = last[:, None].repeat(1, positions)
    ids[:, 1:] = torch.where(filled >= 0, filled, ids[:, 1:])
    return ids


def probabilities(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None,
                  top_p: torch.Tensor | None, min_p: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """Each row's sampling distribution ``[N, V]`` (normalised), as the sampler draws from it:
    temperature, then top-k, top-p (the first token always kept) and min-p, in vocabulary order."""
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    if top_k is not None or top_p is not None:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        ranks = torch.arange(sorted_probs.shape[-1], device=probs.device)
        keep = torch.ones_like(sorted_probs, dtype=torch.bool)
        if top_k is not None:
            keep &= ranks[None, :] < top_k[:, None]
        if top_p is not None:
            kept = sorted_probs * keep
            mass_before = kept.cumsum(dim=-1) - kept
            keep &= mass_before < top_p[:, None] * kept.sum(-1, keepdim=True)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs * keep)
    if min_p is not None:
        probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One index from each row of ``probs`` [N, V] with the uniform ``u`` [N] (inverse CDF)."""
    cdf = probs.cumsum(dim=-1)
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
    return index.clamp_(max=probs.shape[-1] - 1).squeeze(-1)


def accept(
    logits: torch.Tensor,
    drafts: Sequence[Sequence[int]],
    greedy: Sequence[bool],
    sampling: Mapping[str, torch.Tensor | None] | None,
    seeds: Sequence[int],
    counters: Sequence[int],
) -> list[list[int]]:
    """The tokens each speculating row emits this step.

    Args:
        logits: ``[R, T, V]`` float32: row ``r``'s logits after its last token (position 0) and
            after each of its draft's tokens.
        drafts: Each row's draft (at most ``T - 1`` tokens).
        greedy: Whether each row decodes greedily.
        sampling: The sampled rows' ``temperature``, ``top_k``, ``top_p``, ``min_p``, each ``[R]``
            or None (None when every row is greedy).
        seeds, counters: Each sampled row's draw seed and first draw index (see
            :mod:`~async_llm.engine.draws`); the step uses ``2 T`` draws per row from there.

    Returns:
        Each row's tokens: the accepted draft tokens, then one more (the model's where it refused
        the draft, or after the whole draft).
    """
    r, t, v = logits.shape
    from async_llm.engine.sampler import greedy_tokens  # sampler imports this module (through SamplingParams)

    targets = greedy_tokens(logits)  # [R, T]
    if sampling is None or all(greedy):
        return [_walk(draft, row) for draft, row in zip(drafts, targets.tolist(), strict=True)]
    device = logits.device
    flat = logits.reshape(r * t, v)

    def per_position(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.repeat_interleave(t)

    probs = probabilities(
        flat,
        per_position(sampling["temperature"]),  # type: ignore[arg-type]
        per_position(sampling["top_k"]),
        per_position(sampling["top_p"]),
        per_position(sampling["min_p"]),
    ).reshape(r, t, v)
    seed = device_tensor(seeds, dtype=torch.long, device=device)[:, None].expand(r, 2 * t)
    count = device_tensor(counters, dtype=torch.long, device=device)[:, None] + torch.arange(2 * t, device=device)
    draws = uniforms(seed.reshape(-1), count.reshape(-1)).reshape(r, 2 * t)
    # Every position at once: whether its draft token is accepted (u < p(token)), and the token it
    # emits if it is the first refused (drawn from p with the draft token taken out) or the one
    # after the whole draft (drawn from p). One read back to the host for the step.
    drafted = device_tensor([[*d, *[0] * (t - len(d))] for d in drafts], dtype=torch.long, device=device)
    in_draft = torch.arange(t, device=device)[None, :] < device_tensor([len(d) for d in drafts], device=device)[:, None]
    accepted = draws[:, 0::2] < probs.gather(2, drafted[..., None]).squeeze(-1)
    residual = torch.where(in_draft[..., None], probs.scatter(2, drafted[..., None], 0.0), probs)
    # p was all on the refused token: cannot happen but for rounding; draw from p then.
    residual = torch.where(residual.sum(-1, keepdim=True) <= 0.0, probs, residual)
    emits = _draw(residual.reshape(r * t, v), draws[:, 1::2].reshape(-1)).reshape(r, t)
    greedy_rows, accepts, sampled_rows = torch.stack((targets, accepted.long(), emits)).tolist()
    return [
        _walk(draft, greedy_rows[row]) if greedy[row] else _walk(draft, sampled_rows[row], accepts[row])
        for row, draft in enumerate(drafts)
    ]


def _walk(draft: Sequence[int], emits: Sequence[int], accepted: Sequence[int] | None = None) -> list[int]:
    """One row's tokens: its draft while the draft's tokens are accepted, then the token of the
    position where one is refused (or of the one after the whole draft).

    Args:
        draft: The row's draft tokens.
        emits: Each position's token if the row stops there: the model's argmax for a greedy row, a
            draw for a sampled one.
        accepted: A sampled row's verdicts (``u < p(token)``, nonzero when accepted). None: a greedy
            row, whose draft token is accepted where it is the argmax.
    """
    out: list[int] = []
    for j, token in enumerate(draft):
        if not (emits[j] == token if accepted is None else accepted[j]):
            break
        out.append(token)
    out.append(emits[len(out)])
    return out
