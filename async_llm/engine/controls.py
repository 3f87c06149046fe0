"""Per-row token controls, applied to the step's logits before sampling: grammar masks, allowed and
banned tokens, ``min_tokens``, ``logit_bias`` and per-request logits processors.

A row without controls costs nothing here: only the rows whose request carries a
:class:`RowControls` are touched, each with one indexed write of the ``[B, V]`` logits, and the
grammar rows' masks are filled by llguidance (in parallel, off the GIL) into one ``[k, V/32]``
bitmask applied in one vectorised op. The masks come from the front end's compiled grammars
(``async_llm.llm.controls``, which the engine never imports); the engine only advances each row's
matcher with its token.

Everything here runs on the engine thread. A control that fails (a raising processor, a matcher
error, a row with no token left) fails only its row's request.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class ControlledRow(Protocol):
    """What the controls read of a row's request (an engine ``Request``)."""

    @property
    def controls(self) -> RowControls | None: ...

    @property
    def prompt_ids(self) -> list[int]: ...

    @property
    def output_ids(self) -> list[int]: ...


@dataclass(eq=False)
class RowControls:
    """What one request's row does to its logits. Built by the front end (which has the tokenizer);
    the token ids are checked against the vocabulary there.

    Args:
        min_tokens: Before this many output tokens, ``end_ids`` are masked.
        end_ids: Ids that end the request (eos unless ignored, and ``stop_token_ids``).
        logit_bias: ``(token ids, biases)`` added to the logits.
        bad_words: Token sequences never generated: the last token of each is banned when the
            output ends with the ones before it.
        allowed_ids: The only ids that may be generated, or None.
        processors: Callables ``f(output_ids, logits)`` or ``f(prompt_ids, output_ids, logits)``.
        matcher: An llguidance ``LLMatcher`` of this row (one per row), or None.
    """

    min_tokens: int = 0
    end_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, ...], tuple[float, ...]] = ((), ())
    bad_words: tuple[tuple[int, ...], ...] = ()
    allowed_ids: tuple[int, ...] | None = None
    processors: tuple[Callable[..., Any], ...] = ()
    matcher: Any = None
    _allowed_mask: torch.Tensor | None = field(default=None, repr=False)
    _arity: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        self._arity = tuple(_positional_arity(f) for f in self.processors)

    def banned(self, output_ids: Sequence[int]) -> list[int]:
        """Ids banned at this step by ``min_tokens`` and ``bad_words``."""
        ids = list(self.end_ids) if len(output_ids) < self.min_tokens else []
        for word in self.bad_words:
            prefix = word[:-1]
            if not prefix or tuple(output_ids[-len(prefix) :]) == prefix:
                ids.append(word[-1])
        return ids

    def allowed_mask(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """``[V]`` bool, True where a token may be generated (built once per row)."""
        if self._allowed_mask is None:
            assert self.allowed_ids is not None
            mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            mask[torch.tensor(self.allowed_ids, dtype=torch.long, device=device)] = True
            self._allowed_mask = mask
        return self._allowed_mask

    def process(self, request: ControlledRow, logits: torch.Tensor) -> torch.Tensor:
        """Run the request's logits processors over its ``[V]`` logits."""
        for processor, arity in zip(self.processors, self._arity, strict=True):
            args = (request.output_ids, logits) if arity == 2 else (request.prompt_ids, request.output_ids, logits)
            result = processor(*args)
            if not isinstance(result, torch.Tensor) or result.shape != logits.shape:
                raise TypeError(
                    f"logits processor {getattr(processor, '__name__', processor)!r} must return a tensor of "
                    f"shape {tuple(logits.shape)}, got {type(result).__name__}"
                )
            logits = result
        return logits


def _positional_arity(fn: Callable[..., Any]) -> int:
    """2 for ``f(output_ids, logits)``, 3 for ``f(prompt_ids, output_ids, logits)`` (vLLM's two forms)."""
    try:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
    except (TypeError, ValueError):  # a builtin without a signature: assume the common form
        return 2
    return 3 if len(params) >= 3 else 2


def apply_controls(logits: torch.Tensor, requests: Sequence[ControlledRow]) -> dict[int, BaseException]:
    """Apply every row's controls to ``logits`` [B, V] in place.

    Returns:
        The rows whose controls failed, with the error (their requests must fail; their logits
        are left as they were).
    """
    rows = [(i, r, r.controls) for i, r in enumerate(requests) if r.controls is not None]
    failed: dict[int, BaseException] = {}
    if not rows:
        return failed
    vocab, device = logits.shape[-1], logits.device
    banned_rows: list[int] = []
    banned_ids: list[int] = []
    bias_rows: list[int] = []
    bias_ids: list[int] = []
    bias_values: list[float] = []
    grammar: list[tuple[int, Any]] = []
    for i, request, c in rows:
        try:
            if c.processors:
                logits[i] = c.process(request, logits[i])
            if c.allowed_ids is not None:
                logits[i].masked_fill_(~c.allowed_mask(vocab, device), float("-inf"))
        except Exception as exc:  # noqa: BLE001  # a caller's processor fails its own request only
            failed[i] = exc
            continue
        banned = c.banned(request.output_ids)
        banned_rows += [i] * len(banned)
        banned_ids += banned
        ids, values = c.logit_bias
        bias_rows += [i] * len(ids)
        bias_ids += ids
        bias_values += values
        if c.matcher is not None:
            grammar.append((i, c.matcher))
    if bias_ids:
        index = (torch.tensor(bias_rows, device=device), torch.tensor(bias_ids, device=device))
        logits.index_put_(index, torch.tensor(bias_values, dtype=logits.dtype, device=device), accumulate=True)
    if banned_ids:
        index = (torch.tensor(banned_rows, device=device), torch.tensor(banned_ids, device=device))
        logits.index_put_(index, torch.tensor(float("-inf"), dtype=logits.dtype, device=device))
    if grammar:
        failed.update(_apply_grammars(logits, grammar))
    # A row left with no token to choose (say, allowed ids that the grammar forbids) cannot go on.
    controlled = [i for i, _, _ in rows if i not in failed]
    if controlled:
        dead = torch.isneginf(logits[controlled].amax(dim=-1)).tolist()
        for i, is_dead in zip(controlled, dead, strict=True):
            if is_dead:
                failed[i] = RuntimeError("no token is allowed: the request's token controls exclude every token")
    return failed


# llguidance's executor computes several rows' masks in parallel, with the GIL released.
_executor: Any = None


def _apply_grammars(logits: torch.Tensor, rows: list[tuple[int, Any]]) -> dict[int, BaseException]:
    """Mask each grammar row's logits to the tokens its matcher accepts next."""
    global _executor
    failed: dict[int, BaseException] = {}
    live = []
    for i, matcher in rows:
        if matcher.is_error():
            failed[i] = RuntimeError(f"structured output failed: {matcher.get_error()}")
        else:
            live.append((i, matcher))
    if not live:
        return failed
    vocab = logits.shape[-1]
    # [k, ceil(V/32)] int32 on the CPU, written by llguidance through its pointer API (its torch
    # helpers are not used: importing them builds a torch.compile kernel, for no gain on a CPU).
    bitmask = torch.full((len(live), (vocab + 31) // 32), -1, dtype=torch.int32)
    row_bytes = bitmask.shape[1] * 4
    if len(live) == 1:
        live[0][1].unsafe_compute_mask_ptr(bitmask.data_ptr(), row_bytes)
    else:
        if _executor is None:
            import llguidance  # loaded with the first structured request

            _executor = llguidance.LLExecutor()
        _executor.unsafe_compute_mask_ptr(
            [(m, k) for k, (_, m) in enumerate(live)], bitmask.data_ptr(), row_bytes, len(live)
        )
    for i, matcher in live:
        if matcher.is_error():
            failed[i] = RuntimeError(f"structured output failed: {matcher.get_error()}")
    index = torch.tensor([i for i, _ in live], device=logits.device)
    allowed = unpack_bitmask(bitmask.to(logits.device), vocab)  # [k, V] bool
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return failed


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[k, W]`` int32 (bit ``j`` of word ``w`` is token ``32 * w + j``) -> ``[k, V]`` bool."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = (bitmask[:, :, None] >> bits) & 1  # [k, W, 32]
    return allowed.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def advance(requests: Sequence[ControlledRow], tokens: Sequence[int]) -> dict[int, BaseException | None]:
    """Feed each grammar row's matcher its sampled token.

    Returns:
        Rows whose grammar ended (``None``: the request is complete) or failed (the error).
    """
    ended: dict[int, BaseException | None] = {}
    for i, (request, token) in enumerate(zip(requests, tokens, strict=True)):
        c = request.controls
        if c is None or c.matcher is None:
            continue
        if not c.matcher.consume_token(token) or c.matcher.is_error():
            ended[i] = RuntimeError(f"structured output failed: {c.matcher.get_error() or f'token {token} rejected'}")
        elif c.matcher.is_stopped():
            ended[i] = None
    return ended
