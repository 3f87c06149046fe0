"""JSON schemas are closed by default (no undeclared key, no key twice), ``additionalProperties: true``
is honoured, and ``strict`` is OpenAI's strict mode: checked on the schema rewrite, on the compiled
grammar token by token, and end to end over HTTP with an open pydantic schema."""

from __future__ import annotations

import copy
import json
from typing import Any

import anyio
import pytest
from pydantic import BaseModel, Field

from async_llm import InvalidParameterError, ParameterError, SamplingParams
from async_llm.json_schema import close_objects
from async_llm.llm.controls import GrammarCompiler
from async_llm.llm.tools import check_tools, tool_choice_schema
from tests.conftest import SERVED_MODEL

OPEN = {  # as pydantic writes a model: no additionalProperties
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 6}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["city"],
}


class City(BaseModel):
    name: str = Field(max_length=10)
    population: int = Field(ge=0, le=99_999)


class Trip(BaseModel):
    origin: City
    stops: list[City] = Field(max_length=2)


# -- the rewrite ---------------------------------------------------------------------------------------


def test_objects_that_list_properties_are_closed_at_every_depth() -> None:
    schema = Trip.model_json_schema()
    before = copy.deepcopy(schema)
    closed = close_objects(schema)
    assert schema == before  # the caller's schema is untouched
    assert closed["additionalProperties"] is False
    assert closed["$defs"]["City"]["additionalProperties"] is False
    nested = {
        "type": "object",
        "properties": {"a": {"anyOf": [{"type": "object", "properties": {}}, {"type": "null"}]}},
    }
    assert close_objects(nested)["properties"]["a"]["anyOf"][0]["additionalProperties"] is False
    assert close_objects({"type": "array", "items": OPEN})["items"]["additionalProperties"] is False


def test_what_says_otherwise_is_honoured() -> None:
    explicit = {**OPEN, "additionalProperties": True}
    assert close_objects(explicit) == explicit
    typed = {**OPEN, "additionalProperties": {"type": "integer"}}
    assert close_objects(typed) == typed
    assert close_objects({"type": "object"}) == {"type": "object"}  # a free dict stays free
    # allOf members stay open at their own level: closing each would forbid the others' keys.
    merged = {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}
    assert close_objects(merged) == merged


def test_a_required_key_the_properties_miss_stays_writable() -> None:
    closed = close_objects({"type": "object", "properties": {"a": {}}, "required": ["a", "b"]})
    assert closed["properties"] == {"a": {}, "b": {}} and closed["additionalProperties"] is False


def test_strict_requires_every_property_and_refuses_open_objects() -> None:
    strict = close_objects(OPEN, strict=True)
    assert strict["required"] == ["city", "n"] and strict["additionalProperties"] is False
    assert close_objects({"type": "object"}, strict=True) == {
        "type": "object",
        "additionalProperties": False,
        "properties": {},
        "required": [],
    }
    with pytest.raises(InvalidParameterError, match="strict") as info:
        close_objects({**OPEN, "additionalProperties": True}, strict=True, param="response_format")
    assert info.value.param == "response_format"


def _schema_of(params: SamplingParams) -> dict[str, Any]:
    assert params.grammar is not None
    return json.loads(params.grammar.source)


def test_response_format_and_guided_json_are_closed_and_strict_is_honoured() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": OPEN}}
    assert _schema_of(SamplingParams(response_format=fmt))["additionalProperties"] is False
    assert _schema_of(SamplingParams(guided_json=OPEN))["additionalProperties"] is False
    strict = {"type": "json_schema", "json_schema": {"name": "c", "schema": OPEN, "strict": True}}
    assert _schema_of(SamplingParams(response_format=strict))["required"] == ["city", "n"]
    open_strict = {**strict, "json_schema": {**strict["json_schema"], "schema": {**OPEN, "additionalProperties": True}}}
    for bad in (open_strict, {**strict, "json_schema": {**strict["json_schema"], "strict": "yes"}}):
        with pytest.raises(ParameterError) as info:
            SamplingParams(response_format=bad)
        assert info.value.param == "response_format"


def test_strict_tools() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": OPEN, "strict": True}}
    (checked,) = check_tools([tool])
    assert checked["function"]["strict"] is True
    assert tool_choice_schema([checked], {"type": "function", "function": {"name": "f"}}) == {
        **OPEN,
        "required": ["city", "n"],
        "additionalProperties": False,
    }
    (loose,) = check_tools([{**tool, "function": {**tool["function"], "strict": False}}])
    assert "strict" not in loose["function"]
    assert tool_choice_schema([loose], {"type": "function", "function": {"name": "f"}})["required"] == ["city"]
    for bad in ({"strict": "yes"}, {"strict": True, "parameters": {**OPEN, "additionalProperties": True}}):
        with pytest.raises(ParameterError) as info:
            check_tools([{**tool, "function": {**tool["function"], **bad}}])
        assert info.value.param == "tools"


# -- the grammar, token by token ---------------------------------------------------------------------------


async def _matcher(tokenizer: Any, schema: dict[str, Any]) -> Any:
    compiler = GrammarCompiler(tokenizer, len(tokenizer))
    grammar = SamplingParams(guided_json=schema).grammar
    assert grammar is not None
    (matcher,) = await compiler.matchers(grammar, 1)
    return matcher


def _takes(tokenizer: Any, matcher: Any, text: str) -> bool:
    """Whether the grammar takes ``text`` whole (the matcher is left as it was)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return bool(matcher.validate_tokens(ids) == len(ids))


async def test_the_grammar_refuses_an_extra_key_and_a_repeated_key(tiny_tokenizer) -> None:
    matcher = await _matcher(tiny_tokenizer, OPEN)
    assert _takes(tiny_tokenizer, matcher, '{"city": "Oslo", "n": 3}')
    assert _takes(tiny_tokenizer, matcher, '{"city": "Oslo"}')
    assert not _takes(tiny_tokenizer, matcher, '{"city": "Oslo", "x": 1}')  # an undeclared key
    assert not _takes(tiny_tokenizer, matcher, '{"city": "Oslo", "city": "Rome"}')  # a key twice
    assert not _takes(tiny_tokenizer, matcher, '{"city": "Oslo", "n": 3, "n": 4}')
    assert not _takes(tiny_tokenizer, matcher, '{"city": "Oslo", "cit\\u0079": "Rome"}')  # twice, escaped
    # Once the declared keys are written, the object can only end: the request ends with it.
    ids = tiny_tokenizer('{"city": "Oslo", "n": 3', add_special_tokens=False).input_ids
    assert matcher.consume_tokens(ids)
    assert not _takes(tiny_tokenizer, matcher, ', "')
    assert _takes(tiny_tokenizer, matcher, "}")


async def test_an_explicitly_open_schema_takes_extra_keys(tiny_tokenizer) -> None:
    matcher = await _matcher(tiny_tokenizer, {**OPEN, "additionalProperties": True})
    assert _takes(tiny_tokenizer, matcher, '{"city": "Oslo", "x": 1}')
    assert not _takes(tiny_tokenizer, matcher, '{"city": "Oslo", "city": "Rome"}')  # declared keys: once


# -- end to end ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_an_open_pydantic_schema_gives_complete_json(client, stream: bool) -> None:
    schema = City.model_json_schema()
    assert "additionalProperties" not in schema
    response_format = {"type": "json_schema", "json_schema": {"name": "City", "schema": schema}}
    with anyio.fail_after(90):
        if stream:
            chunks = await client.chat.completions.create(
                model=SERVED_MODEL, messages=[{"role": "user", "content": "A city?"}], max_tokens=60,
                response_format=response_format, stream=True,
            )  # fmt: skip
            parts, reasons = [], []
            async for chunk in chunks:
                parts += [c.delta.content or "" for c in chunk.choices]
                reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
            text, reason = "".join(parts), reasons[-1]
        else:
            response = await client.chat.completions.create(
                model=SERVED_MODEL, messages=[{"role": "user", "content": "A city?"}], max_tokens=60,
                response_format=response_format,
            )  # fmt: skip
            text, reason = response.choices[0].message.content or "", response.choices[0].finish_reason
    assert reason == "stop", text  # the object ended the request, not max_tokens
    city = City.model_validate_json(text)
    assert set(json.loads(text)) == {"name", "population"} and city.population <= 99_999
