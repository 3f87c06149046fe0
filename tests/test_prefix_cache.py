"""The prefix cache: blocks keyed by their whole prefix, least recently used evicted within a byte
budget; in the engine, greedy tokens identical with it on and off on the architectures that keep it,
off (saying why) where a prefill after a prefix would not be exact."""

from __future__ import annotations

import asyncio
import json
import logging

import anyio
import pytest
import torch
import transformers

from async_llm import HuggingFaceLLM
from async_llm.engine.prefix_cache import PrefixCache
from tests.conftest import PROMPTS, admitted_together, reference_ids
from tests.test_prefix_cache_architectures import BASE, CONFIGS, FOLLOW_UPS

LAYERS, HEADS, DIM = 2, 2, 4


def _kv(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(LAYERS, 2, HEADS, length, DIM, generator=torch.Generator().manual_seed(seed))


def _block_bytes(cache: PrefixCache) -> int:
    return LAYERS * 2 * HEADS * cache.block_size * DIM * 4


def test_match_gives_the_longest_cached_prefix_and_leaves_a_token_to_compute():
    cache = PrefixCache(1 << 20, block_size=4)
    tokens, kv = list(range(10)), _kv(10)
    assert cache.match(tokens).tokens == 0
    cache.insert(tokens, kv)
    assert len(cache) == 2 and cache.bytes == 2 * _block_bytes(cache)  # two full blocks of 4
    hit = cache.match(tokens)
    assert hit.tokens == 8
    out = torch.zeros(LAYERS, 2, HEADS, 10, DIM)
    hit.copy_into(out)
    assert torch.equal(out[:, :, :, :8], kv[:, :, :, :8]) and not out[:, :, :, 8:].any()
    assert cache.match(tokens[:8]).tokens == 4  # the last token must still run
    assert cache.match([*tokens[:6], 99, 98, 97, 96, 95]).tokens == 4  # diverges inside block 2
    assert cache.match([1, *tokens[1:]]).tokens == 0
    assert cache.queried_tokens == 10 + 10 + 8 + 11 + 10


def test_a_block_matches_only_after_the_same_prefix():
    cache = PrefixCache(1 << 20, block_size=4)
    cache.insert([0, 1, 2, 3, 4, 5, 6, 7, 8], _kv(9))
    assert cache.match([9, 9, 9, 9, 4, 5, 6, 7, 8]).tokens == 0  # block 2's tokens, another parent


def test_least_recently_used_blocks_go_first_within_the_budget():
    cache = PrefixCache(0, block_size=4)
    cache.capacity_bytes = 4 * _block_bytes(cache)
    a, b = list(range(13)), list(range(100, 113))  # three blocks each
    cache.insert(a, _kv(13, 1))
    cache.insert(b, _kv(13, 2))
    assert cache.bytes == 4 * _block_bytes(cache) and len(cache) == 4
    assert cache.match(b).tokens == 12  # the newest chain is whole
    assert cache.match(a).tokens == 4  # of the oldest, its first block (parents outlive children)
    cache.insert(list(range(200, 250)), _kv(50))  # a chain over the whole budget keeps its first blocks
    assert cache.bytes <= cache.capacity_bytes and cache.match(list(range(200, 250))).tokens == 16
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0 and cache.match(a).tokens == 0


def test_a_zero_budget_keeps_nothing():
    cache = PrefixCache(0, block_size=4)
    cache.insert(list(range(9)), _kv(9))
    assert len(cache) == 0 and cache.match(list(range(9))).tokens == 0


# -- in the engine ------------------------------------------------------------------------------------
def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = CONFIGS[name]()
    config.initializer_range = 0.3
    return transformers.AutoModelForCausalLM.from_config(config).eval()


async def _greedy(llm: HuggingFaceLLM, prompts: list[str], **kwargs) -> list[list[int]]:
    out = []
    for prompt in prompts:  # one at a time: each sees the blocks the earlier ones left
        result = await llm.acomplete(prompt, chat_template=False, max_tokens=12, ignore_eos=True, **kwargs)
        out.append(result.token_ids)
    return out


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("fast_path", [True, False])
async def test_greedy_tokens_are_the_same_with_the_cache_on_and_off(name, fast_path, tiny_tokenizer):
    model = _model(name)
    results, stats = {}, {}
    for cached in (True, False):
        async with HuggingFaceLLM(
            model=model, tokenizer=tiny_tokenizer, fast_path=fast_path, prefix_cache=cached, pad_token_id=0
        ) as llm:
            results[cached] = await _greedy(llm, [BASE, *FOLLOW_UPS])
            stats[cached] = llm.stats()
    assert results[True] == results[False]
    ids = tiny_tokenizer(BASE).input_ids
    assert results[True][0][: len(reference_ids(model, ids, 12))] == reference_ids(model, ids, 12)
    on, off = stats[True], stats[False]
    assert on["prefix_cache_hit_tokens"] >= 64 + 32  # BASE again (two blocks or more), half of it (one)
    assert on["prefix_cache_bytes"] > 0 and on["prefix_cache_queried_tokens"] > 0
    assert on["prefill_computed_tokens"] == off["prefill_computed_tokens"] - on["prefix_cache_hit_tokens"]
    assert off["prefix_cache_hit_tokens"] == off["prefix_cache_bytes"] == 0


async def test_a_sliding_window_model_turns_the_cache_off_and_says_why(tiny_tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="async_llm")
    model = _model("gemma2 (sliding window)")
    async with HuggingFaceLLM(model=model, tokenizer=tiny_tokenizer, pad_token_id=0) as llm:
        got = await _greedy(llm, [BASE, BASE])
        assert llm.engine.prefix_cache is None and llm.stats()["prefix_cache_hit_tokens"] == 0
    assert got[0] == got[1]
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name.startswith("async_llm")]
    off = [e for e in events if e["event"].startswith("prefix cache and chunked prefill off")]
    assert len(off) == 1 and "sliding" in off[0]["reason"]


async def test_a_conversation_reuses_the_previous_turn_and_its_answer(llm, tiny_tokenizer):
    """The next turn resends the prompt and the answer: both come from the cache."""
    first = await llm.acomplete(BASE, chat_template=False, max_tokens=40, ignore_eos=True)
    before = llm.stats()["prefix_cache_hit_tokens"]
    turn = first.prompt_token_ids + first.token_ids + tiny_tokenizer(" And then?").input_ids
    second = await llm.acomplete(tiny_tokenizer.decode(turn), chat_template=False, max_tokens=8, ignore_eos=True)
    reused = llm.stats()["prefix_cache_hit_tokens"] - before
    common = 0
    for a, b in zip(second.prompt_token_ids, first.prompt_token_ids + first.token_ids[:-1]):
        if a != b:
            break
        common += 1
    assert reused == common // 32 * 32 and reused > len(first.prompt_token_ids)  # the answer's blocks too
    # Each request reports its own share, as OpenAI's usage.prompt_tokens_details.cached_tokens does.
    assert first.usage.cached_tokens == 0 and second.usage.cached_tokens == reused
    assert second.token_ids == reference_ids(llm.model, second.prompt_token_ids, 8)[: len(second.token_ids)]


async def test_n_rows_penalties_and_seeds_are_the_same_with_the_cache(tiny_model, tiny_tokenizer):
    kwargs = dict(chat_template=False, max_tokens=10, ignore_eos=True, n=2, repetition_penalty=1.3)
    results = {}
    for cached in (True, False):
        async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, prefix_cache=cached) as llm:
            await llm.acomplete(BASE, chat_template=False, max_tokens=4)
            greedy = await llm.acomplete(BASE + " Why?", **kwargs)
            sampled = await llm.acomplete(BASE + " Why?", **kwargs, temperature=0.8, seed=7)
            results[cached] = ([c.token_ids for c in greedy], [c.token_ids for c in sampled])
            assert (llm.stats()["prefix_cache_hit_tokens"] > 0) is cached
    assert results[True] == results[False]


async def test_concurrent_prompts_behind_one_prefix_compute_it_once(llm):
    """Admitted together, prompts that share a long prefix wait for the first to compute it and take
    it from the cache: the prompt tokens computed are one copy of the shared blocks and every rest."""
    system = "You are a helpful assistant. Answer briefly and precisely. " * 5
    prompts = [system + f"Question {i}: what is {i} plus {i}?" for i in range(6)]
    computed0 = llm.stats()["prefill_computed_tokens"]
    together = await admitted_together(
        llm, [lambda p=p: llm.acomplete(p, chat_template=False, max_tokens=6, ignore_eos=True) for p in prompts]
    )
    computed = llm.stats()["prefill_computed_tokens"] - computed0
    ids = [r.prompt_token_ids for r in together]
    common = next(i for i in range(len(ids[0])) if len({tuple(x[: i + 1]) for x in ids}) > 1)
    shared = common // 32 * 32
    assert shared >= 64
    assert computed == shared + sum(len(x) - shared for x in ids)
    for r in together:
        assert r.token_ids == reference_ids(llm.model, r.prompt_token_ids, 6)[: len(r.token_ids)]
    assert llm.stats()["num_failed"] == 0


async def test_a_cache_smaller_than_the_prompts_evicts_and_stays_exact(tiny_model, tiny_tokenizer):
    results = {}
    for budget in (20_000, None):  # about one 32-token block of the tiny model, and the default
        async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, prefix_cache_bytes=budget) as llm:
            results[budget] = await _greedy(llm, [BASE, *FOLLOW_UPS, BASE])
            stats = llm.stats()
            if budget is not None:
                assert 0 < stats["prefix_cache_bytes"] <= budget and stats["num_failed"] == 0
    assert results[20_000] == results[None]


def test_waiting_prompts_share_a_chunk_budget_oldest_first():
    """The planner's budget goes to the oldest prompts first; a prompt that does not fit gets a chunk."""
    from async_llm.engine.prefill import Prefiller, PrefillState

    prefiller = Prefiller(prefix_cache=None)
    prefiller.can_resume = True  # as with the fast runner
    first, second, third = (PrefillState([], list(range(n))) for n in (6, 8, 5))
    prefiller.states = [first, second, third]
    assert prefiller.take(10) == [(first, 6), (second, 4)]
    prefiller.can_resume = False  # a model that cannot continue a prefill: whole prompts, at least one
    assert prefiller.take(3) == [(first, 6)]


class _NoRoom(torch.Tensor):
    """Keys and values whose copy finds no device memory."""

    def clone(self, *args, **kwargs):
        raise torch.OutOfMemoryError("injected")


def test_a_block_with_no_memory_for_its_copy_ends_the_chain_there():
    cache = PrefixCache(1 << 20, block_size=4)
    tokens = list(range(12))
    cache.insert(tokens, _kv(12).as_subclass(_NoRoom))
    assert cache.bytes == 0 and len(cache) == 0 and cache.match(tokens).tokens == 0
    cache.insert(tokens, _kv(12))  # room again: kept as usual
    assert cache.match(tokens).tokens == 8


@pytest.mark.parametrize("runner", ["fast", "static"])
async def test_no_memory_to_keep_blocks_fails_no_request(runner, tiny_model, tiny_tokenizer, monkeypatch):
    """Keeping blocks is an optimisation: with no device memory for their copies, the rows still
    end with all their tokens, nothing fails, and no row is left behind."""
    import gc

    insert = PrefixCache.insert
    monkeypatch.setattr(PrefixCache, "insert", lambda self, tokens, kv: insert(self, tokens, kv.as_subclass(_NoRoom)))
    options = {"max_model_len": 256, "max_batch_size": 4} if runner == "static" else {}
    async with HuggingFaceLLM(
        model=tiny_model, tokenizer=tiny_tokenizer, device="cpu", runner=runner, prefix_cache=True, **options
    ) as llm:
        calls = [
            llm.acomplete(p, max_tokens=6 + i, ignore_eos=True, chat_template=False) for i, p in enumerate(PROMPTS)
        ]
        with anyio.fail_after(60):
            results = await asyncio.gather(*calls)
        assert [len(r.token_ids) for r in results] == [6 + i for i in range(len(PROMPTS))]
        assert llm.stats()["num_failed"] == 0 and llm.engine.prefix_cache.bytes == 0
        gc.collect()
        assert not llm.engine.batch.holds_rows()
