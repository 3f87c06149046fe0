"""One request path in the front end (llm/requests.py): a call is validated once, ``n`` choices are
seeded by one rule, streamers hide what the finish rule hides; streams carry the finish reason and
usage; the seed documents' names live in one module."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Literal

import anyio
import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from async_llm import BaseLLM, FinishReason, HuggingFaceLLM, InvalidParameterError, SamplingParams, TokenStream, Usage
from async_llm.engine.output import RequestOutput, TokenLogprob
from async_llm.errors import QueueFullError
from async_llm.llm.batch import map_prompts, with_backpressure
from async_llm.llm.chat import render_transcript
from async_llm.llm.compat import ModelNameAlias, SeedDocumentNames
from async_llm.llm.frontend import StepSignal
from async_llm.sampling_params import MAX_SEED, choice_seed


class Person(BaseModel):
    """A bounded schema (short strings, closed object): the tiny model finishes it well within 120 tokens."""

    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(max_length=8)]
    age: Annotated[int, Field(ge=0, le=120)]
    role: Literal["admin", "user"]


# -- 1. one validation, one seed rule, one finish rule ---------------------------------------------------
@pytest.fixture
def merges(monkeypatch):
    """Every SamplingParams.merge call (the validation of a call's parameters over the defaults)."""
    calls: list[dict] = []
    original = SamplingParams.merge

    def counting(self, **overrides):
        calls.append(overrides)
        return original(self, **overrides)

    monkeypatch.setattr(SamplingParams, "merge", counting)
    return calls


async def test_each_entry_point_validates_its_parameters_once(llm, merges):
    stream = llm.astream("Hello", max_tokens=3, temperature=0.0)
    assert len(merges) == 1  # at the call, before the first read
    assert [d async for d in stream]
    assert len(merges) == 1
    for call in (
        lambda: llm.submit("Hello", max_tokens=3),
        lambda: llm.submit_many("Hello", max_tokens=3),
        lambda: llm.acomplete("Hello", max_tokens=3),
        lambda: llm.arun("Hello", max_tokens=3),
    ):
        merges.clear()
        result = await call()
        for stream in result if isinstance(result, list) else [result]:
            if isinstance(stream, TokenStream):
                stream.close()
        assert len(merges) == 1


def test_choice_seed_is_the_one_rule():
    assert [choice_seed(5, i) for i in range(3)] == [5, 6, 7]
    assert choice_seed(None, 2) is None
    assert choice_seed(MAX_SEED - 1, 1) == 0  # wraps within the seeds' range
    assert choice_seed(-1, 1) == -1  # invalid seeds are left for validation to name


async def test_n_choices_are_seeded_seed_plus_i_even_at_the_top_of_the_range(llm):
    top = MAX_SEED - 1
    sampled = dict(temperature=1.0, max_tokens=6, ignore_eos=True)
    with anyio.fail_after(60):
        pair = await llm.arun("Hello", n=2, seed=top, **sampled)  # row 1 used to be seeded 2**63: refused
        alone = [await llm.arun("Hello", seed=seed, **sampled) for seed in (top, 0)]
    assert pair == alone


class Recorder:
    """A transformers-style streamer (``put``/``end``) that keeps what it was shown."""

    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.flatten().tolist())

    def end(self) -> None:
        self.ended = True


async def test_streamers_hide_what_ends_the_text_stop_token_ids_included(llm):
    with anyio.fail_after(60):
        free = await llm.acomplete("Hello", max_tokens=8, ignore_eos=True)
        # A stop token the greedy output reaches at its third position (not earlier).
        index = next(i for i, t in enumerate(free.token_ids) if i >= 2 and t not in free.token_ids[:i])
        stop = free.token_ids[index]
        recorder = Recorder()
        done = await llm.acomplete("Hello", max_tokens=8, ignore_eos=True, stop_token_ids=[stop], streamer=recorder)
    assert done.token_ids == free.token_ids[: index + 1]  # the stop token ends the output
    prompt, *generated = recorder.puts
    assert prompt == done.prompt_token_ids
    assert [t for put in generated for t in put] == done.token_ids[:-1]  # the stop token is not shown
    assert recorder.ended


# -- 2. streams carry what the engine knows --------------------------------------------------------------
async def test_astream_ends_with_the_finish_reason_and_usage(llm):
    stream = llm.astream("Hello", max_tokens=5, ignore_eos=True)
    assert stream.finish_reason is None and stream.usage is None  # nothing is queued before the first read
    with anyio.fail_after(30):
        text = "".join([delta async for delta in stream])
    assert text
    assert stream.finish_reason is FinishReason.LENGTH
    assert stream.usage == Usage(len(llm.encode("Hello")), 5)
    assert stream.usage.total_tokens == stream.usage.prompt_tokens + 5
    index = next(i for i, t in enumerate(stream.token_ids) if i and t not in stream.token_ids[:i])
    with anyio.fail_after(30):
        stopped = await llm.submit("Hello", max_tokens=20, stop_token_ids=[stream.token_ids[index]], ignore_eos=True)
        async with stopped:
            _ = [d async for d in stopped]
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.usage == Usage(len(stopped.prompt_token_ids), index + 1)


async def test_a_streams_logprobs_grow_in_place():
    stream = TokenStream("r1", asyncio.get_running_loop(), lambda request_id: None, [1, 2])
    stream.put(RequestOutput("r1", "a", [5], logprobs=[TokenLogprob(5, -0.5, [(5, -0.5)])]))
    logprobs = stream.logprobs
    assert logprobs is not None and [e.token_id for e in logprobs] == [5]
    stream.put(RequestOutput("r1", "b", [6], logprobs=[TokenLogprob(6, -0.25, [])], finish_reason=FinishReason.STOP))
    assert stream.logprobs is logprobs  # appended to, not copied whole at every step
    assert [e.token_id for e in logprobs] == [5, 6] and stream.usage == Usage(2, 2)
    deltas = [d async for d in stream.deltas()]
    assert [d.text for d in deltas] == ["ab"] and [e.logprob for e in deltas[0].logprobs] == [-0.5, -0.25]


# -- 3. a full queue is waited out on the engine's steps, not by polling ---------------------------------
async def test_backpressure_waits_for_the_next_step_and_only_then_retries():
    steps = StepSignal()
    attempts: list[int] = []

    async def submit() -> str:
        attempts.append(len(attempts))
        if len(attempts) == 1:
            raise QueueFullError("full")
        return "queued"

    async with anyio.create_task_group() as group:
        results: list[str] = []

        async def job() -> None:
            results.append(await with_backpressure(submit, steps))

        group.start_soon(job)
        await anyio.wait_all_tasks_blocked()
        assert attempts == [0] and not results  # waiting on the signal, no retry loop running
        steps.notify()  # what a sink does on the engine thread after each step
    assert attempts == [0, 1] and results == ["queued"]
    with pytest.raises(QueueFullError):  # no engine, no signal: the error is the caller's
        await with_backpressure(submit_full, None)


async def submit_full() -> str:
    raise QueueFullError("full")


async def until(predicate) -> None:
    """Until the engine's counters say so (the engine runs on its own thread); bounded by the caller."""
    while not predicate():
        await asyncio.sleep(0.005)


async def test_a_job_waits_for_room_that_another_caller_frees(tiny_model, tiny_tokenizer):
    async with HuggingFaceLLM(
        model=tiny_model, tokenizer=tiny_tokenizer, device="cpu", max_batch_size=1, max_queue_size=1
    ) as llm:
        with anyio.fail_after(60):
            running = await llm.submit("Hello", max_tokens=400, ignore_eos=True)
            await until(lambda: llm.stats()["num_running"] == 1)
            waiting = await llm.submit("Hello", max_tokens=400, ignore_eos=True)
            with pytest.raises(QueueFullError):  # the row is taken and the queue holds the other
                await llm.submit("Hi", max_tokens=1)
            job = asyncio.ensure_future(llm.abatch_run(["a", "b"], max_tokens=2))
            await anyio.wait_all_tasks_blocked()
            assert not job.done()  # waiting for room, not failed
            waiting.close()  # room: the job goes on at the engine's next steps
            running.close()
            assert [isinstance(text, str) for text in await job] == [True, True]


async def test_leaving_a_job_early_aborts_what_is_in_flight(llm):
    async def run(index: int) -> str:  # the first prompt is done at once, the others run long
        return await llm.arun("Hello", max_tokens=1 if index == 0 else 400, ignore_eos=True)

    with anyio.fail_after(60):
        async for index, _ in map_prompts(run, range(3), window=3):
            assert index == 0
            await until(lambda: llm.stats()["num_running"] == 2)
            break  # the iterator is dropped without aclose: its finaliser ends the job
        await until(lambda: llm.stats()["num_running"] == 0 and llm.stats()["num_waiting"] == 0)
    assert llm.stats()["num_aborted"] == 2


# -- 4. defects found by real clients --------------------------------------------------------------------
def test_a_pydantic_class_is_a_named_json_schema():
    params = SamplingParams(response_format=Person)
    assert params.response_model is Person
    assert params.response_format == {
        "type": "json_schema", "json_schema": {"name": "Person", "schema": Person.model_json_schema()},
    }  # fmt: skip
    assert params.grammar is not None and json.loads(params.grammar.source) == Person.model_json_schema()
    assert params.merge(temperature=0.5).response_model is Person  # kept through copies
    assert params.merge(response_format=None).response_model is None  # and dropped with the format
    assert params.merge(response_format={"type": "json_object"}).response_model is None
    assert "response_model" not in params.to_dict() and params.to_dict()["response_format"]["json_schema"]["name"]
    with pytest.raises(TypeError, match="unknown sampling parameter 'response_model'"):
        SamplingParams().merge(response_model=Person)


async def test_completion_parsed_is_the_pydantic_object(llm):
    with anyio.fail_after(60):
        done = await llm.acomplete("Hello", response_format=Person, max_tokens=120)
        plain = await llm.acomplete("Hello", max_tokens=3)
        cut = await llm.acomplete("Hello", response_format=Person, max_tokens=3)
        pair = await llm.acomplete("Hi", response_format=Person, max_tokens=120, n=2, temperature=1.0, seed=1)
    assert done.finish_reason == "stop" and isinstance(done.parsed, Person)
    assert done.parsed == Person.model_validate_json(done.text)
    assert plain.parsed is None  # not asked
    assert cut.finish_reason == "length" and cut.parsed is None  # asked, but the JSON was cut off
    assert all(c.parsed == Person.model_validate_json(c.text) for c in pair)


async def test_a_pydantic_class_as_the_default_format(tiny_model, tiny_tokenizer):
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, response_format=Person) as typed:
        assert typed.sampling_defaults.response_model is Person
        with anyio.fail_after(60):
            assert isinstance((await typed.acomplete("Hi", max_tokens=120)).parsed, Person)


async def test_the_developer_role_is_sent_as_system(llm):
    developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert llm.encode(developer) == llm.encode(system)
    assert "developer" not in llm.tokenizer.decode(llm.encode(developer))
    # A system prompt is not added in front of a developer message (it is the system message).
    assert llm.encode(developer, system_prompt="Other.") == llm.encode(system, system_prompt="Other.")
    assert render_transcript(developer) == render_transcript(system) == "Be brief.\nUser: Hi\nAssistant:"


def test_device_keeps_the_callers_spelling(tiny_model, tiny_tokenizer):
    with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, device="cpu", max_tokens=2) as llm:
        device = llm.device
        assert device == "cpu" and isinstance(device, str) and str(device) == "cpu"
        assert device == torch.device("cpu") and llm.torch_device == torch.device("cpu")
        assert (device.type, device.index) == ("cpu", None) and {"cpu": 1}[device] == 1
        assert torch.zeros(1, device=device).device == llm.torch_device
        assert llm.track_resource_utilization()["rss_bytes"] > 0
    with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, max_tokens=2) as llm:
        assert llm.device == str(llm.torch_device)  # none given: the engine's own


def test_the_seed_documents_names_live_in_their_own_module():
    for name in ("set_temperature", "toggle_creative_mode", "generate", "generate_text", "time_to_first_token",
                 "throughput", "_sec_to_first_token", "repition_penalty", "stop_token", "beam_width"):  # fmt: skip
        assert name in vars(SeedDocumentNames), name
        assert name not in vars(BaseLLM) and name not in vars(HuggingFaceLLM), name
    assert "model_name" in vars(ModelNameAlias) and "model_name" not in vars(HuggingFaceLLM)


async def test_astream_refuses_n_at_the_call(llm):
    with pytest.raises(InvalidParameterError, match="astream returns one sequence") as info:
        llm.astream("Hi", n=2)
    assert info.value.param == "n"
