"""Chunked prefill: a prompt longer than the step's budget is prefilled over several steps while the
batch keeps decoding; its tokens equal a whole prefill's; cancelling it midway frees everything."""

from __future__ import annotations

import asyncio
import gc
import threading

import anyio
import pytest

from async_llm import HuggingFaceLLM, InvalidParameterError, ParameterTypeError
from tests.conftest import reference_ids

LONG = "The quick brown fox jumps over the lazy dog. " * 12  # ~150 tokens of the tiny tokenizer


def _record_chunks(llm, monkeypatch) -> list[list[int]]:
    """Tokens of each prefill forward the engine runs from now on (one list per forward)."""
    forwards: list[list[int]] = []
    complete = llm.engine.prefiller.complete

    def recording(forward):
        if forward.items:
            forwards.append([n for _, n in forward.items])
        return complete(forward)

    monkeypatch.setattr(llm.engine.prefiller, "complete", recording)
    return forwards


@pytest.mark.parametrize("fast_path", [True, False])
async def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps_and_exactly(
    fast_path, tiny_model, tiny_tokenizer, monkeypatch
):
    async with HuggingFaceLLM(
        model=tiny_model, tokenizer=tiny_tokenizer, fast_path=fast_path, prefill_chunk_tokens=16, prefix_cache=False
    ) as llm:
        running = await llm.submit("Hi", chat_template=False, max_tokens=400, ignore_eos=True)
        await running.__anext__()  # decoding: from now on a step prefills at most 16 tokens
        forwards = _record_chunks(llm, monkeypatch)
        long = await llm.submit(LONG, chat_template=False, max_tokens=8, ignore_eos=True)
        sent = len(running.token_times)
        with anyio.fail_after(60):
            async for _ in long:
                pass
        ids = long.token_ids
        await running.aclose()
        prompt = long.prompt_token_ids
        chunks = [n for forward in forwards for n in forward]
        assert sum(chunks) == len(prompt) and max(chunks) <= 16 and len(chunks) >= len(prompt) // 16
        # The running stream got a token from every step while the long prompt was prefilling.
        during = [t for t in running.token_times[sent:] if t < long.first_token_at]
        assert len(during) >= len(chunks) - 2
    assert ids == reference_ids(tiny_model, prompt, 8)[: len(ids)]


async def test_an_idle_batch_prefills_a_long_prompt_whole(llm, monkeypatch):
    forwards = _record_chunks(llm, monkeypatch)
    llm.engine.prefill_chunk_tokens = 16
    result = await llm.acomplete(LONG, chat_template=False, max_tokens=4, ignore_eos=True)
    assert forwards == [[len(result.prompt_token_ids)]]


@pytest.mark.parametrize("runner", ["fast", "transformers", "static"])
async def test_cancelling_a_chunked_prefill_midway_frees_everything(runner, tiny_model, tiny_tokenizer, monkeypatch):
    async with HuggingFaceLLM(
        model=tiny_model, tokenizer=tiny_tokenizer, runner=runner, prefill_chunk_tokens=16, max_batch_size=8
    ) as llm:
        assert llm.engine.runner.name == runner
        running = await llm.submit("Hi", chat_template=False, max_tokens=400, ignore_eos=True)
        await running.__anext__()
        prefiller = llm.engine.prefiller
        complete, chunks_done, resume = prefiller.complete, threading.Event(), threading.Event()

        def gated(forward):
            out = complete(forward)
            if len([s for s in prefiller.states if s.started]) and not chunks_done.is_set():
                chunks_done.set()
                resume.wait(10)  # hold the engine until the test has cancelled
            return out

        monkeypatch.setattr(prefiller, "complete", gated)
        long = await llm.submit(LONG, chat_template=False, max_tokens=8, ignore_eos=True)
        with anyio.fail_after(10):
            while not chunks_done.is_set():
                await asyncio.sleep(0.005)
        await long.aclose()  # abort while its prompt is half prefilled
        resume.set()
        with anyio.fail_after(10):
            while prefiller.states or llm.stats()["num_running"] != 1:
                await running.__anext__()
        assert llm.stats()["num_aborted"] == 1 and llm.stats()["num_failed"] == 0
        if runner == "static":  # the aborted prefill's slot is free again; only the running row's is taken
            gc.collect()
            assert llm.engine.batch.slots_in_use() == 1
        await running.aclose()
        again = await llm.acomplete(LONG, chat_template=False, max_tokens=4, ignore_eos=True)
        assert again.token_ids == reference_ids(tiny_model, again.prompt_token_ids, 4)[: len(again.token_ids)]
        with anyio.fail_after(10):
            while llm.stats()["num_running"]:
                await asyncio.sleep(0.01)
        gc.collect()
        assert not prefiller.states and not llm.engine.batch.holds_rows()


async def test_a_chunked_prompt_leaves_its_blocks_in_the_cache_as_it_goes(tiny_model, tiny_tokenizer, monkeypatch):
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, prefill_chunk_tokens=40) as llm:
        running = await llm.submit("Hi", chat_template=False, max_tokens=400, ignore_eos=True)
        await running.__anext__()
        sizes = []
        complete = llm.engine.prefiller.complete

        def recording(forward):
            out = complete(forward)
            if forward.items:
                sizes.append(llm.engine.prefix_cache.bytes)
            return out

        monkeypatch.setattr(llm.engine.prefiller, "complete", recording)
        await llm.acomplete(LONG, chat_template=False, max_tokens=2, ignore_eos=True)
        await running.aclose()
    assert len(sizes) >= 3 and sizes == sorted(sizes) and 0 < sizes[0] < sizes[-2]


def test_engine_options_are_checked_by_name(tiny_model, tiny_tokenizer):
    with pytest.raises(InvalidParameterError) as info:
        HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, prefill_chunk_tokens=0)
    assert info.value.param == "prefill_chunk_tokens"
    with pytest.raises(InvalidParameterError) as info:
        HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, prefix_cache_bytes=-1)
    assert info.value.param == "prefix_cache_bytes"
    with pytest.raises(ParameterTypeError) as info:
        HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, prefix_cache="yes")
    assert info.value.param == "prefix_cache"
