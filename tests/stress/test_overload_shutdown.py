"""Overload (10x the queue at once) and shutdown with requests waiting and running."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import textwrap
import threading
import time

import anyio
import psutil
import pytest

from async_llm import EngineClosedError, HuggingFaceLLM, QueueFullError
from tests.stress.conftest import scaled


async def test_ten_times_the_queue_at_once(tiny_model, tiny_tokenizer):
    queue = scaled(100, minimum=20)
    async with HuggingFaceLLM(
        model=tiny_model, tokenizer=tiny_tokenizer, max_batch_size=16, max_queue_size=queue
    ) as llm:
        expected = await llm.arun("Hello", max_tokens=8, ignore_eos=True)
        gc.collect()
        rss_before = psutil.Process().memory_info().rss

        async def timed():
            start = time.perf_counter()
            try:
                return await llm.arun("Hello", max_tokens=8, ignore_eos=True), time.perf_counter() - start
            except QueueFullError as exc:
                return exc, time.perf_counter() - start

        for _ in range(2):  # twice: memory must not grow from one overload to the next
            with anyio.fail_after(300):
                results = await asyncio.gather(*(timed() for _ in range(10 * queue)))
            rejected = [t for r, t in results if isinstance(r, QueueFullError)]
            served = [t for r, t in results if isinstance(r, str)]
            assert len(rejected) + len(served) == 10 * queue  # nothing else: no hang, no other error
            assert len(served) >= queue and all(r == expected for r, _ in results if isinstance(r, str))
            assert len(rejected) >= 5 * queue
            # Immediate: a rejection never waits for generation (all come before the last answer).
            assert max(rejected) < max(served)
        gc.collect()
        growth = psutil.Process().memory_info().rss - rss_before
        print(
            f"overload: {10 * queue} at once, queue {queue}: {len(served)} served, {len(rejected)} rejected, "
            f"RSS growth {growth / 2**20:.1f} MiB"
        )
        assert growth < 64 * 2**20
        assert llm.stats()["num_running"] == 0 and llm.stats()["num_waiting"] == 0


async def test_aclose_with_waiting_and_running_requests(tiny_model, tiny_tokenizer):
    llm = HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, max_batch_size=4)
    tasks = [asyncio.ensure_future(llm.arun("Hello", max_tokens=900, ignore_eos=True)) for _ in range(12)]
    beam = asyncio.ensure_future(llm.arun("Hello", num_beams=2, max_tokens=900, ignore_eos=True))
    with anyio.fail_after(30):
        while llm.stats()["num_running"] < 4 or llm.stats()["num_waiting"] < 8:
            await asyncio.sleep(0.01)
        await llm.aclose()
        results = await asyncio.gather(*tasks, beam, return_exceptions=True)
    assert all(isinstance(r, (EngineClosedError, str)) for r in results)
    assert sum(isinstance(r, EngineClosedError) for r in results) >= 12
    assert not [t for t in threading.enumerate() if t.name.startswith("async-llm") and t.is_alive()]
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not pending
    await llm.aclose()  # a second close is harmless
    with pytest.raises(EngineClosedError):
        await llm.arun("Hello")


def test_interpreter_exit_with_requests_in_flight(tmp_path):
    """A program that exits while requests run (no close, no await) does not hang."""
    script = tmp_path / "exit.py"
    script.write_text(
        textwrap.dedent(f"""
        import asyncio, sys
        sys.path.insert(0, {str(tmp_path.parents[0])!r})
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parents[1])!r})
        from conftest import build_model, build_tokenizer
        from async_llm import HuggingFaceLLM
        tok = build_tokenizer()
        llm = HuggingFaceLLM(model=build_model(len(tok)), tokenizer=tok)
        async def main():
            for _ in range(8):
                asyncio.ensure_future(llm.arun("Hello", max_tokens=900, ignore_eos=True))
            await asyncio.sleep(0.2)
            print("leaving with", llm.stats()["num_running"], "running")
        asyncio.run(main())
    """)
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "leaving with" in done.stdout
