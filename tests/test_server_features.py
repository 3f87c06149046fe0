"""Structured output, logprobs, token controls and tool calling over HTTP with the official client,
and the server's policy: every known OpenAI and vLLM request field is honoured or refused by name."""

from __future__ import annotations

import json
import math
from typing import Any

import anyio
import httpx
import jsonschema
import pytest

from tests.conftest import SERVED_MODEL
from tests.test_structured_output import PERSON, ROOM

MODEL = SERVED_MODEL
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


# -- structured output ----------------------------------------------------------------------------------
async def test_response_format_and_guided_fields(client):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    with anyio.fail_after(60):
        chat = await client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=ROOM, response_format=response_format
        )
        choice = await client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=8, extra_body={"guided_choice": ["sunny", "rainy"]}
        )
        regex = await client.completions.create(
            model=MODEL, prompt="Code:", max_tokens=16, extra_body={"guided_regex": "[A-Z]{2}[0-9]{3}"}
        )
        streamed = client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=ROOM, stream=True, extra_body={"guided_json": PERSON}
        )
        text = "".join([c.choices[0].delta.content or "" async for c in await streamed if c.choices])
    jsonschema.validate(json.loads(chat.choices[0].message.content), PERSON)
    assert choice.choices[0].message.content in ("sunny", "rainy")
    assert len(regex.choices[0].text) == 5 and regex.choices[0].text[:2].isupper()
    jsonschema.validate(json.loads(text), PERSON)


# -- logprobs -------------------------------------------------------------------------------------------
async def test_chat_logprobs_equal_the_engines_streamed_or_not(client, llm):
    with anyio.fail_after(60):
        whole = await client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=8, logprobs=True, top_logprobs=3
        )
        stream = await client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=8, logprobs=True, top_logprobs=3, stream=True
        )
        streamed = [lp async for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                    for lp in chunk.choices[0].logprobs.content]  # fmt: skip
        expected = await llm.acomplete(CHAT, max_tokens=8, logprobs=True, top_logprobs=3)
    content = whole.choices[0].logprobs.content
    assert len(content) == len(expected.token_ids) == len(streamed)
    for got, piece, want in zip(content, streamed, expected.logprobs, strict=True):
        assert got.token == piece.token == want.token
        assert math.isclose(got.logprob, want.logprob, abs_tol=1e-5)
        assert math.isclose(piece.logprob, want.logprob, abs_tol=1e-5)
        assert [t.token for t in got.top_logprobs] == [t.token for t in want.top_logprobs]
        assert got.bytes == piece.bytes == want.bytes


async def test_completion_logprobs_echo_and_prompt_logprobs(url, llm):
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 6, "logprobs": 2, "echo": True}
    async with httpx.AsyncClient(timeout=60) as http:
        with anyio.fail_after(60):
            response = (await http.post(f"{url}/v1/completions", json=body)).json()
            vllm_style = (
                await http.post(f"{url}/v1/completions", json={**body, "echo": False, "prompt_logprobs": 1})
            ).json()
    expected = await llm.acomplete("The quick brown fox", chat_template=False, max_tokens=6, logprobs=True)
    choice = response["choices"][0]
    assert choice["text"] == "The quick brown fox" + expected.text
    logprobs = choice["logprobs"]
    prompt_len = len(expected.prompt_token_ids)
    assert len(logprobs["tokens"]) == prompt_len + len(expected.token_ids)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"][1:])
    generated = logprobs["token_logprobs"][prompt_len:]
    assert generated == pytest.approx([lp.logprob for lp in expected.logprobs], abs=1e-5)
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    positions = vllm_style["choices"][0]["prompt_logprobs"]
    assert len(positions) == prompt_len and positions[0] is None
    for position, token in zip(positions[1:], expected.prompt_token_ids[1:], strict=True):
        assert str(token) in position and len(position) <= 2


async def test_token_controls_over_http(client, llm):
    plain = await llm.acomplete(CHAT, max_tokens=8, ignore_eos=True)
    third = plain.token_ids[2]
    with anyio.fail_after(60):
        stopped = await client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=8, extra_body={"stop_token_ids": [third], "ignore_eos": True}
        )
        biased = await client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=3, logit_bias={str(third): 100}
        )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == plain.token_ids.index(third) + 1
    assert biased.choices[0].message.content == llm.tokenizer.decode([third] * 3)


# -- tool calling ---------------------------------------------------------------------------------------
async def test_named_and_required_tool_choice_give_calls_that_parse(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    with anyio.fail_after(60):
        one = await client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=60, tools=[WEATHER, TIME], tool_choice=named
        )
        required = await client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=120, tools=[WEATHER, TIME], tool_choice="required"
        )
    choice = one.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    calls = required.choices[0].message.tool_calls
    assert required.choices[0].finish_reason == "tool_calls" and calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


async def test_streamed_tool_call_arguments_add_up(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    with anyio.fail_after(60):
        whole = await client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=60, tools=[WEATHER], tool_choice=named
        )
        stream = await client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=60, tools=[WEATHER], tool_choice=named, stream=True
        )
        chunks = [c async for c in stream if c.choices]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    assert sum(1 for d in deltas if d.id) == 1
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(arguments) == json.loads(whole.choices[0].message.tool_calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_tool_results_in_the_history_are_accepted(client):
    history = [
        *CHAT,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'},
    ]
    with anyio.fail_after(60):
        answer = await client.chat.completions.create(
            model=MODEL, messages=history, max_tokens=6, tools=[WEATHER], tool_choice="none"
        )
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].finish_reason in ("stop", "length")


# -- nothing is silently ignored ------------------------------------------------------------------------
# Every known field of OpenAI's and vLLM's chat API, with a value that is not its neutral one. Each is
# either honoured (200, and tested for effect above or in tests/test_server.py) or refused (400 naming it).
HONOURED = {
    "frequency_penalty": 0.5, "presence_penalty": 0.5, "logit_bias": {"5": 1.0}, "logprobs": True,
    "top_logprobs": 2, "max_completion_tokens": 4, "max_tokens": 4, "n": 2, "seed": 1,
    "stop": ["x"], "temperature": 0.5, "top_p": 0.9, "response_format": {"type": "json_object"},
    "stream_options": None, "user": "u", "store": True, "metadata": {"k": "v"}, "service_tier": "auto",
    "prompt_cache_key": "k", "safety_identifier": "s", "tools": [WEATHER], "tool_choice": "auto",
    "parallel_tool_calls": False, "top_k": 3, "min_p": 0.1, "repetition_penalty": 1.1,
    "stop_token_ids": [5], "include_stop_str_in_output": True, "ignore_eos": True, "min_tokens": 1,
    "skip_special_tokens": False, "prompt_logprobs": 1, "allowed_token_ids": [5, 6, 7],
    "bad_words": ["x"], "chat_template_kwargs": {"enable_thinking": False}, "guided_json": {"type": "object"},
    "guided_regex": "[a-z]+", "guided_choice": ["a"], "guided_grammar": 'start: "a"', "best_of": 2,
}  # fmt: skip
REFUSED = {
    "functions": [{"name": "f"}], "function_call": {"name": "f"}, "audio": {"voice": "alloy"},
    "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "low", "verbosity": "low", "web_search_options": {}, "use_beam_search": True,
    "length_penalty": 2.0, "spaces_between_special_tokens": False, "truncate_prompt_tokens": 3,
    "add_generation_prompt": False, "continue_final_message": True, "add_special_tokens": True,
    "documents": [{"text": "x"}], "chat_template": "{{ messages }}", "mm_processor_kwargs": {"a": 1},
    "structural_tag": "{}", "structured_outputs": {"json": {}}, "guided_decoding_backend": "xgrammar",
    "guided_whitespace_pattern": " ", "priority": 1, "logits_processors": ["x"],
    "return_tokens_as_token_ids": True, "cache_salt": "s", "kv_transfer_params": {}, "vllm_xargs": {},
    "echo": True,
}  # fmt: skip


@pytest.mark.parametrize(("field", "value"), sorted({**HONOURED, **REFUSED}.items()))
async def test_every_known_field_is_honoured_or_refused(url, field, value):
    body: dict[str, Any] = {"model": MODEL, "messages": CHAT, "max_tokens": 4, field: value}
    if field == "best_of":
        body["n"] = 2
    if field in ("logprobs", "top_logprobs"):
        body.update(logprobs=True)
    async with httpx.AsyncClient(timeout=60) as http:
        with anyio.fail_after(60):
            response = await http.post(f"{url}/v1/chat/completions", json=body)
    if field in REFUSED:
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == field
    else:
        assert response.status_code == 200, response.text
