"""Prefill: admitted prompts computed into key/value buffers of their own, whole or in chunks, after
the longest prefix the prefix cache holds.

Each distinct context being prefilled is a :class:`PrefillState` (the ``n`` rows of one request share
it): its tokens, a ``[layers, 2, Hkv, L, D]`` buffer and how many of its leading columns are computed.
Every engine step :meth:`Prefiller.plan` takes tokens from the states, oldest first, up to the step's
token budget; a state whose last token is computed leaves with its next-token logits and joins the
running batch. A prompt longer than the budget is thus prefilled over several steps (chunked prefill),
and the batch decodes between its chunks.

Two ways to compute:
  * the fast step (:mod:`async_llm.engine.fast_decode`): every chunk of the step packed along one token
    axis, after whatever its buffer holds;
  * the transformers forward (:mod:`async_llm.engine.transformers_prefill`): prompts computed
    whole from nothing are padded or packed together as :func:`prefill_groups` finds cheapest; a
    chunk after a prefix runs alone, with the prefix passed as the model's cache. Models where that
    does not give the logits of a whole prefill (checked at start-up) are prefilled whole and keep
    no prefix cache.

How many tokens a step takes is :class:`~async_llm.engine.scheduler.ChunkBudget`'s call.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from async_llm.engine.fast_decode import Chunk, FastDecoder, Rows
from async_llm.engine.model_api import PROBE_PROMPTS, input_device, probe_batch
from async_llm.engine.prefix_cache import PrefixCache, PrefixHit
from async_llm.engine.request import Request
from async_llm.engine.scheduler import prefill_groups
from async_llm.engine.start_checks import remembered
from async_llm.engine.transformers_prefill import forward_packed, forward_padded, forward_resume, sliding
from async_llm.log import get_logger

log = get_logger("async_llm.engine.prefill")

#: Prompts admitted together are prefilled in several forwards only when that saves at least this
#: share of the compute of one (see :func:`prefill_groups`).
PREFILL_MIN_SAVING = 0.25


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
class Work:
    """One forward: ``(state, tokens to compute)`` pairs, and how the transformers forward runs them
    (``"fast"``, ``"padded"``, ``"packed"`` or ``"resume"``: one chunk after its prefix)."""

    items: list[tuple[PrefillState, int]]
    mode: str
    decode_logits: torch.Tensor | None = field(default=None, repr=False)  # [B, V] of a step with decode rows

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
        model: The causal LM.
        cache_kwarg: The keyword its forward takes a cache by.
        pad_token_id: Padding id of padded prefills.
        overhead_tokens, pair_cost: The prefill cost model (see :func:`prefill_groups`).
        prefix_cache: Blocks of earlier prompts to reuse, or None.
    """

    def __init__(
        self,
        model: Any,
        cache_kwarg: str,
        pad_token_id: int,
        overhead_tokens: float,
        pair_cost: float,
        prefix_cache: PrefixCache | None,
    ) -> None:
        self.model = model
        self.cache_kwarg = cache_kwarg
        self.pad_token_id = pad_token_id
        self.overhead_tokens = overhead_tokens
        self.pair_cost = pair_cost
        self.prefix_cache = prefix_cache
        self.states: list[PrefillState] = []
        self.fast: FastDecoder | None = None
        self.can_pack = False  # transformers prefills may pack prompts (checked by prepare)
        self.can_resume = False  # a prefill may continue after a prefix (checked by prepare)
        self.computed_tokens = 0  # prompt tokens run through the model (not taken from the cache)

    # -- start-up checks (engine thread) ----------------------------------------------------------------
    def prepare(self, fast: FastDecoder | None) -> None:
        """Decide, on the model itself, what the transformers prefill may do; use ``fast`` when given
        (its own check covers prefills after a prefix)."""
        self.fast = fast
        context = {"pad_token_id": str(self.pad_token_id), "cache_kwarg": self.cache_kwarg}
        self.can_pack = remembered(
            self.model, "packed_prefill", context, self._packing_agrees, valid=lambda v: isinstance(v, bool)
        )
        if fast is not None:
            self.can_resume = True
            return
        why = (
            "sliding-window attention layers"
            if sliding(self.model)
            else remembered(
                self.model,
                "prefill_resume",
                context,
                self._resume_disagrees,
                valid=lambda v: v is None or isinstance(v, str),
            )  # fmt: skip
        )
        self.can_resume = why is None
        if why is not None:
            log.info("prefix cache and chunked prefill off for this model; prompts prefill whole", reason=why)

    def _packing_agrees(self) -> bool:
        """A packed prefill of two short prompts gives this model's padded logits. An architecture
        that does not honour a custom 4-D mask, or derives something else from the 2-D one (ALiBi
        biases, for one), would not; it then keeps padded prefills only."""
        if getattr(self.model.config, "_attn_implementation", None) != "sdpa" or sliding(self.model):
            return False
        ids, mask = probe_batch(self.pad_token_id, input_device(self.model))
        try:
            with torch.inference_mode():
                padded, _ = forward_padded(self.model, self.cache_kwarg, ids, mask)
                packed, _ = forward_packed(self.model, self.cache_kwarg, [list(p) for p in PROBE_PROMPTS], ids.shape[1])
        except torch.OutOfMemoryError:
            raise  # not a property of the architecture: the model does not fit, say so
        except Exception as exc:  # noqa: BLE001  # whatever the model rejects, padded prefills remain
            log.info("packed prefill unavailable", error=repr(exc))
            return False
        agrees = bool((padded - packed).abs().max() <= 0.02 * padded.abs().max())
        if not agrees:
            log.info("packed prefill disagrees with padded prefill for this model; prefills stay padded")
        return agrees

    def _resume_disagrees(self) -> str | None:
        """Why a prefill that continues after a prefix (its keys and values passed as the cache) does
        not give this model's logits of the whole prompt, or None when it does."""
        tokens = list(PROBE_PROMPTS[1])
        try:
            with torch.inference_mode():
                whole = forward_resume(self.model, self.cache_kwarg, tokens, None, 0, len(tokens))[0]
                kv = forward_resume(self.model, self.cache_kwarg, tokens, None, 0, 2)[1]
                resumed = forward_resume(self.model, self.cache_kwarg, tokens, kv, 2, len(tokens) - 2)[0]
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001  # whatever the model rejects, whole prefills remain
            return f"a prefill after a prefix fails: {exc!r}"
        difference = float((whole - resumed).abs().max() / whole.abs().max().clamp(min=1e-6))
        return None if difference <= 1e-3 else f"a prefill after a prefix differs by {difference:.1e}"

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
        cache.hit_tokens += hit.tokens - state.cached
        state.done = state.cached = hit.tokens

    def drop(self, requests: Iterable[Request]) -> None:
        """Forget these requests' rows; a state no row waits for any more is freed."""
        gone = set(requests)
        for state in self.states:
            state.requests = [r for r in state.requests if r not in gone]
        self.states = [s for s in self.states if s.requests]

    def clear(self) -> None:
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

    def plan(self, budget: int, whole: int = 0) -> list[Work]:
        """The forwards of this step, states oldest first: prompts whose rest fits in ``whole``
        tokens (in all) are finished in this step; the others get chunks of ``budget`` tokens in
        all. A state that cannot be chunked is taken whole, and the first state always gets some
        work.

        ``whole`` bounds the stall a short prompt may cost running streams (one step of that many
        tokens) and spares it the slow progress of small chunks; ``budget`` paces long prompts."""
        items: list[tuple[PrefillState, int]] = []
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
        if not items:
            return []
        if self.fast is not None:
            return [Work(items, "fast")]
        fresh = [(s, n) for s, n in items if s.done == 0 and n == s.remaining]
        works = [Work([item], "resume") for item in items if item not in fresh]
        if len(fresh) == 1:
            return [Work(fresh, "padded"), *works]
        groups = prefill_groups(
            [len(s.tokens) for s, _ in fresh],
            self.overhead_tokens,
            self.pair_cost,
            self.can_pack,
            min_saving=PREFILL_MIN_SAVING,
        )
        forwards = [Work([fresh[i] for i in group], "packed" if packed else "padded") for group, packed in groups]
        return [*forwards, *works]

    def run(self, work: Work, rows: Rows | None = None) -> list[PrefillState]:
        """Compute ``work`` (with the batch's decode ``rows`` in the same forward, for the fast step:
        their logits go to ``work.decode_logits``); returns the states it completed (their
        ``logits`` set), which leave."""
        if work.mode == "fast":
            work.decode_logits = self._run_fast(work.items, rows)
        elif rows is not None:
            raise ValueError("only the fast step runs decode rows with a prefill")
        elif work.mode == "resume":
            ((state, n),) = work.items
            self._materialize(state, None)
            logits, kv = forward_resume(self.model, self.cache_kwarg, state.tokens, state.kv, state.done, n)
            if state.kv is None:
                state.kv = kv.new_empty(*kv.shape[:3], len(state.tokens), kv.shape[4])
            state.kv[:, :, :, state.done : state.done + n] = kv[:, :, :, state.done :]
            state.logits = logits[0]
        else:
            self._run_whole([s for s, _ in work.items], packed=work.mode == "packed")
        done = []
        self.computed_tokens += work.tokens
        for state, n in work.items:
            state.done += n
            state.started = True
            if state.remaining == 0:
                done.append(state)
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

    @staticmethod
    def _materialize(state: PrefillState, fast: FastDecoder | None) -> None:
        """Give ``state`` its buffer (the fast step's layout, or the cached blocks') with its cached
        prefix copied in, before its first forward."""
        if state.kv is None:
            if fast is not None:
                state.kv = fast.new_kv(len(state.tokens))
            elif state.prefix is not None:
                layers, _, heads, _, head_dim = state.prefix.blocks[0].shape
                state.kv = state.prefix.blocks[0].new_empty(layers, 2, heads, len(state.tokens), head_dim)
        if state.prefix is not None and state.kv is not None:
            state.prefix.copy_into(state.kv)
            state.prefix = None

    def _run_fast(self, items: list[tuple[PrefillState, int]], rows: Rows | None) -> torch.Tensor:
        assert self.fast is not None
        chunks = []
        for state, n in items:
            self._materialize(state, self.fast)
            assert state.kv is not None
            last = state.done + n == len(state.tokens)
            chunks.append(Chunk(state.tokens[state.done : state.done + n], state.kv, state.done, logits=last))
        decode_logits, logits = self.fast.step(rows, chunks)  # [B, V], [completed, V]
        for state, row in zip([s for (s, n), c in zip(items, chunks) if c.logits], logits):
            state.logits = row
        return decode_logits

    def _run_whole(self, states: list[PrefillState], packed: bool) -> None:
        """Transformers prefill of whole prompts, padded or packed; each state gets its columns."""
        u, p = len(states), max(len(s.tokens) for s in states)
        if packed:
            logits, kv = forward_packed(self.model, self.cache_kwarg, [s.tokens for s in states], p)
        else:
            ids = torch.full((u, p), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros(u, p, dtype=torch.long)
            for i, state in enumerate(states):  # left padding: prompts are right-aligned
                ids[i, p - len(state.tokens) :] = torch.tensor(state.tokens)
                mask[i, p - len(state.tokens) :] = 1
            device = input_device(self.model)
            logits, kv = forward_padded(self.model, self.cache_kwarg, ids.to(device), mask.to(device))
        stacked = torch.stack([torch.stack(pair, dim=1) for pair in kv])  # [layers, u, 2, H, P, D]
        for i, state in enumerate(states):
            state.kv = stacked[:, i, :, :, p - len(state.tokens) :].contiguous()
            state.logits = logits[i]
