"""Engine behaviour on the tiny model: exactness, batching, streaming, interleaving, latency."""

from __future__ import annotations

import asyncio
import threading
import time

import anyio
import pytest
from conftest import PROMPTS, admitted_together, record_prefills, reference_ids

from async_llm import HuggingFaceLLM


async def test_greedy_matches_generate_alone_and_batched(llm, tiny_model):
    """Greedy ids equal model.generate for prompts of different lengths, solo and in one batch."""
    solo = [await llm.acomplete(p, chat_template=False, max_tokens=20, ignore_eos=False) for p in PROMPTS]
    batched = await admitted_together(
        llm, [lambda p=p: llm.acomplete(p, chat_template=False, max_tokens=20) for p in PROMPTS]
    )
    for s, b in zip(solo, batched):
        expected = reference_ids(tiny_model, s.prompt_token_ids, 20)
        assert s.token_ids == expected
        assert b.token_ids == expected
        assert b.text == s.text
    assert llm.stats()["peak_batch_size"] == len(PROMPTS)


async def test_prompts_of_any_lengths_packed_into_one_prefill_are_exact(llm, tiny_model, monkeypatch):
    """Prompts admitted together are packed into one sequence (block-diagonal mask, positions from 0
    for each, no padding) when the cost model says so; greedy answers equal generate's, with a
    shared prompt (n=2) and a penalised request among them."""
    assert llm.engine.runner.name == "fast"  # it always packs
    shapes = record_prefills(llm, monkeypatch)
    prompts = ["Hi", "The quick brown fox jumps over the lazy dog.", "a", "word " * 30, "日本語 🎉"]
    calls = [lambda p=p: llm.acomplete(p, chat_template=False, max_tokens=8, ignore_eos=True) for p in prompts]
    calls.append(lambda: llm.acomplete(prompts[1], chat_template=False, max_tokens=8, ignore_eos=True, n=2))
    results = await admitted_together(llm, calls)
    *singles, pair = results
    for r in [*singles, *pair]:
        assert r.token_ids == reference_ids(tiny_model, r.prompt_token_ids, 8)
    assert shapes == [(1, sum(len(r.prompt_token_ids) for r in singles))]  # the n=2 pair shares its prompt's row
    penalised = await admitted_together(
        llm,
        [
            lambda: llm.acomplete("Hello", chat_template=False, max_tokens=8, ignore_eos=True, repetition_penalty=1.3),
            lambda: llm.acomplete(
                "word " * 20, chat_template=False, max_tokens=8, ignore_eos=True, repetition_penalty=1.3
            ),
        ],
    )
    assert shapes[-1][0] == 1  # packed as well
    solo = [
        await llm.acomplete(p, chat_template=False, max_tokens=8, ignore_eos=True, repetition_penalty=1.3)
        for p in ("Hello", "word " * 20)
    ]
    assert [r.token_ids for r in penalised] == [r.token_ids for r in solo]


async def test_without_packing_short_and_long_prompts_get_separate_padded_prefills(plain_llm, tiny_model, monkeypatch):
    """The transformers prefill of a model that cannot pack splits prompts by length."""
    llm = plain_llm
    monkeypatch.setattr(llm.engine.runner, "can_pack", False)
    shapes = record_prefills(llm, monkeypatch)
    prompts = ["Hi", "word " * 150, "Hey", "word " * 150]
    calls = [lambda p=p: llm.acomplete(p, chat_template=False, max_tokens=8, ignore_eos=True) for p in prompts]
    results = await admitted_together(llm, calls)
    for r in results:
        assert r.token_ids == reference_ids(tiny_model, r.prompt_token_ids, 8)
    short = max(len(results[0].prompt_token_ids), len(results[2].prompt_token_ids))
    assert sorted(shapes) == [(1, len(results[1].prompt_token_ids)), (2, short)]  # the long pair shares one row


async def test_requests_waiting_together_are_prefilled_in_one_forward(llm, tiny_model, monkeypatch):
    """Requests that wait together when the engine admits are prefilled in one forward, as static
    batching would. (That requests sent together do wait together, the engine's burst window, is
    a matter of time: tests/stress/test_timing.py.)"""
    shapes = record_prefills(llm, monkeypatch)
    prompts = [f"Request {i}: hello" for i in range(8)]
    calls = [lambda p=p: llm.acomplete(p, chat_template=False, max_tokens=6, ignore_eos=True) for p in prompts]
    results = await admitted_together(llm, calls)
    assert len(shapes) == 1  # one forward (packed or padded, as the cost model chose)
    for r in results:
        assert r.token_ids == reference_ids(tiny_model, r.prompt_token_ids, 6)


async def test_first_token_is_delivered_before_the_batch_decodes_again(plain_llm, monkeypatch):
    """A joiner's first token reaches its stream (on the loop) straight after its prefill: the decode
    forward of the same step waits here until the stream has it, and would time out otherwise."""
    running = await plain_llm.submit("Hi", chat_template=False, max_tokens=300, ignore_eos=True)
    await running.__anext__()
    prefilled, waited = threading.Event(), []
    joiner = None
    forward = plain_llm.model.forward

    def delivered_within(seconds: float) -> bool:  # generous: only a failing run waits it out
        deadline = time.monotonic() + seconds
        while joiner is None or joiner.first_token_at is None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def gated(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            prefilled.set()
        elif prefilled.is_set() and not waited:
            waited.append(delivered_within(30))
        return forward(*args, **kwargs)

    monkeypatch.setattr(plain_llm.model, "forward", gated)
    joiner = await plain_llm.submit("Hello there", chat_template=False, max_tokens=4)
    with anyio.fail_after(60):
        while not waited:
            await asyncio.sleep(0.005)  # the loop stays free to take the delivery
        await joiner.aclose()
        await running.aclose()
    assert waited == [True]


async def test_late_joiner_matches_generate(llm, tiny_model):
    """A request joining a running batch (longer prompt than the batch's rows) is still exact."""
    running = await llm.submit("Hi", chat_template=False, max_tokens=60, ignore_eos=True)
    async with running:
        await running.__anext__()  # decoding: the next request joins a running batch
        late = await llm.acomplete(PROMPTS[2], chat_template=False, max_tokens=15)
        rest = [delta async for delta in running]
    assert late.token_ids == reference_ids(llm.model, late.prompt_token_ids, 15)
    expected = reference_ids(llm.model, running.prompt_token_ids, 60)  # it may end at eos; the engine did not
    assert rest and running.token_ids[: len(expected)] == expected


class _ListSink:
    """An output sink keeping what the engine gives it (on the thread that steps the engine)."""

    def __init__(self) -> None:
        self.outputs: list = []

    def deliver(self, outputs: list) -> bool:
        self.outputs.extend(outputs)
        return True

    def finished(self, request_id: str) -> bool:
        return any(o.request_id == request_id and o.finish_reason is not None for o in self.outputs)


def test_late_short_request_finishes_before_earlier_long_one(tiny_model, tiny_tokenizer):
    """Stepped by the test (the engine without its thread): a short request sent while a long one
    decodes joins the batch and ends first; the long one is still decoding."""
    from async_llm.engine.config import EngineConfig
    from async_llm.engine.core import Engine
    from async_llm.engine.detokenizer import Detokenizer
    from async_llm.engine.request import Request
    from async_llm.sampling_params import SamplingParams

    engine = Engine(tiny_model, pad_token_id=0, config=EngineConfig(max_batch_size=4))
    sink = _ListSink()

    def send(request_id: str, tokens: int) -> None:
        ids = tiny_tokenizer("Hello").input_ids
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)
        detokenizer = Detokenizer(tiny_tokenizer, ids)
        request = Request(request_id=request_id, prompt_ids=ids, params=params, sink=sink, detokenizer=detokenizer,
                          eos_token_ids=frozenset({2}))  # fmt: skip
        engine.submit(request)

    try:
        send("long", 300)
        for _ in range(3):
            engine.step()
        assert engine.stats()["num_running"] == 1
        send("short", 3)
        steps = 0
        while not sink.finished("short"):
            assert engine.step() and (steps := steps + 1) < 20
        assert not sink.finished("long") and engine.stats()["num_running"] == 1
    finally:
        engine.close()


async def test_stream_deltas_concatenate_to_arun_text(llm):
    params = dict(max_tokens=40, ignore_eos=True)
    deltas = [d async for d in llm.astream(PROMPTS[3], **params)]
    assert all(isinstance(d, str) and d for d in deltas)
    assert "".join(deltas) == await llm.arun(PROMPTS[3], **params)


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_text_is_the_decoded_tokens(llm, tiny_tokenizer, prompt):
    """The streamed text equals tokenizer.decode of the generated ids (incomplete UTF-8 included)."""
    result = await llm.acomplete(prompt, max_tokens=30, ignore_eos=True)
    assert result.text == tiny_tokenizer.decode(result.token_ids, skip_special_tokens=True)


async def test_concurrent_streams_interleave(llm):
    """Every stream gets its first delta before any of them ends (events in the order the loop saw them)."""
    events: list[tuple[str, int]] = []

    async def consume(i: int) -> None:
        async for _ in llm.astream(PROMPTS[i % len(PROMPTS)], max_tokens=30, ignore_eos=True):
            if ("first", i) not in events:
                events.append(("first", i))
        events.append(("end", i))

    await admitted_together(llm, [lambda i=i: consume(i) for i in range(6)])
    first_ends = events.index(next(e for e in events if e[0] == "end"))
    assert {i for kind, i in events[:first_ends] if kind == "first"} == set(range(6))
    assert llm.stats()["peak_batch_size"] == 6


def _record_forward_threads(llm, monkeypatch) -> set[threading.Thread]:
    """The threads that run the model's forwards from now on (the fast step's and transformers')."""
    threads: set[threading.Thread] = set()
    forward, run = llm.model.forward, llm.engine.runner.run

    def recording(*args, **kwargs):
        threads.add(threading.current_thread())
        return forward(*args, **kwargs)

    def recording_run(*args, **kwargs):  # every forward of either runner goes through its run
        threads.add(threading.current_thread())
        return run(*args, **kwargs)

    monkeypatch.setattr(llm.model, "forward", recording)
    monkeypatch.setattr(llm.engine.runner, "run", recording_run)
    return threads


async def test_model_work_never_runs_on_the_event_loop(llm, monkeypatch):
    """Every forward (the fast step: prefill and decode) runs on the engine's thread, never on the
    loop's, while requests stream. (How little CPU the loop then spends between two ticks is a
    matter of time: tests/stress/test_timing.py.)"""
    await _forwards_run_on_the_engine_thread(llm, monkeypatch)


async def test_transformers_forwards_never_run_on_the_event_loop(plain_llm, monkeypatch):
    await _forwards_run_on_the_engine_thread(plain_llm, monkeypatch)


async def _forwards_run_on_the_engine_thread(llm, monkeypatch) -> None:
    threads = _record_forward_threads(llm, monkeypatch)
    with anyio.fail_after(60):
        texts = await llm.abatch_run(PROMPTS * 2, max_tokens=16, ignore_eos=True)
    assert len(texts) == 2 * len(PROMPTS)
    assert threads == {llm.engine._thread} and threading.current_thread() not in threads


async def test_abatch_run_keeps_input_order(llm):
    texts = await llm.abatch_run(PROMPTS, max_tokens=12)
    for prompt, text in zip(PROMPTS, texts):
        assert text == await llm.arun(prompt, max_tokens=12)


async def test_eos_stops_generation(llm, tiny_model):
    """Without ignore_eos, a request ends at eos with finish_reason 'stop' and eos is not in the text."""
    eos = tiny_model.config.eos_token_id
    for prompt in PROMPTS + [f"prompt {i}" for i in range(20)]:
        result = await llm.acomplete(prompt, chat_template=False, max_tokens=40)
        if result.token_ids and result.token_ids[-1] == eos:
            assert result.finish_reason == "stop"
            assert "<|im_end|>" not in result.text
            assert result.token_ids == reference_ids(tiny_model, result.prompt_token_ids, 40)
            return
    pytest.skip("the tiny model produced no eos for these prompts")


async def test_finish_reason_length(llm):
    result = await llm.acomplete("Hello", max_tokens=7, ignore_eos=True)
    assert result.finish_reason == "length"
    assert len(result.token_ids) == 7


async def test_loads_from_folder(tiny_model_dir, tiny_model):
    async with HuggingFaceLLM(tiny_model_dir, device="cpu", max_tokens=10, chat_template=False) as llm:
        result = await llm.acomplete("Hello")
        assert result.token_ids == reference_ids(tiny_model, result.prompt_token_ids, 10)


async def test_chat_messages_go_through_the_template(llm, tiny_tokenizer):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    stream = await llm.submit(chat, max_tokens=5, ignore_eos=True)
    async with stream:
        text = "".join([d async for d in stream])
    expected = tiny_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert stream.prompt_token_ids == tiny_tokenizer(expected, add_special_tokens=False).input_ids
    assert len(stream.token_ids) == 5 and stream.finish_reason.value == "length"
    assert text == tiny_tokenizer.decode(stream.token_ids, skip_special_tokens=True)


async def test_str_prompt_uses_system_prompt_and_template(tiny_model, tiny_tokenizer):
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, system_prompt="Be brief.") as llm:
        ids = llm.encode("Hello")
        text = tiny_tokenizer.decode(ids)
        assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("<|im_start|>assistant\n")
        assert llm.encode("Hello", chat_template=False) == tiny_tokenizer("Hello").input_ids


async def test_completion_timings_are_consistent(llm):
    result = await llm.acomplete("Hello", max_tokens=10, ignore_eos=True)
    assert 0 < result.time_to_first_token <= result.latency


def test_packing_is_used_only_where_it_gives_the_padded_logits(tiny_model, tiny_tokenizer, monkeypatch):
    """The engine checks packing once against padding: a model that does not honour a custom 4-D
    mask (here it drops it, so packed prompts see each other) keeps padded prefills."""
    engine_checks = []
    for ignore_mask in (False, True):
        if ignore_mask:
            forward = tiny_model.forward

            def no_custom_mask(*args, forward=forward, **kwargs):
                if kwargs.get("attention_mask") is not None and kwargs["attention_mask"].dim() == 4:
                    kwargs["attention_mask"] = None
                return forward(*args, **kwargs)

            monkeypatch.setattr(tiny_model, "forward", no_custom_mask)
        llm = HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, device="cpu", fast_path=False)
        try:
            assert llm.engine.ready.wait(30)  # the check runs on the engine's thread as it starts
            engine_checks.append(llm.engine.runner.can_pack)
        finally:
            llm.close()
    assert engine_checks == [True, False]
