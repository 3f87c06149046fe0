"""OpenAI-style tool calling: check ``tools``/``tool_choice``, constrain, parse and stream the calls.

Models are prompted in the Hermes format (Qwen2.5, Hermes): ``<tool_call>{"name": ..., "arguments": {...}}
</tool_call>``. What is read as calls:

- Hermes blocks holding one call object or a JSON list of them (``<tool_call>[{...}, {...}]</tool_call>``,
  the list form SmolLM2 was tuned on; ``<tool_call>[]</tool_call>`` is "no call");
- an output that is a bare JSON call or list of calls (Llama 3's JSON tool format, and the JSON an
  enforced ``tool_choice`` produces, see :func:`tool_choice_schema`), also after the marker some
  families open their calls with when it reaches the text (Mistral's ``[TOOL_CALLS]``, Llama 3.1's
  ``<|python_tag|>``, Granite's ``<|tool_call|>``);
- a call is ``{"name": <a tool>, "arguments": {...}}``; Llama 3 spells the arguments ``"parameters"``,
  some models send them as a JSON string, and a call without them takes none.

What is not a well-formed call of a known tool stays content: a model's output never makes these
helpers raise.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from async_llm.errors import InvalidParameterError, ParameterTypeError
from async_llm.json_schema import close_objects

Delta = dict[str, Any]
ToolChoice = str | dict[str, Any]

OPEN, CLOSE = "<tool_call>", "</tool_call>"
#: Markers that open a JSON call or list of calls at the start of an output, when the tokenizer
#: does not treat them as special tokens (which are left out of the text).
MARKERS = ("[TOOL_CALLS]", "<|python_tag|>", "<|tool_call|>")
# An unclosed last block still counts: models often stop right after the JSON.
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
# Llama-style calls name their arguments "parameters". The value must have begun (\S) to be located.
_ARGS_KEY = re.compile(r'"(?:arguments|parameters)"\s*:\s*(?=\S)')
_WS = re.compile(r"\s*")
_JINJA_TAG = re.compile(r"\{[{%](.*?)[%}]\}", re.DOTALL)
_TOOLS_VAR = re.compile(r"\btools\b")
_DECODER = json.JSONDecoder()
# Partial strings are left out, so a "name" that shows up is complete (not "get_wea" of "get_weather").
_CHOICES = ("none", "auto", "required")


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """Validate OpenAI ``tools``: ``[{"type": "function", "function": {"name", "description"?, "parameters"?}}]``.

    Returns:
        Normalised copies; ``parameters`` defaults to an empty object schema; ``strict`` is kept
        when it is true (OpenAI's strict mode: where the call is enforced, its arguments are a closed
        object with every property required).

    Raises:
        ParameterTypeError: ``tools`` or a part of it has the wrong type.
        InvalidParameterError: Empty list, empty or duplicate name, parameters not an object schema,
            ``strict`` with parameters that allow additional properties.
    """
    if not isinstance(tools, (list, tuple)):
        raise ParameterTypeError("tools", f"tools must be a list of tools, got {type(tools).__name__}")
    if not tools:
        raise InvalidParameterError("tools", "tools must not be empty (leave it out to disable tool calling)")
    checked: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ParameterTypeError("tools", f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
        name, description = fn["name"], fn.get("description") or ""
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, Mapping) or not isinstance(description, str):
            raise ParameterTypeError("tools", f"tools[{i}]: parameters must be a JSON schema, description a string")
        if tool.get("type", "function") != "function" or params.get("type", "object") != "object":
            raise InvalidParameterError("tools", f"tools[{i}] must be a function taking a JSON object")
        if not name.strip() or name in checked:
            raise InvalidParameterError("tools", f"tools[{i}]: function name {name!r} is empty or used twice")
        try:  # it goes into the prompt and the grammar, both as JSON text
            params = json.loads(json.dumps(params))
        except (TypeError, ValueError) as exc:
            raise ParameterTypeError("tools", f"tools[{i}]: parameters is not JSON: {exc}") from exc
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise ParameterTypeError("tools", f"tools[{i}]: strict must be a bool, got {strict!r}")
        if strict:
            close_objects(params, strict=True, param="tools")  # refuses what strict mode cannot take, now
        function = {"name": name, "parameters": params} | ({"description": description} if description else {})
        checked[name] = {"type": "function", "function": function | ({"strict": True} if strict else {})}
    return list(checked.values())


def check_tool_choice(tool_choice: Any, tools: Sequence[Mapping[str, Any]] | None) -> ToolChoice:
    """Validate ``tool_choice`` (None, ``"none"``, ``"auto"``, ``"required"`` or ``{"type": "function",
    "function": {"name": ...}}``) against the tools from :func:`check_tools` (or None).

    Returns:
        The mode, or the normalised named-function dict. None means ``"auto"`` with tools; without
        tools, ``"auto"`` means ``"none"`` (there is nothing to call).

    Raises:
        ParameterTypeError: Not a mode string or a function object.
        InvalidParameterError: Unknown mode, ``"required"`` without tools, or a function not in tools.
    """
    names = _functions(tools or [])
    if tool_choice is None:
        return "auto" if names else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in _CHOICES:
            raise InvalidParameterError("tool_choice", f"tool_choice must be one of {_CHOICES}, got {tool_choice!r}")
        if tool_choice == "required" and not names:
            raise InvalidParameterError("tool_choice", "tool_choice 'required' needs a non-empty tools list")
        return tool_choice if names else "none"
    fn = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    name = fn.get("name") if isinstance(fn, Mapping) and tool_choice.get("type", "function") == "function" else None
    if not isinstance(name, str):
        message = 'tool_choice must be a mode or {"type": "function", "function": {"name": ...}}'
        raise ParameterTypeError("tool_choice", message)
    if name not in names:
        raise InvalidParameterError("tool_choice", f"tool_choice names function {name!r}, which is not in tools")
    return {"type": "function", "function": {"name": name}}


def tool_choice_schema(tools: Sequence[Mapping[str, Any]], tool_choice: ToolChoice) -> dict[str, Any] | None:
    """The JSON schema the whole output must follow when ``tool_choice`` (checked) forces a call.

    Returns:
        None for ``"none"``/``"auto"``; for ``"required"`` a non-empty array of ``{"name", "arguments"}``
        objects (one alternative per tool); for a named function its parameters schema (the output is
        the arguments object).
    """
    functions = _functions(tools)
    if isinstance(tool_choice, Mapping):
        return _arguments_schema(functions[tool_choice["function"]["name"]])
    if tool_choice != "required":
        return None
    calls = []
    for name, fn in functions.items():
        properties = {"name": {"type": "string", "const": name}, "arguments": _arguments_schema(fn)}
        required = ["name", "arguments"]
        calls.append({"type": "object", "properties": properties, "required": required, "additionalProperties": False})
    return {"type": "array", "minItems": 1, "items": {"anyOf": calls}}


def _arguments_schema(function: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a function's parameters schema closed to arguments it does not declare (unless it
    says otherwise): a forced call cannot wander off into made-up arguments. A ``strict`` function's
    properties are all required too, as in OpenAI's strict function calling."""
    return close_objects(function["parameters"], strict=function.get("strict") is True, param="tools")


def parse_tool_calls(
    text: str, tools: Sequence[Mapping[str, Any]], tool_choice: ToolChoice
) -> tuple[str | None, list[dict[str, Any]]]:
    """Split a finished output into content and OpenAI ``tool_calls``.

    Args:
        text: The model's whole output.
        tools, tool_choice: Checked; calls of other names stay content.

    Returns:
        ``(content, tool_calls)``: the text outside the calls, stripped, None if empty (``"none"`` gives
        ``text`` untouched); calls are ``{"id", "type": "function", "function": {"name", "arguments"}}``.
    """
    names = _functions(tools)
    if tool_choice == "none" or not names:
        return text, []
    stripped = text.strip()
    if isinstance(tool_choice, Mapping):  # the whole output is the arguments object
        value, end = _decode(stripped, 0) if stripped.startswith("{") else (None, 0)
        if value is None:
            return stripped or None, []
        return stripped[end:].strip() or None, [_call(tool_choice["function"]["name"], stripped[:end])]
    body = after_marker(stripped)
    if body.startswith(("{", "[")):  # plain JSON: one call, or a list of them
        found, end = calls_at(body, 0, names)
        if not found:  # not calls (or an empty list): all content
            return stripped, []
        return body[end:].strip() or None, [_call(name, _dumps(arguments)) for name, arguments in found]
    pieces, calls, last = [], [], 0
    for block in _BLOCK.finditer(text):
        inner = block.group(1)
        found, end = calls_at(inner, _skip_ws(inner, 0), names)
        if found is not None:  # else the block stays in the content; "[]" is a block of no calls
            pieces += [text[last : block.start()], inner[end:].strip()]
            calls += [_call(name, _dumps(arguments)) for name, arguments in found]
            last = block.end()
    pieces.append(text[last:])
    return "".join(pieces).strip() or None, calls


def after_marker(text: str) -> str:
    """``text`` after a leading call marker (:data:`MARKERS`) and the whitespace after it, or ``text``."""
    for marker in MARKERS:
        if text.startswith(marker):
            return text[len(marker) :].lstrip()
    return text


def calls_at(text: str, at: int, names: Mapping[str, Any]) -> tuple[list[tuple[str, dict[str, Any]]] | None, int]:
    """The calls of the JSON value at ``at``, and the offset just past it.

    Returns:
        ``([(name, arguments)], end)`` for a call object, or for a list whose items are all calls
        (an empty list gives no calls); ``(None, 0)`` for anything else.
    """
    value, end = _decode(text, at)
    items = value if isinstance(value, list) else [value]
    found = [_call_from(item, names) for item in items]
    if not end or any(call is None for call in found):
        return None, 0
    return [call for call in found if call is not None], end


def render_tools_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """A system-prompt text offering checked ``tools`` in the Hermes format (signatures in ``<tools>``),
    for chat templates that do not take ``tools``."""
    signatures = "\n".join(json.dumps(dict(tool), ensure_ascii=False) for tool in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{signatures}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def template_uses_tools(chat_template: str | None) -> bool:
    """Whether a Jinja chat template reads the ``tools`` variable (in a ``{{ }}`` or ``{% %}`` tag)."""
    return any(_TOOLS_VAR.search(tag) for tag in _JINJA_TAG.findall(chat_template or ""))


def history_for_template(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-style ``messages`` as Hugging Face chat templates expect them.

    Returns:
        Copies without None-valued keys (templates test ``is defined``); assistant ``content`` None
        becomes ``""`` and tool-call ``arguments`` JSON text becomes a dict (if it is a JSON object);
        ``tool`` messages keep ``tool_call_id`` and ``name``.
    """
    converted = []
    for message in messages:
        msg = {key: value for key, value in message.items() if value is not None}
        if msg.get("role") == "assistant":
            msg.setdefault("content", "")
            if msg.get("tool_calls"):
                msg["tool_calls"] = [_template_call(call) for call in msg["tool_calls"]]
        converted.append(msg)
    return converted


def _template_call(call: Mapping[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    if isinstance(function.get("arguments"), str) and isinstance(_loads(function["arguments"]), dict):
        function["arguments"] = _loads(function["arguments"])
    return {**call, "function": function}


def _functions(tools: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {tool["function"]["name"]: tool["function"] for tool in tools}


def _call_from(obj: Any, names: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """``(name, arguments)`` when ``obj`` is ``{"name": <a tool>, "arguments"|"parameters": {...}}``."""
    name = obj.get("name") if isinstance(obj, dict) else None
    if not isinstance(name, str) or name not in names:
        return None
    arguments = obj["arguments"] if "arguments" in obj else obj.get("parameters", {})
    if isinstance(arguments, str):  # some models encode the arguments as a JSON string
        arguments = _loads(arguments)
    return (name, arguments) if isinstance(arguments, dict) else None


def _dumps(arguments: dict[str, Any]) -> str:
    return json.dumps(arguments, ensure_ascii=False)


def _call(name: str, arguments: str, call_id: str | None = None) -> dict[str, Any]:
    return {"id": call_id or _new_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def _new_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _decode(text: str, at: int) -> tuple[Any, int]:
    """The JSON value starting at ``at`` and the offset just past it, or ``(None, 0)``."""
    try:
        return _DECODER.raw_decode(text, at)
    except ValueError:
        return None, 0


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _skip_ws(text: str, at: int, end: int | None = None) -> int:
    match = _WS.match(text, at, len(text) if end is None else end)
    return match.end() if match else at
