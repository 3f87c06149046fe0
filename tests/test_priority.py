"""Priorities, preemption and deadlines: the order requests start in, a more urgent request taking
the row of a less urgent one that resumes exactly where it stopped, the bound on preemptions, and
``timeout`` / ``queue_timeout`` / ``stall_timeout`` ending requests with a typed error and freeing
their rows."""

from __future__ import annotations

import asyncio
import time

import pytest

from async_llm import HuggingFaceLLM, RequestTimeoutError, SamplingParams
from async_llm.engine.scheduler import AGEING_SECONDS, MAX_PREEMPTIONS, Scheduler
from async_llm.errors import InvalidParameterError, ParameterTypeError

LONG = {"chat_template": False, "ignore_eos": True}


def _llm(tiny_model, tiny_tokenizer, **kwargs) -> HuggingFaceLLM:
    return HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, device="cpu", pad_token_id=0, **kwargs)


async def _running(llm: HuggingFaceLLM, stream, tokens: int) -> list[str]:
    """Read ``tokens`` deltas of ``stream`` (the request is then running)."""
    seen = []
    async for delta in stream:
        seen.append(delta)
        if len(seen) >= tokens:
            break
    return seen


async def _finish(stream, text: list[str] | None = None) -> tuple[list[int], float]:
    """The stream's remaining deltas read to its end (into ``text``); returns (all its token ids,
    when it ended)."""
    async for delta in stream:
        if text is not None:
            text.append(delta)
    return list(stream.token_ids), time.perf_counter()


def test_waiting_requests_go_by_aged_priority_then_arrival():
    scheduler = Scheduler(max_batch_size=1, policy="priority")

    def request(name: str, priority: int, waited: float):
        r = type("R", (), {})()
        r.request_id, r.params, r.arrival_time = name, SamplingParams(priority=priority), time.perf_counter()
        r.waited, r.preemptions, r.output_ids, r.prompt_ids = waited, 0, [], [1]
        r.context_ids = [1]
        return r

    fresh_urgent = request("urgent", 0, 0.0)
    old_lax = request("old", 1, 2.5 * AGEING_SECONDS)  # waited long enough to pass a level 0
    young_lax = request("young", 1, 0.0)
    for r in (young_lax, fresh_urgent, old_lax):
        scheduler.add(r)
    order = [scheduler.admit()[0].request_id for _ in range(3) if not scheduler.running.clear()]
    assert order == ["old", "urgent", "young"]


async def test_priority_policy_starts_the_most_urgent_first(tiny_model, tiny_tokenizer):
    async with _llm(tiny_model, tiny_tokenizer, max_batch_size=1, scheduling_policy="priority") as llm:
        first = await llm.submit("hold the row", max_tokens=200, priority=-5, **LONG)  # still running below
        await _running(llm, first, 2)
        lax = await llm.submit("lax", max_tokens=4, priority=5, **LONG)
        urgent = await llm.submit("urgent", max_tokens=4, priority=1, **LONG)
        ends = await asyncio.gather(_finish(first), _finish(lax), _finish(urgent))
        assert llm.stats()["num_preempted"] == 0  # neither waiting request outranks the running one
    (_, first_end), (_, lax_end), (_, urgent_end) = ends
    assert first_end < urgent_end < lax_end


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_p": 0.95, "seed": 11}])
async def test_a_preempted_request_resumes_exactly_where_it_stopped(tiny_model, tiny_tokenizer, sampling):
    """A less urgent request loses its row to a more urgent one, finishes after it, and its output
    is token for token what it is when nothing interrupts it (greedy and seeded sampling)."""
    prompt = "a patient request that holds its row for a while, " * 3  # more than a cache block by then
    async with _llm(tiny_model, tiny_tokenizer, max_batch_size=1) as alone:
        expected = await alone.acomplete(prompt, max_tokens=200, **LONG, **sampling)
    async with _llm(tiny_model, tiny_tokenizer, max_batch_size=1, scheduling_policy="priority") as llm:
        patient = await llm.submit(prompt, max_tokens=200, priority=3, **LONG, **sampling)  # running when urgent comes
        text = await _running(llm, patient, 10)
        urgent = await llm.submit("urgent", max_tokens=8, priority=0, **LONG)
        (tokens, patient_end), (_, urgent_end) = await asyncio.gather(_finish(patient, text), _finish(urgent))
        stats = llm.stats()
        assert not llm.engine.batch.holds_rows()
    assert stats["num_preempted"] == 1 and urgent_end < patient_end
    assert tokens == expected.token_ids
    assert "".join(text) == expected.text  # the stream saw no gap but time
    assert stats["prefix_cache_hit_tokens"] > 0  # it resumed from the blocks it left


async def test_fcfs_refuses_a_priority_it_cannot_honour_and_never_preempts(tiny_model, tiny_tokenizer):
    async with _llm(tiny_model, tiny_tokenizer, max_batch_size=1) as llm:
        with pytest.raises(InvalidParameterError, match="scheduling_policy='priority'") as caught:
            await llm.arun("urgent", priority=-1)
        assert caught.value.param == "priority" and llm.stats()["num_waiting"] == 0
        first = await llm.submit("first", max_tokens=20, **LONG)
        await _running(llm, first, 2)
        second = await llm.submit("second", max_tokens=4, priority=0, **LONG)
        (_, first_end), (_, second_end) = await asyncio.gather(_finish(first), _finish(second))
        assert llm.stats()["num_preempted"] == 0
    assert first_end < second_end


async def test_a_request_is_preempted_a_bounded_number_of_times(tiny_model, tiny_tokenizer):
    """Urgent requests keep coming: the lax one loses its row at most MAX_PREEMPTIONS times, then
    runs to its end while they wait."""
    async with _llm(tiny_model, tiny_tokenizer, max_batch_size=1, scheduling_policy="priority") as llm:
        lax = await llm.submit("lax", max_tokens=60, priority=9, **LONG)
        await _running(llm, lax, 1)
        urgent = []
        for i in range(MAX_PREEMPTIONS + 3):
            urgent.append(asyncio.ensure_future(llm.acomplete(f"urgent {i}", max_tokens=3, priority=0, **LONG)))
            await asyncio.sleep(0.05)
        tokens, _ = await _finish(lax)
        await asyncio.gather(*urgent)
        assert len(tokens) == 60
        assert llm.stats()["num_preempted"] <= MAX_PREEMPTIONS


def _slow_steps(llm: HuggingFaceLLM, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every step of ``llm``'s engine takes ``seconds`` longer: a long request outlasts its deadline
    however fast the machine, and a short one still gets its tokens however busy."""
    llm.engine.ready.wait()
    runner = llm.engine.runner
    run = runner.run

    def slow(forward, batch):
        time.sleep(seconds)
        return run(forward, batch)

    monkeypatch.setattr(runner, "run", slow)


async def test_timeout_ends_the_request_frees_its_row_and_keeps_its_tokens(tiny_model, tiny_tokenizer, monkeypatch):
    async with _llm(tiny_model, tiny_tokenizer, max_batch_size=4) as llm:
        _slow_steps(llm, monkeypatch, 0.01)
        other = asyncio.ensure_future(llm.acomplete("unhurried", max_tokens=40, **LONG))
        with pytest.raises(RequestTimeoutError) as caught:
            await llm.acomplete("hurried", max_tokens=900, timeout=1.5, **LONG)
        assert caught.value.limit == "timeout" and caught.value.seconds == 1.5
        assert 0 < len(caught.value.token_ids) < 900
        assert len((await other).token_ids) == 40  # the other request never noticed
        assert not llm.engine.batch.holds_rows()


async def test_queue_timeout_ends_a_request_still_waiting_for_a_row(tiny_model, tiny_tokenizer):
    async with _llm(tiny_model, tiny_tokenizer, max_batch_size=1) as llm:
        holder = await llm.submit("hold the row", max_tokens=900, **LONG)
        await _running(llm, holder, 1)
        with pytest.raises(RequestTimeoutError) as caught:
            await llm.acomplete("waits", max_tokens=4, queue_timeout=0.05, **LONG)
        assert caught.value.limit == "queue_timeout" and caught.value.token_ids == []
        await holder.aclose()


async def test_stall_timeout_ends_a_running_request_that_makes_no_progress(tiny_model, tiny_tokenizer, monkeypatch):
    """A long prompt prefilled a few tokens a step, each step slow: no token comes for longer than
    the limit, and the request ends while still running."""
    async with _llm(tiny_model, tiny_tokenizer, prefill_chunk_tokens=4) as llm:
        _slow_steps(llm, monkeypatch, 0.05)
        busy = asyncio.ensure_future(llm.acomplete("keeps decoding", max_tokens=400, **LONG))
        await asyncio.sleep(0.1)
        with pytest.raises(RequestTimeoutError) as caught:
            await llm.acomplete("word " * 200, max_tokens=4, stall_timeout=0.2, **LONG)
        assert caught.value.limit == "stall_timeout"
        busy.cancel()


@pytest.mark.parametrize(
    ("kwargs", "param", "error"),
    [
        ({"priority": "high"}, "priority", ParameterTypeError),
        ({"priority": 2**40}, "priority", InvalidParameterError),
        ({"timeout": -1}, "timeout", InvalidParameterError),
        ({"queue_timeout": "soon"}, "queue_timeout", ParameterTypeError),
        ({"stall_timeout": 0}, "stall_timeout", InvalidParameterError),
        ({"timeout": 5, "num_beams": 2}, "timeout", InvalidParameterError),
    ],
)
async def test_bad_priority_or_deadline_is_refused_before_anything_is_queued(llm, kwargs, param, error):
    with pytest.raises(error) as caught:
        await llm.arun("hi", **kwargs)
    assert caught.value.param == param
    assert llm.stats()["num_waiting"] == 0 and llm.stats()["num_running"] == 0


def test_an_unknown_scheduling_policy_is_refused_before_the_model_loads(monkeypatch):
    monkeypatch.setattr("async_llm.llm.huggingface.model_to_serve", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(InvalidParameterError) as caught:
        HuggingFaceLLM("no/such-model", device="cpu", scheduling_policy="lifo")
    assert caught.value.param == "scheduling_policy"


async def test_kv_usage_is_a_share_of_the_rows_while_they_run(tiny_model, tiny_tokenizer):
    async with _llm(tiny_model, tiny_tokenizer, max_batch_size=4) as llm:
        assert llm.stats()["kv_cache_usage_perc"] == 0.0
        streams = [await llm.submit(f"row {i}", max_tokens=300, **LONG) for i in range(2)]
        for stream in streams:
            await _running(llm, stream, 2)
        assert llm.stats()["kv_cache_usage_perc"] == 0.5  # 2 rows of 4
        for stream in streams:
            await stream.aclose()


async def test_deadlines_as_defaults_of_the_llm_apply_to_every_request(tiny_model, tiny_tokenizer, monkeypatch):
    async with _llm(tiny_model, tiny_tokenizer, timeout=0.5) as llm:
        _slow_steps(llm, monkeypatch, 0.01)
        with pytest.raises(RequestTimeoutError):
            await llm.arun("long", max_tokens=900, **LONG)
        assert len(await llm.arun("short", max_tokens=3, timeout=None, **LONG)) > 0
