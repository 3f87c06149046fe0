"""10,000 requests (at ``STRESS_SCALE=1``) with random priorities on a few rows, a tiny prefix-cache
budget and random cancels: requests are preempted and resumed over and over, and nothing leaks (no
row, no cache bytes past the budget, no task), nothing is lost, and every request that ran to its
end produced exactly the tokens it produces alone."""

from __future__ import annotations

import asyncio
import random

import anyio

from async_llm import HuggingFaceLLM
from async_llm.engine.scheduler import MAX_PREEMPTIONS
from tests.stress.conftest import assert_released, scaled

PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog", "def add(a, b):", "a b c d e f g"]
LENGTHS = [3, 8, 20]
CACHE_BYTES = 64 * 1024  # a few blocks of the tiny model: most preempted rows recompute


async def _one(llm: HuggingFaceLLM, rng: random.Random, slots: asyncio.Semaphore) -> tuple[str, str, int, str]:
    prompt, tokens = rng.choice(PROMPTS), rng.choice(LENGTHS)
    priority, cancel = rng.randint(-3, 3), rng.random() < 0.2
    async with slots:
        task = asyncio.ensure_future(
            llm.arun(prompt, max_tokens=tokens, ignore_eos=True, chat_template=False, priority=priority)
        )
        if cancel:
            await asyncio.sleep(rng.uniform(0, 0.02))
            task.cancel()
        try:
            return "done", prompt, tokens, await task
        except asyncio.CancelledError:
            return "cancelled", prompt, tokens, ""


async def test_priority_storm_preempts_resumes_and_leaks_nothing(tiny_model, tiny_tokenizer):
    total = scaled(10_000, minimum=300)
    rng = random.Random(2024)
    async with HuggingFaceLLM(
        model=tiny_model,
        tokenizer=tiny_tokenizer,
        device="cpu",
        pad_token_id=0,
        max_batch_size=3,
        scheduling_policy="priority",
        prefix_cache_bytes=CACHE_BYTES,
    ) as llm:
        solo = {
            (p, n): await llm.arun(p, max_tokens=n, ignore_eos=True, chat_template=False)
            for p in PROMPTS
            for n in LENGTHS
        }
        tasks_before = len(asyncio.all_tasks())
        slots = asyncio.Semaphore(48)  # requests in flight at once: always more than the rows
        with anyio.fail_after(1200):
            outcomes = await asyncio.gather(*(_one(llm, rng, slots) for _ in range(total)))
            while llm.stats()["num_running"] or llm.stats()["num_waiting"]:
                await asyncio.sleep(0.01)
        stats = llm.stats()
        done = [(p, n, text) for how, p, n, text in outcomes if how == "done"]
        for prompt, tokens, text in done:
            assert text == solo[(prompt, tokens)]  # preempted or not, exactly its solo greedy text
        assert stats["num_preempted"] > total // 20, stats["num_preempted"]
        assert stats["num_failed"] == 0
        assert stats["prefix_cache_bytes"] <= CACHE_BYTES
        assert_released(llm)
        assert len(asyncio.all_tasks()) <= tasks_before
        print(
            f"priority storm: {total} requests, {len(done)} completed, {stats['num_preempted']} preemptions "
            f"(at most {MAX_PREEMPTIONS} each), {stats['num_aborted']} aborted"
        )
