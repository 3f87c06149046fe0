"""The BaseLLM / HuggingFaceLLM interface: settings, chat and history, metrics, event log."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import build_model, reference_ids

from async_llm import HuggingFaceLLM, InvalidParameterError
from async_llm.llm.chat import parse_history


@pytest.fixture
def sync_llm(tiny_model, tiny_tokenizer):
    with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, max_tokens=8) as llm:
        yield llm


SETTINGS = {
    "max_tokens": 7,
    "temperature": 0.5,
    "top_k": 5,
    "top_p": 0.9,
    "seed": 3,
    "frequency_penalty": 0.1,
    "presence_penalty": 0.2,
    "stop_token": "###",
    "length_penalty": 0.8,
    "max_length": 200,
    "do_sample": True,
    "early_stopping": True,
    "num_beams": 1,
    "repition_penalty": 1.1,
    "num_return_sequences": 1,
    "role": "user",
    "system_prompt": "Be brief.",
}


def test_constructor_settings_are_attributes_and_reach_sampling(tiny_model, tiny_tokenizer):
    with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, **SETTINGS) as llm:
        p = llm.sampling_defaults
        assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.seed) == (7, 0.5, 5, 0.9, 3)
        assert p.stop == ("###",) and llm.stop_token == ("###",)
        assert p.repetition_penalty == llm.repition_penalty == llm.repetition_penalty == 1.1
        assert (p.length_penalty, p.max_length, p.do_sample, p.early_stopping) == (0.8, 200, True, True)
        assert llm.beam_width == llm.num_beams == 1 and llm.num_return_sequences == 1
        assert llm.model_name == llm.model_id


def test_setters_validate_and_apply(sync_llm):
    sync_llm.set_temperature(0.3)
    sync_llm.set_top_k(4)
    sync_llm.set_top_p(0.5)
    sync_llm.set_max_tokens(3)
    sync_llm.set_stop_token(["a", "b"])
    sync_llm.set_seed(11)
    sync_llm.set_num_beams(2)
    sync_llm.set_length_penalty(1.5)
    sync_llm.set_early_stopping("never")
    sync_llm.set_do_sample(False)
    sync_llm.set_max_length(64)
    sync_llm.set_frequency_penalty(0.0)
    sync_llm.set_presence_penalty(0.0)
    sync_llm.set_role("system")
    p = sync_llm.sampling_defaults
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens, p.stop, p.seed) == (0.3, 4, 0.5, 3, ("a", "b"), 11)
    assert (p.num_beams, p.length_penalty, p.early_stopping, p.do_sample, p.max_length) == (2, 1.5, "never", False, 64)
    assert sync_llm.role == "system"
    for setter, bad in [
        (sync_llm.set_temperature, -1),
        (sync_llm.set_top_p, 0),
        (sync_llm.set_max_tokens, 0),
        (sync_llm.set_role, "wizard"),
        (sync_llm.set_num_beams, 0),
        (sync_llm.set_early_stopping, "sometimes"),
    ]:
        with pytest.raises(ValueError):
            setter(bad)
    assert sync_llm.sampling_defaults == p  # a refused value changes nothing


def test_max_tokens_setting_reaches_generation(sync_llm):
    sync_llm.set_max_tokens(4)
    sync_llm.set_stop_token(None)
    result = sync_llm._call_sync(sync_llm.acomplete, "Hello", ignore_eos=True)
    assert len(result.token_ids) == 4


def test_toggle_creative_mode_restores_previous_settings(sync_llm):
    sync_llm.set_temperature(0.2)
    before = sync_llm.sampling_defaults
    sync_llm.toggle_creative_mode(True)
    assert sync_llm.creative_mode and sync_llm.do_sample and sync_llm.temperature == 0.9 and sync_llm.top_p == 0.95
    sync_llm.toggle_creative_mode(True)  # twice: still one saved state
    sync_llm.toggle_creative_mode(False)
    assert sync_llm.sampling_defaults == before and not sync_llm.creative_mode


async def test_max_length_caps_prompt_plus_output(llm):
    prompt_len = len(llm.encode("Hello"))
    result = await llm.acomplete("Hello", max_length=prompt_len + 5, max_tokens=50, ignore_eos=True)
    assert len(result.token_ids) == 5 and result.finish_reason == "length"
    assert len(await llm.agenerate("Hello", max_length=prompt_len + 3, ignore_eos=True)) > 0
    with pytest.raises(ValueError, match="max_length"):
        await llm.arun("Hello", max_length=prompt_len)


async def test_eos_and_bos_token_overrides(tiny_model, tiny_tokenizer):
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, chat_template=False) as plain:
        ids = (await plain.acomplete("Hello", max_tokens=12, ignore_eos=True)).token_ids
    stop_at = ids[5]
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, chat_template=False, bos_token_id=1) as llm:
        assert llm.encode("Hello") == [1, *tiny_tokenizer("Hello").input_ids]
    async with HuggingFaceLLM(
        model=tiny_model, tokenizer=tiny_tokenizer, chat_template=False, eos_token_id=stop_at
    ) as llm:
        assert llm.eos_token_ids == {stop_at}
        result = await llm.acomplete("Hello", max_tokens=12)
        assert result.finish_reason == "stop" and result.token_ids[-1] == stop_at
        assert result.token_ids == reference_ids(tiny_model, result.prompt_token_ids, 12)[: len(result.token_ids)]


async def test_pad_token_id_changes_padding_only(tiny_model, tiny_tokenizer):
    prompts = ["Hello", "The quick brown fox jumps over the lazy dog."]
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, pad_token_id=5, max_tokens=10) as llm:
        assert llm.pad_token_id == 5
        texts = await llm.abatch_run(prompts, ignore_eos=True)
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, max_tokens=10) as llm:
        assert texts == await llm.abatch_run(prompts, ignore_eos=True)


async def test_chat_keeps_history_through_the_template(llm, tiny_tokenizer):
    llm.system_prompt = "Be brief."
    first = await llm.achat("Hello", max_tokens=4)
    second = await llm.achat("And then?", max_tokens=4)
    assert llm.history == [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": second},
    ]
    # The second turn saw the first exchange: its prompt is the template over the whole history.
    expected = llm.encode([{"role": "system", "content": "Be brief."}, *llm.history[:3]])
    assert (await llm.acomplete(llm.history[:3], max_tokens=1)).prompt_token_ids == expected
    llm.clear_history()
    assert llm.history == []


async def test_chat_with_explicit_history_as_text_or_messages(llm):
    text = "User: hi there\nAssistant: hello!\nhow can I help?\nUser: tell me more"
    assert parse_history(text) == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello!\nhow can I help?"},
        {"role": "user", "content": "tell me more"},
    ]
    assert parse_history("just some notes") == [{"role": "system", "content": "Conversation so far:\njust some notes"}]
    reply_text = await llm.achat("ok?", history=text, max_tokens=3)
    reply_msgs = await llm.achat("ok?", history=parse_history(text), max_tokens=3)
    assert reply_text == reply_msgs
    assert len(llm.history) == 4  # each exchange appended to llm.history
    with pytest.raises(ValueError, match="n"):
        await llm.achat("hi", n=2)


def test_sync_chat_and_generate(sync_llm):
    reply = sync_llm.chat("Hello")
    assert sync_llm.history[-1] == {"role": "assistant", "content": reply}
    assert sync_llm.generate("Hello", max_length=len(sync_llm.encode("Hello")) + 2) == sync_llm.run(
        "Hello", max_tokens=2
    )


async def test_metrics_per_request_and_aggregated(llm, tiny_tokenizer):
    assert llm._tokens_per_second() == 0.0 and llm.get_generation_time() == 0.0
    await llm.arun("Hello", max_tokens=10, ignore_eos=True)
    assert llm._tokens_per_second() > 0
    assert 0 < llm.get_time_to_first_token() <= llm.get_generation_time()
    assert llm._num_tokens("hello world") == len(tiny_tokenizer("hello world", add_special_tokens=False).input_ids)
    metrics = llm.metrics()
    assert metrics["requests"] == 1 and metrics["output_tokens"] == 10
    assert metrics["engine"]["tokens_generated"] == 10 and metrics["engine"]["engine_tokens_per_second"] > 0
    assert metrics["ttft_p50"] is not None and metrics["latency_p95"] >= metrics["latency_p50"]


def test_time_for_generation_and_resources(sync_llm):
    assert sync_llm._time_for_generation("Hello") > 0
    usage = sync_llm.track_resource_utilization()
    assert usage["rss_bytes"] > 10_000_000 and "cpu_percent" in usage and "system_memory_percent" in usage


async def test_event_log_writes_json_lines_and_flushes_on_close(tiny_model, tiny_tokenizer, tmp_path):
    path = tmp_path / "logs" / "model.log"
    llm = HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, max_tokens=3)
    llm.enable_logging(path)
    await llm.arun("Hello")
    llm.log_event("checkpoint reached", step=3)
    await llm.aclose()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    names = [e["event"] for e in events]
    assert "admitted" in names and "finished" in names and "checkpoint reached" in names
    assert next(e for e in events if e["event"] == "checkpoint reached")["step"] == 3
    # The event log's handler is detached on close; the library's own NullHandler stays.
    assert all(isinstance(h, logging.NullHandler) for h in logging.getLogger("async_llm").handlers)


def test_a_dispatched_model_passed_in_with_a_device_is_refused(tiny_tokenizer):
    """An explicit ``device`` moves a model passed in (checked on CUDA by the device check); one that
    accelerate dispatched over devices cannot move, and says so before anything starts."""
    model = build_model(len(tiny_tokenizer))
    model.hf_device_map = {"": "cpu"}  # as accelerate's dispatch leaves it
    with pytest.raises(InvalidParameterError) as info:
        HuggingFaceLLM(model=model, tokenizer=tiny_tokenizer, device="cpu")
    assert info.value.param == "device"


async def test_max_batch_size_none_is_resolved_by_the_engine(tiny_model, tiny_tokenizer):
    """None (the default) leaves the row count to the engine (32 with the CPU runners); the front
    end's batch window reads the engine's value."""
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, device="cpu", runner="fast") as llm:
        assert llm._engine_config.max_batch_size is None
        assert llm.engine.scheduler.max_batch_size == 32
        assert llm._batch_window() == 64
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, max_batch_size=3, max_queue_size=1) as llm:
        assert llm.engine.scheduler.max_batch_size == 3 and llm._batch_window() == 4
