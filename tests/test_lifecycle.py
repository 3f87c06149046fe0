"""Cancellation, queue bounds, injected failures, closing, and the sync wrappers."""

from __future__ import annotations

import asyncio
import threading

import anyio
import pytest
import torch

from async_llm import EngineClosedError, GenerationError, HuggingFaceLLM, QueueFullError
from tests.conftest import limit_device_rows

LONG = dict(max_tokens=400, ignore_eos=True)


async def wait_for(predicate, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_breaking_out_of_async_for_aborts_and_frees_the_row(llm):
    async for _ in llm.astream("Hello", **LONG):
        break
    await wait_for(lambda: llm.stats()["num_aborted"] == 1)
    stats = llm.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert stats["tokens_generated"] < 400


async def test_closing_the_stream_aborts(llm):
    stream = llm.astream("Hello", **LONG)
    await stream.__anext__()
    await stream.aclose()
    await wait_for(lambda: llm.stats()["num_aborted"] == 1 and llm.stats()["num_running"] == 0)


async def test_cancelling_the_task_aborts_and_others_continue(llm):
    keep = asyncio.ensure_future(
        llm.acomplete("The quick brown fox", chat_template=False, max_tokens=40, ignore_eos=True)
    )
    doomed = asyncio.ensure_future(llm.arun("Hello", **LONG))
    await wait_for(lambda: llm.stats()["num_running"] == 2)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    result = await keep
    assert len(result.token_ids) == 40
    await wait_for(lambda: llm.stats()["num_running"] == 0)
    assert llm.stats()["num_aborted"] == 1 and llm.stats()["num_finished"] == 1


async def test_cancel_while_waiting_for_a_row(tiny_model, tiny_tokenizer):
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, max_batch_size=1) as llm:
        # The first request holds the only row for long enough that the second surely waits.
        first = asyncio.ensure_future(llm.arun("Hello", max_tokens=900, ignore_eos=True))
        await wait_for(lambda: llm.stats()["num_running"] == 1)
        second = asyncio.ensure_future(llm.arun("Hello", max_tokens=60, ignore_eos=True))
        await wait_for(lambda: llm.stats()["num_waiting"] == 1)
        second.cancel()
        await wait_for(lambda: llm.stats()["num_aborted"] == 1)
        assert llm.stats()["num_waiting"] == 0 and llm.stats()["num_running"] == 1
        first.cancel()
        await wait_for(lambda: llm.stats()["num_aborted"] == 2 and llm.stats()["num_running"] == 0)
        assert llm.stats()["peak_batch_size"] == 1


async def test_full_queue_raises_at_once_and_accepted_requests_finish(tiny_model, tiny_tokenizer):
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, max_batch_size=1, max_queue_size=2) as llm:
        tasks = [asyncio.ensure_future(llm.arun("Hello", max_tokens=20, ignore_eos=True)) for _ in range(8)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        rejected = [r for r in results if isinstance(r, QueueFullError)]
        served = [r for r in results if isinstance(r, str)]
        assert rejected and served and len(rejected) + len(served) == 8
        assert "queue is full" in str(rejected[0])
        assert llm.stats()["num_finished"] == len(served)


async def test_a_token_bound_sheds_load_by_cost_and_refuses_what_could_never_queue(tiny_model, tiny_tokenizer):
    """``max_queue_tokens`` counts prompt + max_tokens of the waiting requests: a long request is
    refused where a short one still fits, and a request bigger than the whole bound never queues."""
    from async_llm import InvalidParameterError

    prompt_tokens = len(tiny_tokenizer("Hello").input_ids)
    long_cost = prompt_tokens + 40
    bound = 2 * long_cost - 1  # one long request waits; a second does not fit beside it
    async with HuggingFaceLLM(
        model=tiny_model, tokenizer=tiny_tokenizer, max_batch_size=1, max_queue_tokens=bound
    ) as llm:
        kwargs = dict(chat_template=False, ignore_eos=True)
        running = await llm.submit("Hello", max_tokens=40, **kwargs)
        await wait_for(lambda: llm.stats()["num_running"] == 1)
        waiting = await llm.submit("Hello", max_tokens=40, **kwargs)
        with pytest.raises(QueueFullError, match="max_queue_tokens"):
            await llm.submit("Hello", max_tokens=40, **kwargs)
        short = await llm.submit("Hello", max_tokens=long_cost - 2 * prompt_tokens - 1, **kwargs)  # still fits
        with pytest.raises(InvalidParameterError, match="max_queue_tokens") as refused:
            await llm.submit("Hello", max_tokens=bound, **kwargs)
        assert refused.value.param == "max_tokens"
        for stream in (running, waiting, short):
            assert [delta async for delta in stream]
        assert llm.stats()["num_finished"] == 3 and llm.stats()["num_waiting"] == 0
        # The tokens of requests that left the queue are free again.
        assert len((await llm.acomplete("Hello", max_tokens=40, **kwargs)).token_ids) == 40


async def test_forward_error_fails_only_that_step_and_engine_keeps_serving(llm, monkeypatch):
    await _forward_error_fails_only_that_step(llm, monkeypatch)


async def test_transformers_forward_error_fails_only_that_step_and_engine_keeps_serving(plain_llm, monkeypatch):
    await _forward_error_fails_only_that_step(plain_llm, monkeypatch)


async def _forward_error_fails_only_that_step(llm, monkeypatch):
    """A fault injected at the runner seam (its third forward, a decode step) fails the request it
    ran, with either runner; the engine keeps serving."""
    original = llm.engine.runner.run
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected fault")
        return original(*args, **kwargs)

    monkeypatch.setattr(llm.engine.runner, "run", flaky)
    with pytest.raises(GenerationError, match="injected fault"):
        await llm.arun("Hello", **LONG)
    monkeypatch.setattr(llm.engine.runner, "run", original)
    assert llm.stats()["num_failed"] == 1 and llm.stats()["num_running"] == 0
    assert await llm.arun("Hello", max_tokens=5)


async def test_close_fails_pending_requests_and_leaves_no_thread(tiny_model, tiny_tokenizer):
    llm = HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, max_batch_size=1)
    running = asyncio.ensure_future(llm.arun("Hello", **LONG))
    waiting = asyncio.ensure_future(llm.arun("Hello", **LONG))
    await wait_for(lambda: llm.stats()["num_running"] == 1 and llm.stats()["num_waiting"] == 1)
    assert not llm.closed
    await llm.aclose()
    assert llm.closed
    for task in (running, waiting):
        with pytest.raises(EngineClosedError):
            await task
    assert not any(t.name == "async-llm-engine" and t.is_alive() for t in threading.enumerate())
    await llm.aclose()  # harmless twice
    with pytest.raises(EngineClosedError):
        await llm.arun("Hello")


def test_sync_wrappers_without_a_loop(tiny_model, tiny_tokenizer):
    with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, max_tokens=8) as llm:
        text = llm.run("Hello")
        assert text == llm("Hello")
        assert llm.batch_run(["Hello", "日本語 🎉"]) == [text, llm.run("日本語 🎉")]


async def test_sync_wrappers_inside_a_running_loop(llm):
    expected = await llm.arun("Hello", max_tokens=8)
    # Called from a coroutine, like a Jupyter cell: no nested asyncio.run, no deadlock. The calls
    # block this loop, so no anyio deadline can fire here: pytest-timeout is the backstop.
    assert llm.run("Hello", max_tokens=8) == expected
    assert llm.batch_run(["Hello"], max_tokens=8) == [expected]


def test_two_threads_with_their_own_loops_share_one_llm(tiny_model, tiny_tokenizer):
    with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, max_tokens=12) as llm:
        expected = llm.run("Hello")
        results: list[str] = []

        def worker() -> None:
            results.extend(asyncio.run(llm.abatch_run(["Hello"] * 3)))

        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [expected] * 6


async def test_structured_logs_carry_request_ids(llm, caplog):
    import json
    import logging

    caplog.set_level(logging.INFO, logger="async_llm")
    completion = await llm.acomplete("Hello", max_tokens=3)
    async for _ in llm.astream("Hello", **LONG):
        break
    await wait_for(lambda: llm.stats()["num_aborted"] == 1)
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name.startswith("async_llm")]
    by_event: dict[str, list[dict]] = {}
    for e in events:
        by_event.setdefault(e["event"], []).append(e)
    assert {"admitted", "finished", "aborted"} <= set(by_event)
    assert all(len(e["request_id"]) == 16 for name in ("admitted", "finished", "aborted") for e in by_event[name])
    assert by_event["finished"][0]["tokens"] == len(completion.token_ids)


def test_interpreter_exits_with_an_open_llm(tmp_path):
    """A script that used the sync API and never closed the LLM still exits promptly."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "script.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from conftest import build_model, build_tokenizer\n"
        "from async_llm import HuggingFaceLLM\n"
        "tok = build_tokenizer()\n"
        "llm = HuggingFaceLLM(model=build_model(len(tok)), tokenizer=tok, max_tokens=5)\n"
        "print(len(llm.run('Hello')) >= 0)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


async def test_fault_outside_a_model_step_fails_live_requests_and_engine_survives(llm, monkeypatch):
    original = llm.engine.scheduler.admit
    calls = {"n": 0}

    def broken_admit():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("scheduler bug")
        return original()

    monkeypatch.setattr(llm.engine.scheduler, "admit", broken_admit)
    with anyio.fail_after(10):
        with pytest.raises(GenerationError, match="scheduler bug"):
            await llm.arun("Hello", max_tokens=5)
        assert await llm.arun("Hello", max_tokens=5)
    assert llm.engine._thread.is_alive()


async def test_tokenizer_fault_fails_only_that_step(llm, monkeypatch):
    from async_llm.engine.detokenizer import Detokenizer

    original = Detokenizer.add_token
    state = {"armed": True}

    def flaky(self, token_id):
        if state["armed"]:
            state["armed"] = False
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return original(self, token_id)

    monkeypatch.setattr(Detokenizer, "add_token", flaky)
    with anyio.fail_after(10):
        with pytest.raises(GenerationError, match="injected"):
            await llm.arun("Hello", max_tokens=5)
        assert await llm.arun("Hello", max_tokens=5)


async def test_broken_streamer_does_not_fail_the_request(llm):
    class Broken:
        def put(self, value):
            if value.ndim == 1:  # generated tokens (the prompt comes as [1, P])
                raise RuntimeError("consumer bug")

        def end(self):
            raise AssertionError("never reached: the streamer was dropped")

    expected = await llm.arun("Hello", max_tokens=6)
    assert await llm.arun("Hello", max_tokens=6, streamer=Broken()) == expected


async def test_aborting_a_middle_row_keeps_the_other_rows_exact(llm, tiny_model):
    """Abort the first of three running rows: the last row moves into its slot and stays exact."""
    from conftest import reference_ids

    tasks = [
        asyncio.ensure_future(llm.acomplete(p, chat_template=False, max_tokens=50, ignore_eos=True))
        for p in ("Hello", "The quick brown fox", "日本語 🎉")
    ]
    await wait_for(lambda: llm.stats()["num_running"] == 3)
    tasks[0].cancel()
    with anyio.fail_after(30):
        survivors = await asyncio.gather(*tasks[1:])
    for result in survivors:
        assert result.token_ids == reference_ids(tiny_model, result.prompt_token_ids, 50)
    assert llm.stats()["num_aborted"] == 1 and llm.stats()["num_failed"] == 0


async def test_out_of_memory_splits_the_batch_and_every_request_still_finishes_exactly(
    plain_llm, tiny_model, monkeypatch
):
    """A KV-cache OOM preempts the newest half of the rows; they resume by recomputing their cache."""

    ooms = limit_device_rows(plain_llm, monkeypatch)
    prompts = ["Hello", "The quick brown fox", "日本語 🎉", "def hello(name):", "What is the capital of France?"]
    with anyio.fail_after(60):
        results = await asyncio.gather(
            *(
                plain_llm.acomplete(p, chat_template=False, max_tokens=25, ignore_eos=True, repetition_penalty=1.3)
                for p in prompts
            )
        )
    assert ooms["n"] > 0 and plain_llm.engine.scheduler.num_preempted > 0
    for result in results:
        ids = torch.tensor([result.prompt_token_ids])
        expected = tiny_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=25,
            min_new_tokens=25,
            do_sample=False,
            repetition_penalty=1.3,
            pad_token_id=0,
        )[0, ids.shape[1] :].tolist()
        assert result.token_ids == expected
    stats = plain_llm.stats()
    assert stats["num_failed"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0


async def _out_of_memory_fails_only_that_request(llm, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("injected")

    with monkeypatch.context() as patch:
        patch.setattr(llm.engine.runner, "run", no_memory)
        with pytest.raises(GenerationError, match="OutOfMemoryError"):
            await llm.arun("Hello", max_tokens=5)
    assert await llm.arun("Hello", max_tokens=5)


async def test_out_of_memory_on_a_single_row_fails_only_that_request(llm, monkeypatch):
    await _out_of_memory_fails_only_that_request(llm, monkeypatch)


async def test_out_of_memory_in_a_transformers_prefill_fails_only_that_request(plain_llm, monkeypatch):
    await _out_of_memory_fails_only_that_request(plain_llm, monkeypatch)


async def test_idle_engine_releases_its_kv_buffers(llm):
    await llm.abatch_run(["Hello"] * 4, max_tokens=20)
    assert llm.engine.batch.kv is None and llm.engine.batch.mask.numel() == 0


async def test_every_token_is_timed_when_it_reaches_the_stream(llm):
    """token_times has one arrival time per token, text or not, in order."""
    stream = await llm.submit("Hello", chat_template=False, max_tokens=20, ignore_eos=True)
    async with stream:
        texts = [delta async for delta in stream]
    assert len(stream.token_times) == len(stream.token_ids) == 20
    assert stream.token_times == sorted(stream.token_times)
    assert stream.created_at <= stream.token_times[0] == stream.first_token_at
    assert stream.token_times[-1] <= stream.finished_at
    assert texts  # text deltas still come as before
