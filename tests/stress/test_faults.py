"""Injected faults: repeated forward failures, a broken tokenizer, a consumer that never reads,
and the same LLM used from several event loops and sync code at once; on each runner (the
``runner`` fixture: the CPU default, the static runner on a CPU and on CUDA)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import anyio
import pytest

from async_llm import GenerationError, HuggingFaceLLM
from tests.stress.conftest import Runner, assert_released, scaled


@pytest.fixture
async def llm(runner: Runner) -> AsyncIterator[HuggingFaceLLM]:
    """As the suite's ``llm`` (greedy, short outputs), on this module's runner."""
    async with runner.llm(max_tokens=24) as instance:
        yield instance


async def test_forward_failing_repeatedly_fails_those_steps_only(llm, monkeypatch):
    """The model runner's forwards fail while broken (injected at the runner seam): every other
    failure before the forward runs, the rest after it ran (a device error surfaces late, once its
    prompts hold their slots and have written their keys). Each fails its rows only and frees them,
    and the engine serves on with the same outputs as before."""
    before = await llm.arun("Hello", max_tokens=8)
    state = {"failures": 0, "broken": True}

    def breakable(forward):
        def broken(*args, **kwargs):
            if state["broken"]:
                state["failures"] += 1
                if state["failures"] % 2 == 0:
                    forward(*args, **kwargs)
                raise RuntimeError("injected: device error")
            return forward(*args, **kwargs)

        return broken

    monkeypatch.setattr(llm.engine.runner, "run", breakable(llm.engine.runner.run))
    n = scaled(40, minimum=10)

    async def wave(i: int) -> str:
        await asyncio.sleep(0.02 * (i % 5))  # five waves: the failures hit several steps
        try:
            return await llm.arun("Hello", max_tokens=8)
        except GenerationError as exc:
            # Only its message is kept: see test_errors_kept_by_their_callers_hold_no_kv_memory.
            return f"GenerationError: {exc}"

    with anyio.fail_after(60):
        results = await asyncio.gather(*(wave(i) for i in range(n)))
    assert all(r == "GenerationError: generation failed: RuntimeError: injected: device error" for r in results)
    assert state["failures"] >= 3
    assert_released(llm)
    state["broken"] = False
    assert await llm.arun("Hello", max_tokens=8) == before
    assert await llm.abatch_run(["Hello"] * 4, max_tokens=8) == [before] * 4
    stats = llm.stats()
    print(f"faults: forward raised {state['failures']} times, {stats['num_failed']} requests failed, engine served on")
    assert stats["num_failed"] == n and stats["num_running"] == 0
    assert_released(llm)


@pytest.mark.parametrize("where", ["after the forward", "inside the forward"])
async def test_errors_kept_by_their_callers_hold_no_kv_memory(llm, where, monkeypatch):
    """A caller may keep its GenerationError (log it, collect it) as long as it likes: no row or
    slot of the failed step stays held, so as many kept errors as there are rows leave the engine
    serving. The fault surfaces after the forward ran (its prompt holds its buffer), or inside it
    (the runner's frames, with the prompt's buffer in their locals, are in the traceback)."""
    runner = llm.engine.runner
    run, step = runner.run, runner.decoder.step

    def late_fault(*args, **kwargs):
        run(*args, **kwargs)
        raise RuntimeError("injected: device error")

    def inner_fault(rows, chunks):
        step(rows, chunks)
        raise RuntimeError("injected: device error")

    if where == "after the forward":
        monkeypatch.setattr(runner, "run", late_fault)
    else:
        monkeypatch.setattr(runner.decoder, "step", inner_fault)
    kept = []
    with anyio.fail_after(60):
        for _ in range(llm.engine.batch.max_rows):
            with pytest.raises(GenerationError, match="injected") as info:
                await llm.arun("Hello", max_tokens=8)
            kept.append(info.value)
        monkeypatch.undo()
        assert_released(llm)
        assert await llm.arun("Hello", max_tokens=8)
    assert len(kept) == llm.engine.batch.max_rows


async def test_tokenizer_that_raises_reaches_only_its_caller(llm, monkeypatch):
    expected = await llm.arun("Hello", max_tokens=6)
    original = llm.tokenizer.apply_chat_template

    def broken(messages, **kwargs):
        if messages[-1]["content"] == "boom":
            raise RuntimeError("injected: tokenizer bug")
        return original(messages, **kwargs)

    monkeypatch.setattr(llm.tokenizer, "apply_chat_template", broken)
    good = [asyncio.ensure_future(llm.arun("Hello", max_tokens=6)) for _ in range(4)]
    with pytest.raises(RuntimeError, match="tokenizer bug"):
        await llm.arun("boom")
    assert await asyncio.gather(*good) == [expected] * 4
    assert llm.stats()["num_failed"] == 0
    assert_released(llm)


async def test_consumer_that_never_reads_does_not_stall_the_batch(llm):
    """A stream nobody reads keeps at most its own text (bounded by max_tokens) and holds no row."""
    stalled = await llm.submit("Hello", max_tokens=200, ignore_eos=True)  # never iterated
    with anyio.fail_after(60):
        others = await llm.abatch_run(["The quick brown fox"] * 6, max_tokens=100, ignore_eos=True)
        while not stalled.finished:
            await asyncio.sleep(0.01)
    assert len(others) == 6 and llm.stats()["num_running"] == 0
    # Everything it produced waits, coalesced, in its buffer; reading it later gives the whole text.
    text = "".join([d async for d in stalled])
    assert len(stalled.token_ids) == 200 and text == llm.tokenizer.decode(stalled.token_ids, skip_special_tokens=True)
    assert_released(llm)


def test_two_event_loops_and_sync_callers_at_once(runner: Runner):
    with runner.llm(max_tokens=10) as llm:
        expected = llm.run("Hello", ignore_eos=True)
        results: list[str] = []
        lock = threading.Lock()
        rounds = scaled(10, minimum=3)

        def loop_worker() -> None:
            texts = asyncio.run(llm.abatch_run(["Hello"] * rounds, ignore_eos=True))
            with lock:
                results.extend(texts)

        def sync_worker() -> None:
            for _ in range(rounds):
                text = llm.run("Hello", ignore_eos=True)
                with lock:
                    results.append(text)

        threads = [threading.Thread(target=t) for t in (loop_worker, loop_worker, sync_worker, sync_worker)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert results == [expected] * (4 * rounds)
        assert llm.stats()["peak_batch_size"] > 1
        assert_released(llm)
