"""Overlapped decode steps (``overlap=True``; the default with the static runner on CUDA): the next
step is launched before the previous one's tokens are handled. On a CPU the two halves run one
after the other, which is what lets these tests check the bookkeeping: every output equals the
one-step-at-a-time engine's, a stop found one step late drops the extra token, and cancellation,
grammar rows and logprobs rows keep working."""

from __future__ import annotations

import asyncio
import gc

import pytest

from async_llm import HuggingFaceLLM
from tests.conftest import PROMPTS

CALLS = [
    dict(prompt=PROMPTS[0], max_tokens=20, ignore_eos=True),
    dict(prompt=PROMPTS[1], max_tokens=7, ignore_eos=True),
    dict(prompt=PROMPTS[2], max_tokens=30, temperature=0.8, seed=3, ignore_eos=True),
    dict(prompt=PROMPTS[3], max_tokens=12, temperature=1.0, top_k=8, seed=5, frequency_penalty=0.7),
    dict(prompt=PROMPTS[4], max_tokens=25),  # may stop on eos
    dict(prompt=PROMPTS[0], max_tokens=40, temperature=1.0, seed=9, ignore_eos=True),
]


def _llm(model, tokenizer, runner: str, overlap: bool) -> HuggingFaceLLM:
    options = {"max_model_len": 256, "max_batch_size": 8} if runner == "static" else {}
    return HuggingFaceLLM(
        model=model, tokenizer=tokenizer, device="cpu", runner=runner, overlap=overlap, max_tokens=24, **options
    )


async def _run_all(llm: HuggingFaceLLM, calls: list[dict]) -> list[tuple]:
    async def one(call: dict) -> tuple:
        call = dict(call)
        result = await llm.acomplete(call.pop("prompt"), chat_template=False, **call)
        return result.token_ids, result.text, result.finish_reason

    return await asyncio.gather(*(one(c) for c in calls))


def _count_overlapped(llm: HuggingFaceLLM) -> list[int]:
    """A one-item list counting the engine's overlapped steps from now on."""
    launched = [0]
    decode = llm.engine._decode_overlapped

    def counting(out):
        launched[0] += 1
        return decode(out)

    llm.engine._decode_overlapped = counting  # type: ignore[method-assign]
    return launched


@pytest.mark.parametrize("runner", ["static", "fast"])
async def test_overlapped_steps_give_the_same_outputs(runner, tiny_model, tiny_tokenizer):
    async with _llm(tiny_model, tiny_tokenizer, runner, overlap=False) as plain:
        expected = await _run_all(plain, CALLS)
    async with _llm(tiny_model, tiny_tokenizer, runner, overlap=True) as llm:
        assert llm.engine.overlap
        launched = _count_overlapped(llm)
        got = await _run_all(llm, CALLS)
        assert launched[0] > 20  # most steps ran overlapped
        assert [len(ids) for ids, _, _ in got] == [len(ids) for ids, _, _ in expected]
        assert got == expected
        gc.collect()
        assert not llm.engine.batch.holds_rows() and llm.stats()["num_running"] == 0


async def test_a_stop_string_found_one_step_late_drops_the_extra_token(tiny_model, tiny_tokenizer):
    async with _llm(tiny_model, tiny_tokenizer, "static", overlap=False) as plain:
        free = await plain.acomplete("Hello", chat_template=False, max_tokens=30, ignore_eos=True)
    stop = free.text[5:8]  # a stop string the continuation reaches part way
    async with _llm(tiny_model, tiny_tokenizer, "static", overlap=False) as plain:
        expected = await plain.acomplete("Hello", chat_template=False, max_tokens=30, ignore_eos=True, stop=[stop])
    async with _llm(tiny_model, tiny_tokenizer, "static", overlap=True) as llm:
        stream = await llm.submit("Hello", chat_template=False, max_tokens=30, ignore_eos=True, stop=[stop])
        sent = "".join([delta async for delta in stream])
        result = await llm.acomplete("Hello", chat_template=False, max_tokens=30, ignore_eos=True, stop=[stop])
        gc.collect()
        assert not llm.engine.batch.holds_rows()
    assert result.finish_reason == expected.finish_reason == "stop"
    assert result.token_ids == expected.token_ids and result.text == expected.text
    assert sent == expected.text and stream.token_ids == expected.token_ids  # the extra token never went out


async def test_cancelling_an_overlapped_stream_frees_its_row(tiny_model, tiny_tokenizer):
    async with _llm(tiny_model, tiny_tokenizer, "static", overlap=True) as llm:
        other = asyncio.ensure_future(llm.acomplete("Hello", chat_template=False, max_tokens=60, ignore_eos=True))
        stream = llm.astream(PROMPTS[1], chat_template=False, max_tokens=200, ignore_eos=True)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 5:
                break
        await stream.aclose()
        result = await other
        assert len(result.token_ids) == 60
        gc.collect()
        assert not llm.engine.batch.holds_rows() and llm.stats()["num_aborted"] == 1


async def test_grammar_and_logprobs_rows_join_an_overlapped_batch(tiny_model, tiny_tokenizer):
    """Rows whose next step needs their last token on the host (a grammar's mask) turn the overlap
    off while they run; logprobs rows and the plain rows beside them come out as without it."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    calls = [
        dict(prompt=PROMPTS[0], max_tokens=40, ignore_eos=True),
        dict(
            prompt=PROMPTS[1],
            max_tokens=30,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        ),
        dict(prompt=PROMPTS[2], max_tokens=10, logprobs=True, top_logprobs=2, ignore_eos=True),
    ]
    async with _llm(tiny_model, tiny_tokenizer, "static", overlap=False) as plain:
        expected = await _run_all(plain, calls)
    async with _llm(tiny_model, tiny_tokenizer, "static", overlap=True) as llm:
        got = await _run_all(llm, calls)
    assert got == expected


async def test_logprobs_rows_run_overlapped_with_the_same_records(tiny_model, tiny_tokenizer):
    """Logprobs are computed on the device in the overlapped step and come back with the tokens:
    rows asking for them (with 0, 2 or 5 alternatives, greedy or sampled) keep the steps
    overlapped and report exactly what the one-step-at-a-time engine reports."""
    calls = [
        dict(prompt=PROMPTS[0], max_tokens=20, logprobs=True, ignore_eos=True),
        dict(prompt=PROMPTS[1], max_tokens=30, logprobs=True, top_logprobs=2, ignore_eos=True),
        dict(prompt=PROMPTS[2], max_tokens=25, logprobs=True, top_logprobs=5, temperature=0.9, seed=4, ignore_eos=True),
        dict(prompt=PROMPTS[3], max_tokens=15, ignore_eos=True),
    ]

    async def run(llm: HuggingFaceLLM) -> list[tuple]:
        results = []
        for result in await asyncio.gather(
            *(
                llm.acomplete(c["prompt"], chat_template=False, **{k: v for k, v in c.items() if k != "prompt"})
                for c in calls
            )
        ):
            records = [(lp.token_id, lp.logprob, lp.top_logprobs) for lp in result.logprobs or []]
            results.append((result.token_ids, result.text, records))
        return results

    async with _llm(tiny_model, tiny_tokenizer, "static", overlap=False) as plain:
        expected = await run(plain)
    async with _llm(tiny_model, tiny_tokenizer, "static", overlap=True) as llm:
        launched = _count_overlapped(llm)
        got = await run(llm)
    assert launched[0] > 15  # the logprobs rows did not turn the overlap off
    assert [len(records) for _, _, records in got] == [20, 30, 25, 0]
    assert [len(records[0][2]) for _, _, records in got[:3]] == [0, 2, 5]
    assert got == expected
