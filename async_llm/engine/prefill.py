"""Prefill state: admitted prompts between admission and the batch, each computed into a key/value
buffer of its own, whole or in chunks, after the longest prefix the prefix cache holds.

Each distinct context being prefilled is a :class:`PrefillState` (the ``n`` rows of one request share
it): its tokens, a ``[layers, 2, Hkv, L, D]`` buffer and how many of its leading columns are computed.
Every engine step the plan (:func:`~async_llm.engine.planner.plan_step`) takes chunks of the states,
oldest first, with :meth:`Prefiller.take`; the model runner computes them (:class:`Forward`), and
:meth:`Prefiller.complete` records what they computed: a state whose last token is computed leaves
with its next-token logits and joins the running batch. A prompt longer than the budget is thus
prefilled over several steps (chunked prefill), and the batch decodes between its chunks.

This module runs no model: the forwards are the runners' (:mod:`async_llm.engine.runners`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from async_llm.engine.prefix_cache import PrefixCache, PrefixHit
from async_llm.engine.request import Request

#: One forward's prompt chunks: ``(state, tokens to compute)``.
Items = list[tuple["PrefillState", int]]


@dataclass(eq=False)
class PrefillState:
    """One context being prefilled and the rows waiting for it."""

    requests: list[Request]
    tokens: list[int]
    kv: torch.Tensor | None = None  # [layers, 2, Hkv, len(tokens), D], allocated by the first forward
    done: int = 0  # leading columns of kv computed (a cached prefix counts)
    cached: int = 0  # of which came from the prefix cache
    started: bool = False  # a forward has computed some of it
    chain: list[int] = field(default_factory=list, repr=False)  # chained hashes of its full blocks
    # The cached prefix's blocks until the state's first forward copies them into kv (a prompt that
    # waits for its turn holds no buffer of its own).
    prefix: PrefixHit | None = field(default=None, repr=False)
    logits: torch.Tensor | None = field(default=None, repr=False)  # [V] once the last token ran

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.done


@dataclass
class Forward:
    """One forward of a step: prompt chunks (``(state, tokens to compute)``, oldest first) and
    whether the batch's rows decode in it (whatever rows the batch has when it runs).

    ``mode`` is how the runner computes the chunks: ``"packed"`` (along one token axis, the fast
    runner's only mode, decode rows included), ``"padded"`` (whole prompts, left-padded) or
    ``"resume"`` (one chunk after its prefix); a decode-only forward has no chunks.
    """

    items: Items
    mode: str = "packed"
    decode: bool = False

    @property
    def requests(self) -> list[Request]:
        return [r for state, _ in self.items for r in state.requests]

    @property
    def tokens(self) -> int:
        """Prompt tokens this forward computes."""
        return sum(n for _, n in self.items)


class Prefiller:
    """The prompts between admission and the batch (engine thread only).

    Args:
        prefix_cache: Blocks of earlier prompts to reuse, or None.
    """

    def __init__(self, prefix_cache: PrefixCache | None) -> None:
        self.prefix_cache = prefix_cache
        self.states: list[PrefillState] = []
        # Whether a prefill may continue after a prefix (the runner's verdict, set when the engine
        # starts): without it prompts are prefilled whole and no prefix is reused.
        self.can_resume = False
        self.computed_tokens = 0  # prompt tokens run through the model (not taken from the cache)

    # -- states ------------------------------------------------------------------------------------------
    def add(self, requests: Iterable[Request]) -> None:
        """Start prefilling admitted requests (those with the same context share one state), after the
        longest cached prefix of each."""
        by_context: dict[tuple[int, ...], PrefillState] = {}
        for request in requests:
            key = tuple(request.context_ids)
            state = by_context.get(key)
            if state is None:
                state = by_context[key] = PrefillState([], list(key))
                self._reuse_prefix(state)
                self.states.append(state)
            state.requests.append(request)

    def _reuse_prefix(self, state: PrefillState, count: bool = True) -> None:
        """Start ``state`` after the longest prefix the cache holds (when longer than what it has);
        ``count`` counts its tokens as queried (once per state)."""
        cache = self.prefix_cache
        if cache is None or not self.can_resume:
            return
        if not state.chain:
            state.chain = cache.chain(state.tokens)
        hit = cache.match(state.tokens, count=count)
        if hit.tokens <= state.done:
            return
        if state.kv is None:
            state.prefix = hit
        else:
            hit.copy_into(state.kv)
        cache.record_hit(hit.tokens - state.cached)
        state.done = state.cached = hit.tokens

    def drop(self, requests: Iterable[Request]) -> None:
        """Forget these requests' rows; a state no row waits for any more is freed."""
        gone = set(requests)
        for state in self.states:
            state.requests = [r for r in state.requests if r not in gone]
            if not state.requests:
                _free(state)
        self.states = [s for s in self.states if s.requests]

    def clear(self) -> None:
        for state in self.states:
            _free(state)
        self.states.clear()

    @property
    def requests(self) -> list[Request]:
        return [r for state in self.states for r in state.requests]

    # -- one step's work ----------------------------------------------------------------------------------
    def _shared(self) -> tuple[set[int], dict[int, int]]:
        """Prompts that share a prefix compute it once: a state not started yet that shares more
        full blocks with an earlier state than the cache gives it waits (by id) until that state has
        computed them (they then reach it through the cache); the earlier state's next chunk ends
        where the shared blocks end (``{id: column}``)."""
        waiting: set[int] = set()
        stops: dict[int, int] = {}
        cache = self.prefix_cache
        if cache is None or not self.can_resume or all(state.started for state in self.states):
            return waiting, stops  # nothing can wait: the common case of a step, kept cheap
        owners: dict[int, PrefillState] = {}  # chained block hash -> the earliest state with that prefix
        for state in self.states:
            if not state.started:
                self._reuse_prefix(state, count=False)  # blocks computed since it was admitted
                shared, leader = 0, None
                for k, h in enumerate(state.chain):
                    owner = owners.get(h)
                    if owner is None:
                        break
                    shared, leader = (k + 1) * cache.block_size, owner
                if (
                    leader is not None
                    and state.done < shared
                    and leader.done < shared
                    and state.tokens[:shared] == leader.tokens[:shared]  # not a hash collision
                ):
                    waiting.add(id(state))
                    stops[id(leader)] = min(stops.get(id(leader), shared), shared)
                    continue
            for h in state.chain:
                owners.setdefault(h, state)
        return waiting, stops

    def take(self, budget: int, whole: int = 0) -> Items:
        """This step's chunks, states oldest first: prompts whose rest fits in ``whole`` tokens (in
        all) are finished in this step; the others get chunks of ``budget`` tokens in all. A state
        that cannot be chunked is taken whole, and the first state always gets some work.

        ``whole`` bounds the stall a short prompt may cost running streams (one step of that many
        tokens) and spares it the slow progress of small chunks; ``budget`` paces long prompts."""
        items: Items = []
        waiting, stops = self._shared()
        for state in self.states:
            if id(state) in waiting:
                continue
            take = state.remaining
            if id(state) in stops:
                take = min(take, stops[id(state)] - state.done)
            if take <= whole:
                whole -= take
            elif not self.can_resume and items and take > budget:
                break
            else:
                if self.can_resume:
                    take = min(take, budget)
                if take <= 0:
                    continue
                budget -= take
            items.append((state, take))
        return items

    def complete(self, forward: Forward) -> list[PrefillState]:
        """Record what ``forward`` computed (the runner ran it); returns the states it completed
        (their ``logits`` set), which leave for the batch."""
        done = []
        self.computed_tokens += forward.tokens
        for state, n in forward.items:
            state.done += n
            state.started = True
            if state.remaining == 0:
                done.append(state)
                for request in state.requests:  # a resumed request keeps its first prefill's figure
                    if request.cached_tokens is None:
                        request.cached_tokens = min(state.cached, request.num_prompt_tokens)
            elif self._completes_a_block(state.done - n, state.done) and state.kv is not None:
                assert self.prefix_cache is not None
                # Blocks of a prompt still in chunks: prompts sharing them need not wait for its end.
                self.prefix_cache.insert(state.tokens[: state.done], state.kv[:, :, :, : state.done])
        self.states = [s for s in self.states if s.remaining > 0]
        return done

    def _completes_a_block(self, before: int, after: int) -> bool:
        """Whether computing columns ``[before, after)`` filled a block the cache does not have yet."""
        cache = self.prefix_cache
        return cache is not None and after // cache.block_size > before // cache.block_size


def _free(state: PrefillState) -> None:
    """Let go of a dropped state's buffer now, though a forward or a traceback may still hold the
    state (a buffer in the static runner's store frees its slot when released)."""
    state.kv = state.logits = None
    state.prefix = None


def materialize(state: PrefillState, new_kv: Callable[[int], torch.Tensor] | None) -> None:
    """Give ``state`` its buffer before its first forward (``new_kv(columns)``, the runner's layout,
    or the cached blocks' when None) with its cached prefix copied in."""
    if state.kv is None:
        if new_kv is not None:
            state.kv = new_kv(len(state.tokens))
        elif state.prefix is not None:
            layers, _, heads, _, head_dim = state.prefix.blocks[0].shape
            state.kv = state.prefix.blocks[0].new_empty(layers, 2, heads, len(state.tokens), head_dim)
    if state.prefix is not None and state.kv is not None:
        state.prefix.copy_into(state.kv)
        state.prefix = None
