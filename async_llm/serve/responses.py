"""OpenAI's Responses API (``POST /v1/responses``) over the same engine as chat completions.

A request is translated into a chat completion (:class:`ChatCompletionRequest`) and run by
:class:`~async_llm.serve.serving.OpenAIServing`, so sampling, tools, grammars, deadlines and errors
behave exactly as there; the answer is translated back into a ``response`` object, or, with
``stream: true``, into the Responses stream events (``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``, ``response.output_text.delta``,
``response.function_call_arguments.delta``, their ``.done`` forms and ``response.completed`` or
``response.incomplete``), each with its ``sequence_number``.

What is taken:

* ``input``: a string, or items: messages (``role`` and a string or ``input_text``/``output_text``
  parts), ``function_call`` items and ``function_call_output`` items (the results fed back);
* ``instructions`` (a system message, not carried to later responses, as OpenAI does), ``tools``
  (``function`` tools), ``tool_choice``, ``parallel_tool_calls``, ``text.format`` (``text``,
  ``json_object``, ``json_schema``: the engine's grammar), ``max_output_tokens``, ``temperature``,
  ``top_p``, ``metadata``, ``user``, ``store``;
* ``previous_response_id``: responses are kept in memory (``store``, the default), the most recent
  :data:`MAX_STORED_RESPONSES` of them; the conversation so far is replayed before the new input.
  A response no longer kept (or never stored) is a 404 naming the field. ``GET
  /v1/responses/{id}`` returns a kept response.

Anything else that would change the answer is refused with a 400 naming it: item types and tool
types a text model cannot handle (images, files, web search...), ``background``, ``conversation``,
``reasoning`` effort, ``truncation: auto``, ``include`` of anything.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from async_llm.log import get_logger
from async_llm.serve.errors import APIError
from async_llm.serve.protocol import ChatCompletionRequest
from async_llm.serve.serving import OpenAIServing

__all__ = ["MAX_STORED_RESPONSES", "ResponsesAPI", "ResponsesRequest", "response_server"]

log = get_logger("async_llm.serve.responses")

#: Responses kept for ``previous_response_id`` and ``GET /v1/responses/{id}`` (least recent out first).
MAX_STORED_RESPONSES = 1024

#: Request fields accepted when they ask for nothing (the value each may have), as clients send them.
_NEUTRAL: dict[str, tuple[Any, ...] | None] = {
    "background": (None, False),
    "conversation": (None,),
    "reasoning": (None, {}),
    "truncation": (None, "disabled"),
    "include": (None, []),
    "service_tier": (None, "auto", "default"),
    "top_logprobs": (None, 0),
    "prompt_cache_key": None,  # a routing hint: any value
    "safety_identifier": None,
    "max_tool_calls": (None,),
    "prompt": (None,),
    "stream_options": None,
}


class ResponsesRequest(BaseModel):
    """A ``/v1/responses`` body (OpenAI's fields; unknown ones are handled by :meth:`ResponsesAPI.check`)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None


class ResponsesAPI:
    """The Responses API over one :class:`OpenAIServing` (and its engine)."""

    def __init__(self, serving: OpenAIServing, max_stored: int = MAX_STORED_RESPONSES) -> None:
        self.serving = serving
        self.max_stored = max_stored
        # id -> (the response object, the conversation it ends: chat messages without instructions)
        self._stored: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = OrderedDict()

    # -- requests ----------------------------------------------------------------------------------------
    def check(self, request: ResponsesRequest) -> None:
        """Refuse (400, naming it) any field that asks for what this server does not do."""
        for name, value in (request.model_extra or {}).items():
            if name not in _NEUTRAL:
                if self.serving.reject_unknown_fields:
                    raise APIError(400, f"Unrecognized request argument supplied: {name}", param=name)
                log.warning("unknown request field ignored", field=name)
                continue
            allowed = _NEUTRAL[name]
            if allowed is not None and value not in allowed:
                raise APIError(400, f"{name}={value!r} is not supported by this server", param=name)

    def _history(self, request: ResponsesRequest) -> list[dict[str, Any]]:
        if request.previous_response_id is None:
            return []
        stored = self._stored.get(request.previous_response_id)
        if stored is None:
            raise APIError(
                404, f"Previous response with id '{request.previous_response_id}' not found (responses are kept "
                f"in memory, the most recent {self.max_stored})", param="previous_response_id",
            )  # fmt: skip
        self._stored.move_to_end(request.previous_response_id)
        return list(stored[1])

    def _chat(self, request: ResponsesRequest, messages: list[dict[str, Any]], stream: bool) -> ChatCompletionRequest:
        body: dict[str, Any] = {"model": request.model, "messages": messages, "stream": stream}
        if request.instructions:
            body["messages"] = [{"role": "system", "content": request.instructions}, *messages]
        if request.tools:
            body["tools"] = [_tool(tool, i) for i, tool in enumerate(request.tools)]
        if request.tool_choice is not None:
            body["tool_choice"] = _tool_choice(request.tool_choice)
        if request.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = request.parallel_tool_calls
        response_format = _response_format(request.text)
        if response_format is not None:
            body["response_format"] = response_format
        for name, value in (
            ("max_tokens", request.max_output_tokens), ("temperature", request.temperature),
            ("top_p", request.top_p), ("user", request.user),
        ):  # fmt: skip
            if value is not None:
                body[name] = value
        if stream:
            body["stream_options"] = {"include_usage": True}
        return ChatCompletionRequest.model_validate(body)

    def _prepare(self, request: ResponsesRequest, stream: bool) -> tuple[ChatCompletionRequest, list[dict[str, Any]]]:
        self.check(request)
        self.serving.check_model(request.model)
        conversation = self._history(request) + _messages(request.input)
        return self._chat(request, conversation, stream), conversation

    async def create(self, request: ResponsesRequest) -> dict[str, Any]:
        """A whole ``response`` object (raises :class:`APIError` as chat completions do)."""
        chat, conversation = self._prepare(request, False)
        answer = await self.serving.chat_completion(chat)
        choice = answer["choices"][0]
        message = choice["message"]
        output = []
        if message.get("content"):
            output.append(_message_item(_id("msg"), message["content"], "completed"))
        for call in message.get("tool_calls") or []:
            output.append(_call_item(_id("fc"), call["id"], call["function"]["name"], call["function"]["arguments"]))
        response = self._response(request, output, choice.get("finish_reason"), answer.get("usage"))
        self._store(request, response, conversation, message)
        return response

    async def stream(self, request: ResponsesRequest) -> AsyncIterator[dict[str, Any]]:
        """Submit a streaming request (errors before the first event raise) and return its events."""
        chat, conversation = self._prepare(request, True)
        chunks = await self.serving.chat_completion_stream(chat)
        return self._events(request, chunks, conversation)

    async def _events(
        self, request: ResponsesRequest, chunks: Any, conversation: list[dict[str, Any]]
    ) -> AsyncIterator[dict[str, Any]]:
        response_id = self._response_id()
        created = int(time.time())
        sequence = 0

        def event(kind: str, **fields: Any) -> dict[str, Any]:
            nonlocal sequence
            sequence += 1
            return {"type": kind, "sequence_number": sequence - 1, **fields}

        shell = self._response(request, [], None, None, response_id=response_id, created=created, status="in_progress")
        yield event("response.created", response=shell)
        yield event("response.in_progress", response=shell)
        output: list[dict[str, Any]] = []
        text_item: dict[str, Any] | None = None
        text = ""
        calls: dict[int, dict[str, Any]] = {}  # tool-call index -> its item
        finish: str | None = None
        usage: dict[str, Any] | None = None
        try:
            async for chunk in chunks:
                if "error" in chunk:
                    error = chunk["error"]
                    yield event("error", code=error.get("code"), message=error.get("message"), param=error.get("param"))
                    failed = self._response(
                        request, output, None, usage, response_id=response_id, created=created, status="failed"
                    )
                    failed["error"] = {"code": error.get("code") or "server_error", "message": error.get("message")}
                    yield event("response.failed", response=failed)
                    return
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    content = delta.get("content")
                    if content:
                        if text_item is None:
                            text_item = {
                                "type": "message",
                                "id": _id("msg"),
                                "status": "in_progress",
                                "role": "assistant",
                                "content": [],
                            }
                            output.append(text_item)
                            yield event(
                                "response.output_item.added", output_index=len(output) - 1, item=dict(text_item)
                            )
                            yield event(
                                "response.content_part.added",
                                item_id=text_item["id"],
                                output_index=len(output) - 1,
                                content_index=0,
                                part=_text_part(""),
                            )
                        text += content
                        yield event(
                            "response.output_text.delta",
                            item_id=text_item["id"],
                            output_index=output.index(text_item),
                            content_index=0,
                            delta=content,
                            logprobs=[],
                        )
                    for call in delta.get("tool_calls") or []:
                        index = call.get("index", 0)
                        item = calls.get(index)
                        function = call.get("function") or {}
                        if item is None:
                            item = calls[index] = _call_item(
                                _id("fc"),
                                call.get("id") or _id("call"),
                                function.get("name") or "",
                                "",
                                status="in_progress",
                            )
                            output.append(item)
                            yield event("response.output_item.added", output_index=len(output) - 1, item=dict(item))
                        if function.get("arguments"):
                            item["arguments"] += function["arguments"]
                            yield event(
                                "response.function_call_arguments.delta",
                                item_id=item["id"],
                                output_index=output.index(item),
                                delta=function["arguments"],
                            )
                    if choice.get("finish_reason") is not None:
                        finish = choice["finish_reason"]
        finally:
            await chunks.aclose()
        status = "incomplete" if finish == "length" else "completed"
        if text_item is not None:
            index = output.index(text_item)
            yield event(
                "response.output_text.done",
                item_id=text_item["id"],
                output_index=index,
                content_index=0,
                text=text,
                logprobs=[],
            )
            yield event(
                "response.content_part.done",
                item_id=text_item["id"],
                output_index=index,
                content_index=0,
                part=_text_part(text),
            )
            text_item.update(status=status, content=[_text_part(text)])
            yield event("response.output_item.done", output_index=index, item=dict(text_item))
        for item in calls.values():
            index = output.index(item)
            yield event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                arguments=item["arguments"],
            )
            item["status"] = "completed"
            yield event("response.output_item.done", output_index=index, item=dict(item))
        response = self._response(request, output, finish, usage, response_id=response_id, created=created)
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            message["tool_calls"] = [
                {"id": c["call_id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in calls.values()
            ]
        self._store(request, response, conversation, message)
        yield event("response.incomplete" if status == "incomplete" else "response.completed", response=response)

    # -- responses ---------------------------------------------------------------------------------------
    def _response_id(self) -> str:
        """``resp_<hex>``, or ``resp_<server id>_<hex>`` on a Ray replica: a follow-up naming it in
        ``previous_response_id`` is routed to the replica that keeps it (see :func:`response_server`)."""
        server = self.serving.server_id
        return f"resp_{server}_{uuid.uuid4().hex}" if server else _id("resp")

    def _response(
        self, request: ResponsesRequest, output: list[dict[str, Any]], finish: str | None, usage: dict[str, Any] | None,
        *, response_id: str | None = None, created: int | None = None, status: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        incomplete = finish == "length"
        return {
            "id": response_id or self._response_id(), "object": "response", "created_at": created or int(time.time()),
            "status": status or ("incomplete" if incomplete else "completed"), "model": self.serving.model_name,
            "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete and status is None else None,
            "instructions": request.instructions, "tools": request.tools or [],
            "tool_choice": request.tool_choice if request.tool_choice is not None else "auto",
            "parallel_tool_calls": request.parallel_tool_calls if request.parallel_tool_calls is not None else True,
            "text": request.text or {"format": {"type": "text"}}, "temperature": request.temperature,
            "top_p": request.top_p, "max_output_tokens": request.max_output_tokens,
            "previous_response_id": request.previous_response_id, "metadata": request.metadata or {},
            "store": request.store, "user": request.user, "usage": _usage(usage),
        }  # fmt: skip

    def _store(
        self,
        request: ResponsesRequest,
        response: dict[str, Any],
        conversation: list[dict[str, Any]],
        message: dict[str, Any],
    ) -> None:
        if not request.store:
            return
        self._stored[response["id"]] = (response, [*conversation, message])
        while len(self._stored) > self.max_stored:
            self._stored.popitem(last=False)

    def get(self, response_id: str) -> dict[str, Any]:
        """A kept response (``GET /v1/responses/{id}``); 404 when it is not kept."""
        stored = self._stored.get(response_id)
        if stored is None:
            raise APIError(404, f"No response with id '{response_id}' is kept here", param="response_id")
        return stored[0]


def response_server(response_id: Any) -> str | None:
    """The server id inside a response id made by :meth:`ResponsesAPI._response_id` (None if none)."""
    if not isinstance(response_id, str) or not response_id.startswith("resp_"):
        return None
    server, sep, rest = response_id[len("resp_") :].rpartition("_")
    return server if sep and server and rest else None


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [_text_part(text)]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def _usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {
        "input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }  # fmt: skip


def _text(content: Any, where: str) -> str:
    """A message's text: a string, or its text parts joined (any other part is refused, by type)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            raise APIError(
                400,
                f"{where}.content[{i}] has type {kind!r}: this server reads text parts only",
                param=f"{where}.content[{i}].type",
            )
        texts.append(str(part.get("text", "")))
    return "".join(texts)


def _messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages for ``input`` (function calls join the assistant message before them)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{where} must be an object", param=where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(
                    400,
                    f"{where}.role must be user, system, developer or assistant, got {role!r}",
                    param=f"{where}.role",
                )
            messages.append(
                {"role": "system" if role == "developer" else role, "content": _text(item.get("content", ""), where)}
            )
        elif kind == "function_call":
            call = {
                "id": item.get("call_id") or item.get("id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            elif last is not None and last["role"] == "assistant" and not last.get("tool_calls"):
                last["tool_calls"] = [call]
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            content = (
                output
                if isinstance(output, str)
                else _text(output, where)
                if isinstance(output, list)
                else json.dumps(output)
            )
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": content})
        else:
            raise APIError(
                400,
                f"{where} has type {kind!r}: this server takes message, function_call and function_call_output items",
                param=f"{where}.type",
            )
    return messages


def _tool(tool: dict[str, Any], index: int) -> dict[str, Any]:
    kind = tool.get("type")
    if kind != "function":
        raise APIError(
            400, f"tools[{index}] has type {kind!r}: this server runs function tools only", param=f"tools[{index}].type"
        )
    function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if tool.get(key) is not None}
    return {"type": "function", "function": function}


def _tool_choice(choice: str | dict[str, Any]) -> Any:
    if isinstance(choice, dict):
        if choice.get("type") == "function" and "name" in choice:
            return {"type": "function", "function": {"name": choice["name"]}}
        raise APIError(
            400,
            f"tool_choice {choice!r} is not supported: give auto, none, required or a function",
            param="tool_choice",
        )
    return choice


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    if not text or not text.get("format"):
        return None
    fmt: dict[str, Any] = text["format"]
    kind: Literal["text", "json_object", "json_schema"] | Any = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = {key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise APIError(
        400,
        f"text.format type {kind!r} is not supported: give text, json_object or json_schema",
        param="text.format.type",
    )
