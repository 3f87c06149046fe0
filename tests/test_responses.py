"""``/v1/responses`` through the official client: the same text as chat completions, input items
and tool results fed back, forced tools and JSON schemas, the stream's events, stored responses
(``previous_response_id``), refusals naming what cannot be done, and an Agents-SDK agent."""

from __future__ import annotations

import json

import anyio
import openai
import pytest

from tests.conftest import SERVED_MODEL as MODEL

WEATHER = {
    "type": "function", "name": "get_weather", "description": "The weather of a city.",
    "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
        "required": ["city"],
    },  # an enum: the random model's forced arguments end within a few tokens
}  # fmt: skip


async def test_a_response_says_what_the_chat_completion_says(client, llm):
    with anyio.fail_after(30):
        response = await client.responses.create(
            model=MODEL, input="Hello there", instructions="Be brief.", max_output_tokens=12
        )
        expected = await llm.acomplete(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}], max_tokens=12
        )
    assert response.output_text == expected.text and response.object == "response"
    assert response.usage.input_tokens == len(expected.prompt_token_ids)
    assert response.usage.output_tokens == len(expected.token_ids)
    if expected.finish_reason == "length":
        assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    else:
        assert response.status == "completed"


async def test_items_and_tool_results_are_the_conversation(client, llm):
    items = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
    ]
    chat = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
    ]  # fmt: skip
    with anyio.fail_after(30):
        response = await client.responses.create(model=MODEL, input=items, tools=[WEATHER], max_output_tokens=10)
        expected = await client.chat.completions.create(
            model=MODEL, messages=chat, max_tokens=10,
            tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}],
        )  # fmt: skip
    assert response.output_text == (expected.choices[0].message.content or "")


async def test_forced_tools_and_json_schemas_are_honoured(client):
    with anyio.fail_after(60):
        called = await client.responses.create(
            model=MODEL, input="Weather in Paris?", tools=[WEATHER], tool_choice="required", max_output_tokens=200
        )
        schema = {
            "type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
            "required": ["answer"], "additionalProperties": False,
        }  # fmt: skip
        structured = await client.responses.create(
            model=MODEL, input="Answer in JSON", max_output_tokens=200,
            text={"format": {"type": "json_schema", "name": "reply", "schema": schema, "strict": True}},
        )  # fmt: skip
    calls = [item for item in called.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id
    assert set(json.loads(calls[0].arguments)) == {"city"}
    assert json.loads(structured.output_text)["answer"] in ("yes", "no")


async def test_the_stream_sends_the_documented_events_in_order(client):
    with anyio.fail_after(30):
        whole = await client.responses.create(model=MODEL, input="Stream this", max_output_tokens=10)
        stream = await client.responses.create(model=MODEL, input="Stream this", max_output_tokens=10, stream=True)
        events = [event async for event in stream]
        tool_stream = await client.responses.create(
            model=MODEL, input="Weather?", tools=[WEATHER], tool_choice="required", max_output_tokens=200, stream=True
        )
        tool_events = [event async for event in tool_stream]
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text
    tool_kinds = [e.type for e in tool_events]
    assert (
        "response.function_call_arguments.delta" in tool_kinds and "response.function_call_arguments.done" in tool_kinds
    )
    done = next(e for e in tool_events if e.type == "response.function_call_arguments.done")
    assert set(json.loads(done.arguments)) == {"city"}


async def test_previous_response_id_continues_the_conversation(client, llm):
    with anyio.fail_after(30):
        first = await client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=6)
        second = await client.responses.create(
            model=MODEL, input="What is my name?", previous_response_id=first.id, max_output_tokens=6
        )
        history = [
            {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "What is my name?"},
        ]  # fmt: skip
        expected = await llm.arun(history, max_tokens=6)
        kept = await client.responses.retrieve(second.id)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.responses.create(model=MODEL, input="x", previous_response_id="resp_nothing")
        unstored = await client.responses.create(model=MODEL, input="x", store=False, max_output_tokens=2)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(unstored.id)
    assert second.output_text == expected and kept.id == second.id and kept.output_text == second.output_text
    assert missing.value.body["param"] == "previous_response_id"


def test_the_store_keeps_the_most_recent_responses(llm):
    from async_llm.serve.responses import ResponsesAPI, ResponsesRequest
    from async_llm.serve.serving import OpenAIServing

    api = ResponsesAPI(OpenAIServing(llm), max_stored=2)
    for n in range(3):
        api._store(ResponsesRequest(input="x"), {"id": f"r{n}"}, [], {"role": "assistant", "content": "y"})
    assert list(api._stored) == ["r1", "r2"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"input": [{"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"type": "web_search_call", "id": "w"}]}, "input[0].type"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
        ({"input": "x", "text": {"format": {"type": "grammar"}}}, "text.format.type"),
    ],
)
async def test_what_cannot_be_done_is_a_400_naming_it(client, body, param):
    with anyio.fail_after(10), pytest.raises(openai.BadRequestError) as refused:
        await client.post("/responses", body={"model": MODEL, **body}, cast_to=object)
    assert refused.value.body["param"] == param


@pytest.mark.slow
async def test_an_agents_sdk_agent_calls_a_tool_through_the_server():
    """The Agents SDK's default model (the Responses API), on the default model: a forced call of
    the tool, its result fed back, then the agent's answer."""
    agents = pytest.importorskip("agents", reason="needs openai-agents (the test extra)")
    from async_llm import HuggingFaceLLM
    from async_llm.serve import create_app
    from async_llm.serve.server import running_server

    agents.set_tracing_disabled(True)
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather of a city."""
        calls.append(city)
        return f"It is sunny in {city}."

    async with (
        HuggingFaceLLM(device="cpu") as llm,
        running_server(create_app(llm, model_name="m")) as url,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client,
    ):
        agent = agents.Agent(
            name="weather", instructions="Answer with the tool.", tools=[get_weather],
            model=agents.OpenAIResponsesModel(model="m", openai_client=client),
            model_settings=agents.ModelSettings(tool_choice="required", max_tokens=128), reset_tool_choice=True,
        )  # fmt: skip
        with anyio.fail_after(120):
            result = await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=4)
    assert calls == ["Paris"]  # the tool ran, with the argument from the question
    assert isinstance(result.final_output, str) and result.final_output
