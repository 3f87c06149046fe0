"""Tools on the Python chat API: the checks of ``tools`` / ``tool_choice``, the chat template's
rendering with the tools, and the parse of a finished output into OpenAI's ``tool_calls``.

``tool_choice="required"`` and a named function are enforced with structured output: the output is
constrained to the calls' JSON schema (see :func:`async_llm.llm.tools.tool_choice_schema`), so the
arguments always parse. ``"auto"`` leaves the model free and parses what it wrote.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import async_llm.llm.tools as tool_format
from async_llm.errors import InvalidParameterError, ParameterTypeError
from async_llm.llm.tool_stream import ToolCallStreamParser
from async_llm.sampling_params import STRUCTURED_FIELDS


@dataclass(frozen=True)
class ToolUse:
    """A request's checked ``tools`` and ``tool_choice``."""

    tools: list[dict[str, Any]]
    choice: str | dict[str, Any]

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """``(content, tool_calls)`` of a finished output."""
        return tool_format.parse_tool_calls(text, self.tools, self.choice)

    def stream_parser(self) -> ToolCallStreamParser:
        return ToolCallStreamParser(self.tools, self.choice)


def finish_reason(reason: str | None, called: bool) -> str | None:
    """The request's finish reason once its output is parsed: ``"tool_calls"`` when it called a
    tool and ended of its own accord (``"stop"``); a cut-off output (``"length"``...) keeps its reason."""
    return "tool_calls" if called and reason == "stop" else reason


def tool_use(tools: Any, tool_choice: Any, overrides: dict[str, Any]) -> ToolUse | None:
    """Check ``tools`` and ``tool_choice``; when the choice is enforced, add its schema to
    ``overrides`` (as ``guided_json``).

    Raises:
        TypeError, ValueError: Bad tools or choice, or an enforced choice with another
            structured-output constraint (naming the parameter).
    """
    if tools is None and tool_choice is None:
        return None
    checked = tool_format.check_tools(tools) if tools is not None else []
    choice = tool_format.check_tool_choice(tool_choice, checked)
    schema = tool_format.tool_choice_schema(checked, choice)
    if schema is not None:
        taken = [name for name in STRUCTURED_FIELDS if overrides.get(name) is not None]
        if taken:
            raise InvalidParameterError(
                "tool_choice", f"tool_choice {choice!r} constrains the output; it cannot be combined with {taken[0]}"
            )
        overrides["guided_json"] = schema
    return ToolUse(checked, choice) if checked else None


def render_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    tools: ToolUse | None,
    template_kwargs: Mapping[str, Any] | None,
) -> str:
    """The chat template's text for ``messages``, with the tools (when the template does not take
    ``tools``, they are described in the system message in the Hermes format, which the parser reads)."""
    kwargs = dict(template_kwargs or {})
    for reserved in ("messages", "tools", "add_generation_prompt", "tokenize"):
        if reserved in kwargs:
            raise InvalidParameterError("chat_template_kwargs", f"chat_template_kwargs cannot set {reserved!r}")
    history = tool_format.history_for_template(list(messages))
    if tools is not None and tools.choice != "none":
        if tool_format.template_uses_tools(getattr(tokenizer, "chat_template", None)):
            kwargs["tools"] = tools.tools
        else:
            described = tool_format.render_tools_prompt(tools.tools)
            if history and history[0].get("role") == "system":
                history[0] = {**history[0], "content": f"{history[0].get('content') or ''}\n\n{described}".strip()}
            else:
                history.insert(0, {"role": "system", "content": described})
    return str(tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False, **kwargs))


def check_template_kwargs(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ParameterTypeError("chat_template_kwargs", "chat_template_kwargs must be a dict with str keys")
    return dict(value)
