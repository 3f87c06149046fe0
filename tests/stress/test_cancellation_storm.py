"""1,000 requests, half of them cancelled at random points: nothing leaks, survivors stay exact; on
each runner (the ``runner`` fixture: the CPU default, the static runner on a CPU and on CUDA)."""

from __future__ import annotations

import asyncio
import gc
import random
import threading

import anyio
import psutil

from async_llm import HuggingFaceLLM
from tests.stress.conftest import Runner, assert_released, scaled

PROMPTS = [
    "Hello",
    "The quick brown fox",
    "日本語 🎉",
    "def hello(name):",
    "What is the capital of France?",
    "a b c d e f",
]
WAYS = ["before_admission", "during_prefill", "mid_decode", "break_loop", "cancel_task", "close_stream"]
LENGTHS = [4, 9, 16]


def _draw(rng: random.Random) -> tuple[str, int, str | None]:
    """One request of a storm: (prompt, max_tokens, how it is cancelled: None for half of them)."""
    return rng.choice(PROMPTS), rng.choice(LENGTHS), rng.choice(WAYS) if rng.random() < 0.5 else None


async def _settled(llm: HuggingFaceLLM) -> None:
    """Wait until every request the engine accepted has ended."""
    while llm.stats()["num_running"] or llm.stats()["num_waiting"]:
        await asyncio.sleep(0.01)


async def _one(
    llm: HuggingFaceLLM, prompt: str, tokens: int, way: str | None, rng: random.Random
) -> tuple[str, str | None]:
    """Run one request; cancel it the given way. Returns (how it ended, text if it completed)."""
    params = dict(max_tokens=tokens, ignore_eos=True)
    if way is None:
        return "done", await llm.arun(prompt, **params)
    if way in ("before_admission", "during_prefill", "cancel_task"):
        task = asyncio.ensure_future(llm.arun(prompt, **params))
        delay = {"before_admission": 0, "during_prefill": 0.001, "cancel_task": rng.uniform(0.002, 0.05)}[way]
        await asyncio.sleep(delay)
        task.cancel()
        try:
            return "done", await task  # it may have finished before the cancel landed
        except asyncio.CancelledError:
            return "cancelled", None
    stream = await llm.submit(prompt, **params)
    parts = []
    stop_after = rng.randint(1, 3)
    async for delta in stream:
        parts.append(delta)
        if len(parts) >= stop_after:
            if way == "close_stream":
                await stream.aclose()
            break  # "mid_decode" and "break_loop": leave the loop, then close as a caller would
    await stream.aclose()
    return (
        ("done", "".join(parts))
        if stream.finish_reason and stream.finish_reason.value != "abort"
        else ("cancelled", None)
    )


async def test_cancellation_storm(runner: Runner):
    rng = random.Random(1234)
    total = scaled(1000, minimum=60)
    process = psutil.Process()
    engine_threads = {t for t in threading.enumerate() if t.name.startswith("async-llm")}
    async with runner.llm(max_batch_size=32, max_queue_size=total) as llm:
        solo = {(p, n): await llm.arun(p, max_tokens=n, ignore_eos=True) for p in PROMPTS for n in LENGTHS}
        # Warm-up: a full batch, then a small storm, so that what a first run allocates once (the
        # largest batch's buffers, kernels for each shape, the cancellation paths) is in the baseline.
        await llm.abatch_run(PROMPTS * 6, max_tokens=16, ignore_eos=True)
        warm = random.Random(4321)
        with anyio.fail_after(120):
            await asyncio.gather(*(_one(llm, *_draw(warm), warm) for _ in range(48)))
            await _settled(llm)
        gc.collect()
        rss_before = process.memory_info().rss
        base = llm.stats()
        submitted = 0
        engine_submit = llm.engine.submit

        def counting_submit(request):
            nonlocal submitted
            engine_submit(request)
            submitted += 1

        llm.engine.submit = counting_submit
        plan = [_draw(rng) for _ in range(total)]
        with anyio.fail_after(600):
            outcomes = await asyncio.gather(*(_one(llm, p, n, way, rng) for p, n, way in plan))
            await _settled(llm)
        stats = llm.stats()
        cancelled = sum(1 for how, _ in outcomes if how == "cancelled")
        for (prompt, tokens, way), (how, text) in zip(plan, outcomes):
            if how == "done" and way is None:
                assert text == solo[(prompt, tokens)]  # survivors are exactly their solo greedy text
            elif how == "done":  # cut short by the consumer: a prefix of the solo text
                assert solo[(prompt, tokens)].startswith(text)
        assert stats["num_running"] == 0 and stats["num_waiting"] == 0
        assert stats["num_failed"] == 0
        # Nothing lost: every request the engine accepted ended, finished or aborted.
        ended = sum(stats[k] - base[k] for k in ("num_finished", "num_aborted", "num_failed"))
        assert ended == submitted and stats["num_aborted"] - base["num_aborted"] <= cancelled
        assert_released(llm)  # idle: the KV buffers (the static store's slots) are released
        growth = process.memory_info().rss - rss_before
        print(
            f"storm: {total} requests, {submitted} reached the engine, {cancelled} cancelled "
            f"({stats['num_aborted'] - base['num_aborted']} aborted in the engine), RSS growth {growth / 2**20:.1f} MiB"
        )
        assert growth < 64 * 2**20
    assert {t for t in threading.enumerate() if t.name.startswith("async-llm") and t.is_alive()} <= engine_threads
