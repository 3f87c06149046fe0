"""ChatAsyncLLM beyond the standard suites, on the tiny model: a shared engine, the same text as
the engine, typed errors, tool calls and structured output in both directions, cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("langchain_core", reason="needs the langchain extra")

from langchain_core.messages import AIMessage, HumanMessage
from pydantic import BaseModel

from async_llm import HuggingFaceLLM, InvalidParameterError
from async_llm.integrations.langchain import ChatAsyncLLM

pytestmark = pytest.mark.langchain

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


class City(BaseModel):
    name: str
    population: int


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


async def test_two_chat_models_share_one_engine_and_say_what_it_says(tiny_model, tiny_tokenizer):
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, device="cpu") as llm:
        short, long = ChatAsyncLLM(llm=llm, max_tokens=6), ChatAsyncLLM(llm=llm, max_tokens=12)
        message = await long.ainvoke([HumanMessage(CHAT[0]["content"])])
        assert message.content == await llm.arun(CHAT, max_tokens=12)
        assert message.usage_metadata is not None and message.usage_metadata["output_tokens"] <= 12
        assert message.response_metadata["finish_reason"] in ("stop", "length")
        streamed = [chunk async for chunk in short.astream(CHAT[0]["content"])]
        assert "".join(str(c.content) for c in streamed) == await llm.arun(CHAT, max_tokens=6)
        assert streamed[-1].chunk_position == "last" and streamed[-1].usage_metadata is not None
        assert not llm.closed  # an engine passed in is the caller's: never closed by the chat models


async def test_bad_input_is_the_engines_typed_error_naming_the_parameter(tiny_model, tiny_tokenizer):
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, device="cpu") as llm:
        chat = ChatAsyncLLM(llm=llm, temperature=-1.0)
        with pytest.raises(InvalidParameterError) as raised:
            await chat.ainvoke("Hi")
        assert raised.value.param == "temperature"
        assert llm.stats()["num_running"] == 0 and llm.stats()["num_waiting"] == 0


async def test_forced_tools_and_schemas_are_honoured_by_the_grammar(tiny_model, tiny_tokenizer):
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, device="cpu") as llm:
        chat = ChatAsyncLLM(llm=llm, max_tokens=200)
        message = await chat.bind_tools([add], tool_choice="add").ainvoke("What is 2 + 3?")
        assert isinstance(message, AIMessage) and message.tool_calls
        call = message.tool_calls[0]
        assert call["name"] == "add" and set(call["args"]) == {"a", "b"}
        assert all(isinstance(v, int) for v in call["args"].values())  # the schema's types, from a random model
        full: Any = None
        async for chunk in chat.bind_tools([add], tool_choice="any").astream("What is 2 + 3?"):
            full = chunk if full is None else full + chunk
        assert full.tool_calls and full.tool_calls[0]["name"] == "add"
        result = await chat.with_structured_output(City, include_raw=True).ainvoke("Name a city.")
        if result["parsed"] is not None:  # the random model may run out of tokens inside a string
            assert isinstance(result["parsed"], City)
        else:
            assert result["raw"].response_metadata["finish_reason"] == "length"


async def test_a_stream_left_early_aborts_its_request(tiny_model, tiny_tokenizer):
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, device="cpu") as llm:
        chat = ChatAsyncLLM(llm=llm, max_tokens=400, model_kwargs={"ignore_eos": True})
        stream = chat.astream("Hi")
        await stream.__anext__()
        await stream.aclose()
        for _ in range(200):
            stats = llm.stats()
            if stats["num_aborted"] == 1 and stats["num_running"] == 0:
                break
            await asyncio.sleep(0.05)
        assert llm.stats()["num_aborted"] == 1 and llm.stats()["num_running"] == 0


def test_sync_methods_work_inside_a_running_loop_and_shared_engines_close(tiny_model_dir):
    chat = ChatAsyncLLM(model=str(tiny_model_dir), engine_kwargs={"device": "cpu"}, max_tokens=5)
    other = ChatAsyncLLM(model=str(tiny_model_dir), engine_kwargs={"device": "cpu"}, max_tokens=5)
    text = chat.invoke("Hello").content
    assert [c.content for c in other.stream("Hello")] and other.invoke("Hello").content == text
    assert chat._engine() is other._engine()  # one engine for the same model and options

    async def inside_a_loop() -> str:
        return str(chat.invoke("Hello").content)  # as in a notebook cell

    assert asyncio.run(inside_a_loop()) == text
    engine = chat._engine()
    ChatAsyncLLM.close_shared_engines()
    assert engine.closed


async def test_logprobs_when_asked_in_whole_and_streamed_answers(tiny_model, tiny_tokenizer):
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, device="cpu") as llm:
        chat = ChatAsyncLLM(llm=llm, max_tokens=5, logprobs=True, top_logprobs=2, model_kwargs={"ignore_eos": True})
        message = await chat.ainvoke("Hi")
        entries = message.response_metadata["logprobs"]["content"]
        assert len(entries) == 5 and all(len(e["top_logprobs"]) == 2 for e in entries)
        assert "".join(e["token"] for e in entries) == message.content
        streamed = [chunk async for chunk in chat.astream("Hi")]
        assert sum(len(c.response_metadata.get("logprobs", {}).get("content", [])) for c in streamed) == 5
        assert "logprobs" not in (await ChatAsyncLLM(llm=llm, max_tokens=3).ainvoke("Hi")).response_metadata
