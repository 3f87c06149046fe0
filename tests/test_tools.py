"""Tool calling helpers: checks, schemas, parsing of finished outputs, and the streaming parser."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest

from async_llm.errors import InvalidParameterError, ParameterError, ParameterTypeError
from async_llm.llm.tool_stream import ToolCallStreamParser
from async_llm.llm.tools import (
    check_tool_choice,
    check_tools,
    history_for_template,
    parse_tool_calls,
    render_tools_prompt,
    template_uses_tools,
    tool_choice_schema,
)

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME: dict[str, Any] = {"type": "function", "function": {"name": "get_time"}}
TOOLS = check_tools([WEATHER, TIME])
NAMED = {"type": "function", "function": {"name": "get_weather"}}
CALL_ID = re.compile(r"call_[0-9a-f]{24}")


def arguments(calls: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


# --- check_tools / check_tool_choice / tool_choice_schema ---


def test_check_tools_normalises_copies() -> None:
    assert TOOLS[0] == WEATHER and TOOLS[0] is not WEATHER
    assert TOOLS[0]["function"]["parameters"] is not WEATHER["function"]["parameters"]
    assert TOOLS[1] == {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    }


@pytest.mark.parametrize(
    ("tools", "error"),
    [
        ("get_weather", ParameterTypeError),
        ([], InvalidParameterError),
        ([{"type": "function"}], ParameterTypeError),
        (["get_weather"], ParameterTypeError),
        ([{"type": "retrieval", "function": {"name": "f"}}], InvalidParameterError),
        ([{"type": "function", "function": {"name": 3}}], ParameterTypeError),
        ([{"type": "function", "function": {"name": " "}}], InvalidParameterError),
        ([WEATHER, WEATHER], InvalidParameterError),
        ([{"type": "function", "function": {"name": "f", "parameters": "{}"}}], ParameterTypeError),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], InvalidParameterError),
        ([{"type": "function", "function": {"name": "f", "parameters": {"default": object()}}}], ParameterTypeError),
        ([{"type": "function", "function": {"name": "f", "description": 1}}], ParameterTypeError),
    ],
)
def test_check_tools_rejects(tools: Any, error: type[ParameterError]) -> None:
    with pytest.raises(error, match="tools") as info:
        check_tools(tools)
    assert info.value.param == "tools"


def test_check_tool_choice() -> None:
    assert check_tool_choice(None, TOOLS) == "auto"
    assert check_tool_choice(None, []) == "none"
    assert check_tool_choice("auto", None) == "none"  # nothing to call
    for mode in ("none", "auto", "required"):
        assert check_tool_choice(mode, TOOLS) == mode
    assert check_tool_choice({"type": "function", "function": {"name": "get_time", "x": 1}}, TOOLS) == {
        "type": "function",
        "function": {"name": "get_time"},
    }


@pytest.mark.parametrize(
    ("choice", "tools", "error"),
    [
        ("always", TOOLS, InvalidParameterError),
        ("required", [], InvalidParameterError),
        ({"type": "function", "function": {"name": "nope"}}, TOOLS, InvalidParameterError),
        ({"type": "function"}, TOOLS, ParameterTypeError),
        ({"type": "other", "function": {"name": "get_time"}}, TOOLS, ParameterTypeError),
        (3, TOOLS, ParameterTypeError),
    ],
)
def test_check_tool_choice_rejects(choice: Any, tools: Any, error: type[ParameterError]) -> None:
    with pytest.raises(error, match="tool_choice") as info:
        check_tool_choice(choice, tools)
    assert info.value.param == "tool_choice"


def _validates(schema: dict[str, Any], value: Any) -> bool:
    jsonschema = pytest.importorskip("jsonschema")
    return bool(jsonschema.Draft202012Validator(schema).is_valid(value))


def test_tool_choice_schema() -> None:
    assert tool_choice_schema(TOOLS, "auto") is None and tool_choice_schema(TOOLS, "none") is None
    named = tool_choice_schema(TOOLS, NAMED)
    # The function's schema, closed to arguments it does not declare (as OpenAI's strict mode).
    assert named == {**WEATHER["function"]["parameters"], "additionalProperties": False}
    assert named is not None and _validates(named, {"city": "Paris"}) and not _validates(named, {"unit": "c"})
    assert not _validates(named, {"city": "Paris", "made_up": 1})
    required = tool_choice_schema(TOOLS, "required")
    assert required is not None
    good = [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}, {"name": "get_time", "arguments": {}}]
    assert _validates(required, good)
    for bad in (
        [],
        [{"name": "nope", "arguments": {}}],
        [{"name": "get_weather", "arguments": {"unit": "c"}}],  # misses the required city
        [{"name": "get_time"}],
        [{"name": "get_time", "arguments": {}, "extra": 1}],
        [{"name": "get_time", "arguments": {"zone": "x"}}],  # an undeclared argument
        {"name": "get_time", "arguments": {}},
    ):
        assert not _validates(required, bad), bad


# --- parse_tool_calls ---


def test_hermes_single_call_with_text() -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
    content, calls = parse_tool_calls(text, TOOLS, "auto")
    assert content == "Let me check."
    assert arguments(calls) == [("get_weather", {"city": "Zürich"})]
    assert CALL_ID.fullmatch(calls[0]["id"]) and calls[0]["type"] == "function"
    assert calls[0]["function"]["arguments"] == '{"city": "Zürich"}'  # json.dumps, ensure_ascii=False


def test_hermes_parallel_calls() -> None:
    text = (
        'A <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call> B '
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call> C'
    )
    content, calls = parse_tool_calls(text, TOOLS, "required")
    assert content == "A  B  C"
    assert arguments(calls) == [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert len({c["id"] for c in calls}) == 2


def test_unknown_names_and_malformed_json_stay_content() -> None:
    unknown = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    broken = '<tool_call>{"name": "get_time", "arguments": {</tool_call>'
    good = '<tool_call>{"name": "get_time"}</tool_call>'  # no arguments: {}
    content, calls = parse_tool_calls(f"x {unknown} {broken} {good}", TOOLS, "auto")
    assert content == f"x {unknown} {broken}"
    assert arguments(calls) == [("get_time", {})]
    assert parse_tool_calls('{"name": "rm_rf", "arguments": {}}', TOOLS, "auto") == (
        '{"name": "rm_rf", "arguments": {}}',
        [],
    )
    assert parse_tool_calls('{"name": "get_time", "arguments": ', TOOLS, "auto")[1] == []
    assert parse_tool_calls('{"name": "get_time", "arguments": "nope"}', TOOLS, "auto")[1] == []


def test_plain_json_fallback() -> None:
    text = ' {"name": "get_weather", "parameters": {"city": "Lima"}} '
    assert parse_tool_calls(text, TOOLS, "auto")[0] is None
    assert arguments(parse_tool_calls(text, TOOLS, "auto")[1]) == [("get_weather", {"city": "Lima"})]
    listed = '[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}]'
    assert arguments(parse_tool_calls(listed, TOOLS, "required")[1]) == [
        ("get_time", {}),
        ("get_weather", {"city": "Rome"}),
    ]
    mixed = '[{"name": "get_time", "arguments": {}}, {"name": "other", "arguments": {}}]'
    assert parse_tool_calls(mixed, TOOLS, "auto") == (mixed, [])
    assert parse_tool_calls('{"answer": 42}', TOOLS, "auto") == ('{"answer": 42}', [])


def test_named_and_none() -> None:
    content, calls = parse_tool_calls('\n{"city":  "Oslo"}', TOOLS, NAMED)
    assert content is None and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city":  "Oslo"}'}
    assert parse_tool_calls("not json", TOOLS, NAMED) == ("not json", [])
    text = ' <tool_call>{"name": "get_time", "arguments": {}}</tool_call> '
    assert parse_tool_calls(text, TOOLS, "none") == (text, [])
    assert parse_tool_calls(text, [], "auto") == (text, [])


def test_unclosed_last_block_counts() -> None:
    content, calls = parse_tool_calls('Hi <tool_call>{"name": "get_time", "arguments": {}}', TOOLS, "auto")
    assert content == "Hi" and arguments(calls) == [("get_time", {})]


# --- ToolCallStreamParser ---

OUTPUTS: list[tuple[str, Any]] = [
    ("Plain answer, no tools. a < b and <tools are nice> too.\n", "auto"),
    (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "c"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        "auto",
    ),
    ('<tool_call>{"arguments": {"city": "Q\\"uoted \\u00e9"}, "name": "get_weather"}</tool_call> after', "auto"),
    ('x <tool_call>{"name": "rm_rf", "arguments": {"a": 1}}</tool_call> y <tool_call>oops</tool_call>', "auto"),
    ('<tool_call>{"name": "get_time", "arguments": "{}"} trailing</tool_call>', "auto"),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}', "auto"),
    ('{"name": "get_weather", "parameters": {"city": "Lima", "n": [1, 2.5e3, null]}}', "auto"),
    ('{"answer": {"name": "get_time"}}  ', "auto"),
    ("[1, 2, 3] is a list", "auto"),
    ("{Hello} {{name}} <tool_call>{name}</tool_call>", "auto"),
    ('<tool_call>{"name": "get_time", "arguments": "not json"}</tool_call>', "auto"),
    ('{"note": "the \\"name\\": is", "name": "get_time"} then text', "auto"),
    ('  [{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "get_time", "arguments": {}}]', "required"),
    ('{"city": "Oslo", "unit": "f"}', NAMED),
    ('\n {"city": "Oslo"}\n\nDone.', NAMED),
    ("I refuse.", NAMED),
    ('  <tool_call>{"name": "get_time", "arguments": {}}</tool_call>  ', "none"),
]


def _splits(text: str) -> list[list[str]]:
    splits = [[text[i : i + n] for i in range(0, len(text), n)] for n in range(1, 8)]
    rng = random.Random(1234)
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, len(text) // 3)))
        splits.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return splits + [[text]]


def _stream(chunks: list[str], choice: Any) -> tuple[str | None, list[dict[str, Any]], ToolCallStreamParser]:
    """Feed ``chunks``; returns the content, calls rebuilt from the deltas, and the parser."""
    parser = ToolCallStreamParser(TOOLS, choice)
    deltas = [d for chunk in chunks for d in parser.feed(chunk)] + parser.finish()
    content, calls = "", dict[int, dict[str, str]]()
    for delta in deltas:
        assert len(delta) == 1
        if "content" in delta:
            assert isinstance(delta["content"], str) and delta["content"]
            content += delta["content"]
            continue
        (part,) = delta["tool_calls"]
        if "id" in part:  # the header: sent once, first, with the name
            assert part["index"] not in calls and part["index"] == len(calls)
            assert part["type"] == "function" and part["function"]["arguments"] == ""
            calls[part["index"]] = {"id": part["id"], "name": part["function"]["name"], "arguments": ""}
        else:
            assert set(part) == {"index", "function"} and set(part["function"]) == {"arguments"}
            calls[part["index"]]["arguments"] += part["function"]["arguments"]
    rebuilt = [{"id": c["id"], "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls.values()]
    return (content or None) if choice != "none" else content, rebuilt, parser


@pytest.mark.parametrize(("text", "choice"), OUTPUTS)
def test_stream_matches_parse_for_any_split(text: str, choice: Any) -> None:
    content, calls = parse_tool_calls(text, TOOLS, choice)
    for chunks in _splits(text):
        streamed, rebuilt, parser = _stream(chunks, choice)
        assert streamed == content, chunks
        assert arguments(rebuilt) == arguments(calls) == arguments(parser.tool_calls), chunks
        assert [c["id"] for c in rebuilt] == [c["id"] for c in parser.tool_calls]
        for final, fresh in zip(parser.tool_calls, calls):
            assert final["type"] == "function" and CALL_ID.fullmatch(final["id"])
            assert final["function"]["arguments"] == fresh["function"]["arguments"]


def test_stream_sends_arguments_as_they_come() -> None:
    parser = ToolCallStreamParser(TOOLS, "auto")
    assert parser.feed("Sure <tool") == [{"content": "Sure"}]
    assert parser.feed('_call>{"name": "get_weat') == []
    head, args = parser.feed('her", "arguments": {"ci')
    assert head["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert args == {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}
    assert parser.feed('ty": "Oslo"}}\n</tool_call>') == [
        {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]}
    ]
    assert parser.finish() == [] and arguments(parser.tool_calls) == [("get_weather", {"city": "Oslo"})]


def test_stream_holds_back_only_what_may_be_a_call() -> None:
    parser = ToolCallStreamParser(TOOLS, "auto")
    assert parser.feed("I think <tool") == [{"content": "I think"}]
    assert parser.feed("s are nice") == [{"content": " <tools are nice"}]
    parser = ToolCallStreamParser(TOOLS, "auto")
    assert parser.feed('{"answer": ') == [] and parser.feed("42}") == [{"content": '{"answer": 42}'}]
    parser = ToolCallStreamParser(TOOLS, "auto")
    assert parser.feed('[{"answer": 4') == [] and parser.finish() == [{"content": '[{"answer": 4'}]
    parser = ToolCallStreamParser(TOOLS, "auto")
    assert parser.feed('{"name": "nope", ') == [{"content": '{"name": "nope",'}]  # known not a call: out early
    parser = ToolCallStreamParser(TOOLS, "auto")
    assert parser.feed("{Hello") == [{"content": "{Hello"}]  # not JSON: out at once
    parser = ToolCallStreamParser(TOOLS, "none")
    assert parser.feed(" <tool") == [{"content": " <tool"}] and parser.finish() == []


def test_stream_named_sends_name_first() -> None:
    parser = ToolCallStreamParser(TOOLS, NAMED)
    (head,) = parser.feed(" {")[:1]
    assert head["tool_calls"][0]["function"]["name"] == "get_weather"
    assert parser.feed('"city": "Oslo"}') == [
        {"tool_calls": [{"index": 0, "function": {"arguments": '"city": "Oslo"}'}}]}
    ]
    assert parser.finish() == [] and parser.tool_calls[0]["function"]["arguments"] == '{"city": "Oslo"}'


def test_stream_drops_a_call_that_breaks_after_its_name() -> None:
    parser = ToolCallStreamParser(TOOLS, "auto")
    parser.feed('<tool_call>{"name": "get_weather", "arguments": {"city": "Os')
    assert parser.finish() == [] and parser.tool_calls == []
    parser = ToolCallStreamParser(TOOLS, "auto")
    deltas = parser.feed('<tool_call>{"name": "get_time", "arguments": {}</tool_call> ok')
    assert [list(d) for d in deltas] == [["tool_calls"], ["tool_calls"], ["content"]]  # header, "{}", "ok"
    assert parser.finish() == [] and parser.tool_calls == []


# --- templates and history ---


def test_render_tools_prompt() -> None:
    prompt = render_tools_prompt(TOOLS)
    listed = prompt.split("<tools>\n")[1].split("\n</tools>")[0]
    assert [json.loads(line) for line in listed.splitlines()] == TOOLS
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in prompt


def test_template_uses_tools() -> None:
    assert template_uses_tools("{%- if tools %}{{ tools | tojson }}{% endif %}{{ messages }}")
    assert template_uses_tools("{% for tool in tools %}{{ tool }}{% endfor %}")
    assert not template_uses_tools("{% for m in messages %}{{ m.tool_calls }} tools {% endfor %}")
    assert not template_uses_tools(None) and not template_uses_tools("")


def test_history_for_template() -> None:
    call: dict[str, Any] = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    call["function"]["arguments"] = '{"tz": "UTC"}'
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_time", "content": "12:00"},
        {"role": "assistant", "content": "Noon.", "tool_calls": None},
    ]
    converted = history_for_template(messages)
    assert converted[0] == messages[0]
    assert converted[1]["content"] == "" and converted[1]["tool_calls"][0]["function"]["arguments"] == {"tz": "UTC"}
    assert converted[1]["tool_calls"][0]["id"] == "call_1"
    assert converted[2] == messages[2]
    assert converted[3] == {"role": "assistant", "content": "Noon."}
    assert call["function"]["arguments"] == '{"tz": "UTC"}'  # the caller's messages are untouched
