"""Injected faults: repeated forward failures, a broken tokenizer, a consumer that never reads,
and the same LLM used from several event loops and sync code at once."""

from __future__ import annotations

import asyncio
import threading

import anyio
import pytest

from async_llm import GenerationError, HuggingFaceLLM
from tests.stress.conftest import scaled


async def test_forward_failing_repeatedly_fails_those_steps_only(llm, monkeypatch):
    """The model runner's forwards fail while broken (injected at the runner seam)."""
    state = {"failures": 0, "broken": True}

    def breakable(forward):
        def broken(*args, **kwargs):
            if state["broken"]:
                state["failures"] += 1
                raise RuntimeError("injected: device error")
            return forward(*args, **kwargs)

        return broken

    monkeypatch.setattr(llm.engine.runner, "run", breakable(llm.engine.runner.run))
    n = scaled(40, minimum=10)

    async def wave(i: int):
        await asyncio.sleep(0.02 * (i % 5))  # five waves: the failures hit several steps
        return await llm.arun("Hello", max_tokens=8)

    with anyio.fail_after(60):
        results = await asyncio.gather(*(wave(i) for i in range(n)), return_exceptions=True)
    assert all(isinstance(r, GenerationError) for r in results) and state["failures"] >= 3
    state["broken"] = False
    expected = await llm.arun("Hello", max_tokens=8)
    assert await llm.abatch_run(["Hello"] * 4, max_tokens=8) == [expected] * 4
    stats = llm.stats()
    print(f"faults: forward raised {state['failures']} times, {stats['num_failed']} requests failed, engine served on")
    assert stats["num_failed"] == n and stats["num_running"] == 0


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


def test_two_event_loops_and_sync_callers_at_once(tiny_model, tiny_tokenizer):
    with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, max_tokens=10) as llm:
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
