"""Tools and chat-template variables on the Python chat API (the tiny model; HTTP is in
tests/test_server_features.py)."""

from __future__ import annotations

import copy
import json

import anyio
import jsonschema
import pytest

from async_llm import HuggingFaceLLM, ParameterError
from tests.test_server_features import TIME, WEATHER

QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


async def test_a_named_tool_choice_gives_a_call_whose_arguments_parse(llm):
    with anyio.fail_after(60):
        done = await llm.acomplete(QUESTION, tools=[WEATHER, TIME], tool_choice=NAMED, max_tokens=60)
        streamed = "".join(
            [d async for d in llm.astream(QUESTION, tools=[WEATHER, TIME], tool_choice=NAMED, max_tokens=60)]
        )
    assert done.finish_reason == "tool_calls" and done.content is None
    (call,) = done.tool_calls
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    assert json.loads(streamed) == json.loads(done.text)  # astream gives the raw text


async def test_tools_reach_the_prompt_through_the_template_or_the_system_message(llm, tiny_model, tiny_tokenizer):
    plain = llm.tokenizer.decode(llm.encode(QUESTION))
    described = llm.tokenizer.decode(llm.encode(QUESTION, tools=_checked([WEATHER])))
    assert "<tools>" not in plain and "<tools>" in described and "get_weather" in described
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t['function']['name'] }};{% endfor %}{% endif %}"
        "{% if enable_thinking %}THINK{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tokenizer, device="cpu", max_tokens=4) as own:
        text = own.tokenizer.decode(
            own.encode(QUESTION, tools=_checked([WEATHER]), chat_template_kwargs={"enable_thinking": True})
        )
        assert text.startswith("TOOLS:get_weather;THINK") and "<tools>" not in text
        with anyio.fail_after(30):
            result = await own.acomplete(QUESTION, chat_template_kwargs={"enable_thinking": True})
        assert own.tokenizer.decode(result.prompt_token_ids).startswith("THINK")


async def test_tool_calls_and_results_in_the_history(llm):
    history = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'},
    ]  # fmt: skip
    with anyio.fail_after(30):
        done = await llm.acomplete(history, tools=[WEATHER], tool_choice="none", max_tokens=4)
    assert done.tool_calls is None and done.finish_reason in ("stop", "length")
    assert "clear" in llm.tokenizer.decode(done.prompt_token_ids)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": 3}}]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
        ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": ["x"]}, "chat_template_kwargs"),
    ],
)
async def test_bad_tools_are_typed_errors_before_queueing(llm, kwargs, param):
    with pytest.raises(ParameterError) as info:
        await llm.acomplete(QUESTION, **kwargs)
    assert info.value.param == param
    assert llm.stats()["num_waiting"] == 0 and llm.stats()["num_running"] == 0


def _checked(tools):
    from async_llm.llm.tool_use import tool_use

    return tool_use(tools, None, {})
