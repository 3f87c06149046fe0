"""The call formats models write in ``tool_choice="auto"``: lists of calls (in a Hermes block, as
SmolLM2 was tuned to write them, or bare), Llama 3's ``"parameters"``, the markers some families open
their calls with, calls without arguments and with unicode arguments; parsed whole and streamed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from async_llm.llm.tool_stream import ToolCallStreamParser
from async_llm.llm.tools import parse_tool_calls
from tests.test_tools import TOOLS, _splits, _stream, arguments

SMOL_LIST = '<tool_call>[{"name": "get_time", "arguments": {}}]</tool_call>'
SMOL_TWO = (
    'Sure.\n<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Zürich 東京 🎉"}},\n'
    '{"name": "get_time"}\n]</tool_call>\n'
)


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (SMOL_LIST, None, [("get_time", {})]),  # the list form, a call without arguments
        (SMOL_TWO, "Sure.", [("get_weather", {"city": "Zürich 東京 🎉"}), ("get_time", {})]),
        ("<tool_call>[]</tool_call> No call is needed.", "No call is needed.", []),  # SmolLM2's "no call"
        ('<tool_call>[{"name": "get_weather", "parameters": {"city": "Lima"}}] </tool_call>', None,
         [("get_weather", {"city": "Lima"})]),  # Llama 3's spelling, in a list
        ('<tool_call>\n{"name": "get_time"}\n</tool_call>', None, [("get_time", {})]),
        ('[{"name": "get_time", "arguments": {}}]', None, [("get_time", {})]),
        ('[{"name": "get_weather", "parameters": {"city": "Z\\u00fcrich"}}] done', "done",
         [("get_weather", {"city": "Zürich"})]),
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]', None,
         [("get_weather", {"city": "Oslo"})]),  # Mistral's marker, when it reaches the text
        ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}', None,
         [("get_weather", {"city": "Oslo"})]),  # Llama 3.1's
        ('<|tool_call|>[{"name": "get_time", "arguments": {}}]', None, [("get_time", {})]),  # Granite's
    ],
)  # fmt: skip
def test_lists_spellings_and_markers_are_calls(text: str, content: str | None, calls: list[Any]) -> None:
    parsed_content, parsed = parse_tool_calls(text, TOOLS, "auto")
    assert parsed_content == content
    assert arguments(parsed) == calls
    for call in parsed:  # re-serialised as json.dumps writes it, unicode as itself
        text = call["function"]["arguments"]
        assert text == json.dumps(json.loads(text), ensure_ascii=False)


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>[{"name": "rm_rf", "arguments": {}}]</tool_call>',  # not a known tool
        '<tool_call>[{"name": "get_time"}, 3]</tool_call>',  # a list holding a non-call
        '<tool_call>[{"name": "get_time", "arguments": {}}</tool_call>',  # cut off
        "[TOOL_CALLS] nothing to call",
        '[TOOL_CALLS]{"answer": 42}',
        "[]",  # a bare empty list is an answer, not a block of no calls
    ],
)
def test_what_is_not_a_list_of_calls_stays_content(text: str) -> None:
    assert parse_tool_calls(text, TOOLS, "auto") == (text.strip(), [])


OUTPUTS = [
    SMOL_LIST,
    SMOL_TWO,
    "<tool_call>[]</tool_call> No call is needed.",
    'A <tool_call>[{"name": "get_weather", "parameters": {"city": "Lima"}}] x </tool_call> B',
    '<tool_call>[{"name": "rm_rf", "arguments": {}}]</tool_call> after',
    '<tool_call>[{"name": "get_weather", "arguments": {"city": "Z\\u00fcrich \\ud83c\\udf89"}}]</tool_call>',
    '<tool_call>[{"name": "get_time", "arguments": "{}"}, {"name": "get_weather", "arguments": {"city": "Rome"}}]',
    '[{"name": "get_time", "arguments": {}}]',
    '  [{"name": "get_weather", "parameters": {"city": "東京"}}, {"name": "get_time"}] and then text',
    '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
    '[TOOL_CALLS] [{"name": "rm_rf", "arguments": {}}]',
    "[TOOL_CALLS] nothing to call",
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}',
    "<|im_end|> is a special token's text",
    "[]",
    "[",
    "<|",
]


@pytest.mark.parametrize("text", OUTPUTS)
def test_stream_agrees_with_parse_for_any_split(text: str) -> None:
    content, calls = parse_tool_calls(text, TOOLS, "auto")
    for chunks in _splits(text):
        streamed, rebuilt, parser = _stream(chunks, "auto")
        assert streamed == content, chunks
        assert arguments(rebuilt) == arguments(calls) == arguments(parser.tool_calls), chunks
        for final, fresh in zip(parser.tool_calls, calls, strict=True):
            assert final["function"]["arguments"] == fresh["function"]["arguments"]


def test_a_list_streams_each_call_as_it_comes() -> None:
    parser = ToolCallStreamParser(TOOLS, "auto")
    assert parser.feed("<tool_call>[") == []
    head, args = parser.feed('{"name": "get_weather", "arguments": {"city": "Zü')
    assert head["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert args == {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Zü'}}]}
    assert parser.feed('rich"}}, {"name": "get_time", ') == [
        {"tool_calls": [{"index": 0, "function": {"arguments": 'rich"}'}}]},
    ]
    (second_head, second_args) = parser.feed('"arguments": {}}]</tool_call>')
    assert second_head["tool_calls"][0]["index"] == 1 and second_head["tool_calls"][0]["function"]["name"] == "get_time"
    assert second_args == {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}
    assert parser.finish() == []
    assert arguments(parser.tool_calls) == [("get_weather", {"city": "Zürich"}), ("get_time", {})]


def test_a_marker_is_held_back_until_it_is_known() -> None:
    parser = ToolCallStreamParser(TOOLS, "auto")
    assert parser.feed("[TOOL_") == [] and parser.feed("CALLS]") == []
    assert parser.feed('[{"name": "get_time"}]')[0]["tool_calls"][0]["function"]["name"] == "get_time"
    parser = ToolCallStreamParser(TOOLS, "auto")
    assert parser.feed("[") == [] and parser.feed("x") == [{"content": "[x"}]
