"""The server's answers to what it does not serve (unknown routes, unknown body fields), the sampling
fields it forwards (derived from ``SamplingParams``), and tool calls written as a list, over HTTP."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import anyio
import httpx
import openai
import pytest

from async_llm import SamplingParams
from async_llm.serve import create_app
from async_llm.serve.protocol import (
    _UNSUPPORTED,
    NOT_OVER_HTTP,
    RENAMED,
    SAMPLING_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
)
from tests.conftest import SERVED_MODEL

MODEL = SERVED_MODEL
CHAT = [{"role": "user", "content": "What time is it?"}]
ROUTES = [
    "POST /v1/completions", "POST /v1/chat/completions", "POST /v1/embeddings", "POST /v1/responses",
    "GET /v1/responses/{response_id}", "GET /v1/models", "GET /v1/models/{model}", "GET /health", "GET /metrics",
]  # fmt: skip


def _asgi(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)


# -- unknown routes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/files"), ("POST", "/v1/batches"), ("GET", "/x")])
@pytest.mark.parametrize("api_key", [None, "s3cret"])
async def test_an_unknown_route_is_a_404_in_openai_shape_naming_the_routes(llm, method, path, api_key):
    async with _asgi(create_app(llm, model_name=MODEL, api_key=api_key)) as http:
        with anyio.fail_after(10):
            response = await http.request(method, path, json={"model": MODEL, "input": "x"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert f"{method} {path}" in error["message"] and error["code"] == "unknown_url"
    assert all(route in error["message"] for route in ROUTES), error["message"]


async def test_a_route_called_with_the_wrong_method_is_a_405_naming_the_right_one(llm):
    async with _asgi(create_app(llm, model_name=MODEL)) as http:
        with anyio.fail_after(10):
            response = await http.get("/v1/chat/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    error = response.json()["error"]
    assert "GET /v1/chat/completions" in error["message"] and "takes POST" in error["message"]


async def test_the_official_client_raises_not_found(client):
    with anyio.fail_after(10), pytest.raises(openai.NotFoundError) as info:
        await client.files.list()
    assert "GET /v1/files" in info.value.message and "POST /v1/embeddings" in info.value.message


# -- unknown body fields -----------------------------------------------------------------------------------


def _warned(caplog: pytest.LogCaptureFixture) -> list[str]:
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name == "async_llm.serve"]
    return [e["field"] for e in events if e.get("event", "").startswith("unknown request field")]


async def test_an_unknown_field_is_logged_once_per_name(llm, caplog):
    caplog.set_level(logging.WARNING, logger="async_llm")
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, "temprature": 0.5, "store": True, "user": "u"}
    async with _asgi(create_app(llm, model_name=MODEL)) as http:
        with anyio.fail_after(30):
            first = await http.post("/v1/chat/completions", json=body)
            second = await http.post("/v1/completions", json={**body, "prompt": "Hi", "messages": None})
            third = await http.post("/v1/chat/completions", json={**body, "top_kk": 3})
    assert first.status_code == second.status_code == third.status_code == 200, first.text
    # A known field of no effect (store, user) is not reported; "messages" is chat's field on completions.
    assert _warned(caplog) == ["temprature", "messages", "top_kk"]


async def test_reject_unknown_fields_refuses_them_by_name(llm):
    app = create_app(llm, model_name=MODEL, reject_unknown_fields=True)
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, "store": True, "top_k": 3}  # all known
    async with _asgi(app) as http:
        with anyio.fail_after(30):
            refused = await http.post("/v1/chat/completions", json={**body, "temprature": 0.5, "topp": None})
            known = await http.post("/v1/chat/completions", json=body)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "temprature" and "temprature, topp" in error["message"]
    assert known.status_code == 200, known.text


# -- the sampling fields are SamplingParams' ---------------------------------------------------------------

#: Body fields that are the server's own, not sampling parameters.
SERVER_FIELDS = {
    "model", "n", "best_of", "stream", "stream_options", "user", "prompt", "echo", "logprobs", "messages",
    "top_logprobs", "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs",
}  # fmt: skip


def test_every_sampling_parameter_is_forwarded_or_said_not_to_be() -> None:
    public = {f.name for f in dataclasses.fields(SamplingParams)} & SamplingParams.field_names()
    assert set(SAMPLING_FIELDS) | set(NOT_OVER_HTTP) == public
    assert not set(SAMPLING_FIELDS) & set(NOT_OVER_HTTP)
    assert set(RENAMED.values()) <= set(SAMPLING_FIELDS)
    # Not over HTTP: the server's own field, or refused when set (never silently ignored).
    for name in NOT_OVER_HTTP:
        assert name in SERVER_FIELDS or name in _UNSUPPORTED, name


@pytest.mark.parametrize("request_type", [CompletionRequest, ChatCompletionRequest])
def test_each_forwarded_field_reaches_the_engine_declared_or_not(request_type: Any) -> None:
    base: dict[str, Any] = {"prompt": "x"} if request_type is CompletionRequest else {"messages": CHAT}
    for name in [*SAMPLING_FIELDS, *RENAMED]:
        marker = object()
        kwargs = request_type.model_construct(**base, **{name: marker}).sampling_kwargs()
        assert kwargs[RENAMED.get(name, name)] is marker, name
    # Every declared field is a sampling parameter or the server's own: none is dropped on the way.
    for name in request_type.model_fields:
        assert name in SAMPLING_FIELDS or name in RENAMED or name in SERVER_FIELDS, name


async def test_a_sampling_parameter_without_a_body_field_of_its_own_is_honoured(url, llm):
    """``max_length`` (prompt plus output, as transformers counts) has no pydantic field: it is
    forwarded because it is a SamplingParams field, and checked there."""
    async with httpx.AsyncClient(timeout=60) as http:
        with anyio.fail_after(60):
            body = {"model": MODEL, "prompt": "Hello", "max_tokens": 20, "ignore_eos": True}
            full = (await http.post(f"{url}/v1/completions", json=body)).json()
            capped = (await http.post(f"{url}/v1/completions", json={**body, "max_length": 0})).json()
            prompt_tokens = full["usage"]["prompt_tokens"]
            short = await http.post(f"{url}/v1/completions", json={**body, "max_length": prompt_tokens + 3})
    assert full["usage"]["completion_tokens"] == 20
    assert capped["error"]["param"] == "max_length"  # SamplingParams' check, named
    assert short.json()["usage"]["completion_tokens"] == 3, short.text


# -- tool calls written as a list ----------------------------------------------------------------------------

TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
# What SmolLM2 writes (the list form it was tuned on): the tiny model is made to write it.
LISTED = (
    '<tool_call>[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Zürich"}}]'
    "</tool_call>"
)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_list_of_calls_comes_back_as_tool_calls(client, stream: bool) -> None:
    kwargs: dict[str, Any] = dict(
        model=MODEL, messages=CHAT, tools=[TIME, WEATHER], max_tokens=200, extra_body={"guided_choice": [LISTED]}
    )
    with anyio.fail_after(60):
        if not stream:
            response = await client.chat.completions.create(**kwargs)
            message, reason = response.choices[0].message, response.choices[0].finish_reason
            calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
            content = message.content
        else:
            parts: dict[int, dict[str, str]] = {}
            texts, reasons = [], []
            async for chunk in await client.chat.completions.create(**kwargs, stream=True):
                for choice in chunk.choices:
                    texts.append(choice.delta.content or "")
                    reasons += [choice.finish_reason] if choice.finish_reason else []
                    for call in choice.delta.tool_calls or []:
                        part = parts.setdefault(call.index, {"name": "", "arguments": ""})
                        part["name"] += call.function.name or ""
                        part["arguments"] += call.function.arguments or ""
            calls = [(p["name"], json.loads(p["arguments"])) for p in parts.values()]
            content, reason = "".join(texts) or None, reasons[-1]
    assert calls == [("get_time", {}), ("get_weather", {"city": "Zürich"})]
    assert content is None and reason == "tool_calls"
