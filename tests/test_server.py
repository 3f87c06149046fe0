"""The OpenAI-compatible server, end to end: uvicorn on 127.0.0.1 (a free port) in the test's own
event loop, the official ``openai`` client (httpx for raw framing and bad bodies), the tiny model.

Greedy answers over HTTP are compared with the engine called directly, so the HTTP layer must
neither change the prompt nor the sampling parameters. Every wait is bounded by ``anyio.fail_after``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any

import anyio
import httpx
import openai
import pytest

from async_llm import HuggingFaceLLM
from async_llm.serve import create_app
from async_llm.serve.server import API_KEY_ENV, resolve_api_key, running_server
from tests.conftest import SERVED_MODEL
from tests.rawhttp import exchange, request_head

MODEL = SERVED_MODEL
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    """Poll ``predicate`` (cheap, engine counters) until true, failing after ``timeout`` s."""
    with anyio.fail_after(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# -- answers equal the engine's -----------------------------------------------------------------------
async def test_completion_equals_the_engine_and_counts_usage(client, llm):
    prompt = "The quick brown fox"
    with anyio.fail_after(30):
        response = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
        expected = await llm.acomplete(prompt, chat_template=False, max_tokens=16)
    choice = response.choices[0]
    assert choice.text == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert response.object == "text_completion" and response.model == MODEL
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert response.usage.prompt_tokens_details.cached_tokens == 0  # a prompt shorter than a cache block


async def test_usage_counts_the_prompt_tokens_taken_from_the_prefix_cache(client):
    prompt = "A long shared beginning that every request repeats word for word. " * 6
    with anyio.fail_after(30):
        first = await client.completions.create(model=MODEL, prompt=prompt + "One", max_tokens=2)
        second = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt + "Two"}], max_tokens=2, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [chunk async for chunk in second]
        third = await client.completions.create(model=MODEL, prompt=prompt + "Three", max_tokens=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0  # the chat template puts text first
    cached = third.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 32 == 0 and cached < third.usage.prompt_tokens  # whole blocks of the prefix


async def test_chat_equals_the_engine_with_n_and_seeds(client, llm):
    with anyio.fail_after(30):
        greedy = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12)
        assert greedy.choices[0].message.content == await llm.arun(CHAT, max_tokens=12)
        assert greedy.choices[0].message.role == "assistant"
        sampled = await client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=12, n=3, seed=7, temperature=1.0, top_p=0.9
        )
        expected = [await llm.arun(CHAT, max_tokens=12, seed=7 + i, temperature=1.0, top_p=0.9) for i in range(3)]
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert [c.message.content for c in sampled.choices] == expected
    assert sampled.usage.prompt_tokens == len(llm.encode(CHAT))  # one prompt, counted once


async def test_extension_fields_reach_the_engine(client, llm):
    body = {"top_k": 5, "repetition_penalty": 1.3, "ignore_eos": True}
    with anyio.fail_after(30):
        response = await client.completions.create(
            model=MODEL, prompt="Hello", max_tokens=10, temperature=0.8, seed=3, stop=["zz"], extra_body=body
        )
        expected = await llm.arun(
            "Hello", chat_template=False, max_tokens=10, temperature=0.8, seed=3, stop=["zz"], **body
        )
    assert response.choices[0].text == expected


# -- streaming ----------------------------------------------------------------------------------------------
async def test_streamed_chat_equals_the_answer_and_ends_with_usage(client, llm):
    with anyio.fail_after(30):
        stream = await client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=16, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        expected = await llm.acomplete(CHAT, max_tokens=16)
    assert chunks[0].choices[0].delta.role == "assistant"  # the role opens the stream, before any token
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"


async def test_streamed_completion_is_server_sent_events_ending_with_done(url, llm):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 8, "stream": True, "n": 2, "seed": 1, "temperature": 1.0}
    with anyio.fail_after(30):
        async with httpx.AsyncClient() as http:
            response = await http.post(f"{url}/v1/completions", json=body)
        expected = [
            await llm.arun("Hello", chat_template=False, max_tokens=8, seed=1 + i, temperature=1.0) for i in range(2)
        ]
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    texts = ["", ""]
    for event in events[:-1]:
        for choice in json.loads(event[len("data: ") :])["choices"]:
            texts[choice["index"]] += choice["text"]
    assert texts == expected


async def test_sixteen_concurrent_streaming_clients(client, llm):
    prompts = [f"Prompt number {i}: the quick brown fox" for i in range(16)]

    async def one(prompt: str) -> str:
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=24, stream=True, extra_body={"ignore_eos": True}
        )  # ignore_eos: every request runs its full 24 steps, so they overlap in the batch
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    with anyio.fail_after(60):
        texts = await asyncio.gather(*(one(p) for p in prompts))
        expected = await asyncio.gather(
            *(llm.arun(p, chat_template=False, max_tokens=24, ignore_eos=True) for p in prompts)
        )
    assert texts == list(expected)
    stats = llm.stats()
    assert stats["peak_batch_size"] > 1, stats
    assert stats["num_running"] == 0 and stats["num_aborted"] == 0


# -- disconnects free the row ----------------------------------------------------------------------------
async def test_disconnect_mid_stream_aborts_and_frees_the_row(client, llm):
    with anyio.fail_after(30):
        stream = await client.completions.create(
            model=MODEL, prompt="Hello", max_tokens=900, stream=True, extra_body={"ignore_eos": True}
        )
        first = await stream.__anext__()
        assert first.choices[0].text or first.choices[0].finish_reason is None
        assert llm.stats()["num_running"] == 1
        await stream.close()  # closes the connection mid-stream
    await wait_for(lambda: llm.stats()["num_aborted"] == 1 and llm.stats()["num_running"] == 0)
    assert llm.stats()["tokens_generated"] < 900


async def test_disconnect_during_a_plain_request_aborts_it(llm, caplog):
    app = create_app(llm, model_name=MODEL)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 900, "ignore_eos": True}
    async with running_server(app) as base, httpx.AsyncClient() as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(f"{base}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
        await wait_for(lambda: llm.stats()["num_aborted"] == 1 and llm.stats()["num_running"] == 0)
        labels = {"endpoint": "/v1/completions", "status": "499"}
        registry = app.state.serving.metrics.registry
        await wait_for(lambda: registry.get_sample_value("async_llm_http_requests_total", labels) == 1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # handled, not a crash


# -- errors ----------------------------------------------------------------------------------------------------
BAD_REQUESTS = [
    ({"prompt": "Hi", "temperature": -1}, "temperature"),
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "Hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "Hi", "top_p": "high"}, "top_p"),
    ({"prompt": "Hi", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "Hi", "n": 0}, "n"),
    ({"prompt": "Hi", "stop": [""]}, "stop"),
    ({"prompt": "Hi", "seed": -1}, "seed"),
    ({"prompt": "Hi", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "Hi", "logprobs": 21}, "logprobs"),  # a count: OpenAI allows 0..20 alternatives
    ({"prompt": "Hi", "guided_regex": "[a-"}, "guided_regex"),  # compiled before anything is queued
    ({"prompt": "Hi", "guided_json": {"type": "nonsense"}}, "guided_json"),
    ({"prompt": "Hi", "guided_choice": []}, "guided_choice"),
    ({"prompt": "Hi", "guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ({"prompt": "Hi", "guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"prompt": "Hi", "response_format": {"type": "xml"}}, "response_format"),
    ({"prompt": "Hi", "min_tokens": 30, "max_tokens": 5}, "min_tokens"),
    ({"prompt": "Hi", "stop_token_ids": [10**6]}, "stop_token_ids"),  # beyond the vocabulary
    ({"prompt": "Hi", "allowed_token_ids": []}, "allowed_token_ids"),
    ({"prompt": "Hi", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": "Hi", "prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt": "Hi", "suffix": "!"}, "suffix"),
    ({"prompt": "Hi", "top_logprobs": 2}, "top_logprobs"),  # chat's field, meaningless here
    ({"prompt": "Hi", "max_tokens": 5000}, "max_tokens"),  # beyond the model's context
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": []}, "prompt"),
]


@pytest.mark.parametrize(("body", "param"), BAD_REQUESTS)
async def test_bad_completion_requests_get_400_naming_the_field(url, llm, body, param):
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(10):
            response = await http.post(f"{url}/v1/completions", json={"model": MODEL, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param in error["message"]
    assert llm.stats()["num_running"] == 0 and llm.stats()["num_waiting"] == 0  # nothing was queued


BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content",
    ),
    ({"messages": CHAT, "max_completion_tokens": -3}, "max_completion_tokens"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}, "tools"),
    (
        {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"},
        "tool_choice",
    ),
    ({"messages": CHAT, "tool_choice": "required"}, "tool_choice"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),  # without logprobs=true
    ({"messages": CHAT, "extra_body": {"chat_template_kwargs": {"tools": []}}}, "chat_template_kwargs"),
    ({"messages": CHAT, "extra_body": {"guided_choice": "a"}}, "guided_choice"),
    ({"messages": CHAT, "extra_body": {"echo": True}}, "echo"),
]


@pytest.mark.parametrize(("body", "param"), BAD_CHATS)
async def test_bad_chat_requests_get_400_naming_the_field(client, body, param):
    with anyio.fail_after(10), pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, **body)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param and param.split("[")[0] in info.value.message


async def test_malformed_json_is_a_400_not_a_422(url):
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(10):
            response = await http.post(
                f"{url}/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}
            )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


# -- bodies: media type, size, arrival time (async_llm.serve.limits) --------------------------------------------
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
async def test_a_body_that_is_not_json_is_a_415(url, llm, content_type):
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(10):
            response = await http.post(f"{url}/v1/completions", content=body, headers={"content-type": content_type})
            assert response.status_code == 415
            assert response.json()["error"]["code"] == "unsupported_media_type"
            assert content_type in response.json()["error"]["message"]
            # No Content-Type at all is read as JSON (curl -d), and so is a +json type.
            for headers in ({}, {"content-type": "application/vnd.api+json; charset=utf-8"}):
                ok = await http.post(f"{url}/v1/completions", content=body, headers=headers)
                assert ok.status_code == 200, ok.text
    assert llm.stats()["num_finished"] == 2


async def test_an_oversized_body_is_a_413_before_it_is_read(llm):
    app = create_app(llm, model_name=MODEL, max_body_bytes=1000)
    big = json.dumps({"model": MODEL, "prompt": "x" * 5000, "max_tokens": 2}).encode()
    async with running_server(app) as base:
        with anyio.fail_after(20):
            # Declared too large: answered at once, though not one byte of the body is sent.
            status, answer = await exchange(base, request_head("/v1/completions", len(big)), [])
            assert status == 413 and b"body_too_large" in answer and b"connection: close" in answer.lower()
            # Chunked: counted as it comes, answered when it passes the limit.
            chunks = [b"%x\r\n%s\r\n" % (300, big[i : i + 300]) for i in range(0, 1500, 300)]
            status, answer = await exchange(base, request_head("/v1/completions", None), chunks, pause=0.05)
            assert status == 413
            async with httpx.AsyncClient() as http:  # under the limit: served
                small = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
                assert (await http.post(f"{base}/v1/completions", json=small)).status_code == 200
    registry = app.state.serving.metrics.registry
    assert (
        registry.get_sample_value("async_llm_http_requests_total", {"endpoint": "/v1/completions", "status": "413"})
        == 2
    )
    assert llm.stats()["num_finished"] == 1 and llm.stats()["num_running"] == 0


async def test_a_body_that_trickles_in_gets_a_408_in_bounded_time(llm):
    app = create_app(llm, model_name=MODEL, body_timeout_s=0.5)
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}).encode()
    async with running_server(app) as base:
        started = asyncio.get_running_loop().time()
        with anyio.fail_after(10):
            parts = [body[i : i + 4] for i in range(0, len(body), 4)]  # 4 bytes every 0.1 s: > 1 s in all
            status, answer = await exchange(base, request_head("/v1/completions", len(body)), parts, pause=0.1)
        assert status == 408 and b'"code":"timeout"' in answer
        assert asyncio.get_running_loop().time() - started < 3
        async with httpx.AsyncClient() as http:  # the same body sent at once is served
            with anyio.fail_after(10):
                response = await http.post(f"{base}/v1/completions", content=body)
        assert response.status_code == 200
    assert llm.stats()["num_finished"] == 1


def test_body_limits_reject_nonsense_settings(llm):
    with pytest.raises(ValueError, match="max_body_bytes"):
        create_app(llm, max_body_bytes=0)
    with pytest.raises(ValueError, match="body_timeout_s"):
        create_app(llm, body_timeout_s=0)


async def test_unknown_model_is_a_404_and_models_lists_the_served_one(client):
    with anyio.fail_after(10):
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        with pytest.raises(openai.NotFoundError) as info:
            await client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


async def test_full_queue_gets_429_at_once(tiny_model, tiny_tokenizer, monkeypatch):
    # The running request's decode steps wait on a gate, so it cannot finish (and free its row)
    # before the test has filled the queue, however fast the machine is.
    gate = threading.Event()
    forward = tiny_model.forward

    def gated(*args: Any, **kwargs: Any) -> Any:
        if kwargs["input_ids"].shape[-1] == 1:  # a decode step (the prompts below are longer)
            gate.wait(30)
        return forward(*args, **kwargs)

    async with (
        HuggingFaceLLM(
            model=tiny_model,
            tokenizer=tiny_tokenizer,
            device="cpu",
            max_batch_size=1,
            max_queue_size=1,
            fast_path=False,
        ) as small,
        running_server(create_app(small, model_name=MODEL)) as base,
        openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=30) as c,
    ):
        monkeypatch.setattr(tiny_model, "forward", gated)
        long = {
            "model": MODEL,
            "prompt": "The quick brown fox",
            "max_tokens": 900,
            "stream": True,
            "extra_body": {"ignore_eos": True},
        }
        try:
            with anyio.fail_after(30):
                running = await c.completions.create(**long)
                await wait_for(lambda: small.stats()["num_running"] == 1)
                waiting = await c.completions.create(**long)
                await wait_for(lambda: small.stats()["num_waiting"] == 1)
                # Refused at once, never queued: a queued request would wait behind the gated
                # forward until this bound (which only stops a hang).
                with anyio.fail_after(20), pytest.raises(openai.RateLimitError) as info:
                    await c.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
                assert info.value.body["type"] == "rate_limit_error"
                await running.close()
                await waiting.close()
        finally:
            gate.set()
        await wait_for(lambda: small.stats()["num_running"] == 0 and small.stats()["num_waiting"] == 0)


async def test_generation_failure_is_a_500_or_an_error_event(client, llm, monkeypatch):
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(llm.engine.runner, "run", broken)
    with anyio.fail_after(20):
        with pytest.raises(openai.InternalServerError, match="injected fault"):
            await client.completions.create(model=MODEL, prompt="Hi", max_tokens=4)
        stream = await client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, stream=True)
        with pytest.raises(openai.APIError, match="injected fault"):
            async for _ in stream:
                pass
    monkeypatch.undo()
    with anyio.fail_after(20):  # the server (and the engine) keep serving
        assert (await client.completions.create(model=MODEL, prompt="Hi", max_tokens=4)).choices[0].text


async def test_closed_engine_is_a_503(client, url, llm):
    await llm.aclose()
    with anyio.fail_after(10):
        with pytest.raises(openai.InternalServerError) as info:
            await client.completions.create(model=MODEL, prompt="Hi", max_tokens=4)
        assert info.value.status_code == 503
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{url}/health")).status_code == 503


# -- auth, health, metrics ---------------------------------------------------------------------------------
async def test_api_key_is_required_when_set(llm):
    async with running_server(create_app(llm, model_name=MODEL, api_key="s3cret")) as base:
        with anyio.fail_after(20):
            async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0) as c:
                with pytest.raises(openai.AuthenticationError) as info:
                    await c.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
                assert info.value.body["code"] == "invalid_api_key"
            async with httpx.AsyncClient() as http:  # no key at all, or another scheme
                assert (await http.get(f"{base}/v1/models")).status_code == 401
                assert (
                    await http.get(f"{base}/v1/models", headers={"authorization": "Basic s3cret"})
                ).status_code == 401
                assert (await http.post(f"{base}/v1/completions", json={"nonsense": 1})).status_code == 401
                assert (await http.get(f"{base}/health")).status_code == 200
            async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0) as c:
                assert (await c.completions.create(model=MODEL, prompt="Hi", max_tokens=2)).choices


def test_api_key_comes_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert resolve_api_key(None) is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert resolve_api_key(None) == "from-env"
    assert resolve_api_key("from-flag") == "from-flag"


async def test_health_and_prometheus_metrics(client, url, llm):
    prompt = "The quick brown fox jumps over the lazy dog. " * 6  # more than two 32-token blocks
    with anyio.fail_after(20):
        await client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
        await client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{url}/health")).json() == {"status": "ok"}
            response = await http.get(f"{url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    values = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["async_llm_requests_running"] == 0 and values["async_llm_requests_waiting"] == 0
    assert values["async_llm_generation_tokens_total"] >= 1
    assert values["async_llm_generation_tokens_per_second"] > 0
    assert values["async_llm_time_to_first_token_seconds_count"] == 2
    assert values['async_llm_http_requests_total{endpoint="/v1/completions",status="200"}'] == 2
    stats = llm.stats()  # the prefix cache, as the engine counts it: the second prompt came from it
    assert values["async_llm_prefix_cache_hits_total"] == stats["prefix_cache_hit_tokens"] >= 64
    assert values["async_llm_prefix_cache_queries_total"] == stats["prefix_cache_queried_tokens"]
    assert values["async_llm_prefix_cache_bytes"] == stats["prefix_cache_bytes"] > 0
    assert values["async_llm_prefill_computed_tokens_total"] == stats["prefill_computed_tokens"]
    # vLLM's names, as its dashboards and the Gateway API inference extension read them.
    assert values["vllm:num_requests_running"] == 0 and values["vllm:num_requests_waiting"] == 0
    assert values["vllm:kv_cache_usage_perc"] == 0.0  # idle: no row holds keys and values
    assert values["vllm:generation_tokens_total"] == stats["tokens_generated"]
    assert values["vllm:prompt_tokens_total"] == values["async_llm_prompt_tokens_total"] > 0
    assert values["vllm:prefix_cache_hits_total"] == stats["prefix_cache_hit_tokens"]
    assert values["vllm:num_preemptions_total"] == stats["num_preempted"] == 0
    assert values["vllm:time_to_first_token_seconds_count"] == values["vllm:e2e_request_latency_seconds_count"] == 2
    assert values["vllm:time_per_output_token_seconds_count"] == 2


def test_serve_command_defaults_to_loopback():
    from async_llm import cli

    args = cli.build_parser().parse_args(["serve"])
    assert (args.command, args.host, args.port, args.api_key, args.model) == ("serve", "127.0.0.1", 8000, None, None)
    assert (args.ray, args.replicas, args.max_batch_size) == (False, 1, None)  # None: the engine sizes it
    args = cli.build_parser().parse_args(["serve", "--ray", "--replicas", "3", "--api-key", "k", "--port", "0"])
    assert (args.ray, args.replicas, args.api_key, args.port) == (True, 3, "k", 0)
    args = cli.build_parser().parse_args(["serve", "--max-body-bytes", "10", "--body-timeout", "2.5"])
    assert (args.max_body_bytes, args.body_timeout, args.limit_concurrency) == (10, 2.5, None)
    for bad in (["--body-timeout", "0"], ["--body-timeout", "nan"], ["--max-body-bytes", "0"]):
        with pytest.raises(cli._UsageError, match=bad[0]):
            cli.build_parser().parse_args(["serve", *bad])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--routing", "prefix"], "--routing needs --ray"),
        (["--max-replicas", "2"], "--max-replicas needs --ray"),
        (["--ray", "--replicas", "3", "--max-replicas", "2"], r"--max-replicas \(2\) is below --replicas \(3\)"),
    ],
)
async def test_serve_refuses_ray_options_it_cannot_honour(argv, message):
    """Refused before anything loads or listens (nothing reaches Ray or a model)."""
    from async_llm import cli
    from async_llm.cli.commands import serve
    from async_llm.cli.parser import UsageError

    args = cli.build_parser().parse_args(["serve", *argv])
    with pytest.raises(UsageError, match=message):
        await serve(args)
    with pytest.raises(cli._UsageError, match="routing"):
        cli.build_parser().parse_args(["serve", "--ray", "--routing", "random"])


async def test_choices_are_merged_without_a_task_per_stream():
    """`n` streamed choices are read in one task (each stream wakes one event): deltas come in
    arrival order, each choice's end after its text, and a failed choice raises after its text."""
    from async_llm.engine.output import FinishReason, RequestOutput
    from async_llm.outputs import StreamDelta, TokenStream
    from async_llm.serve.serving import _merge

    loop = asyncio.get_running_loop()
    aborted: list[str] = []
    streams = [TokenStream(f"r{i}", loop, aborted.append) for i in range(2)]
    tasks_before = len(asyncio.all_tasks())
    merged = _merge(streams)
    streams[1].put(RequestOutput("r1", "b", [2]))
    assert await merged.__anext__() == (1, StreamDelta("b", [2], None))
    assert len(asyncio.all_tasks()) == tasks_before  # no pump tasks
    streams[0].put(RequestOutput("r0", "a", [1]))
    streams[0].put(RequestOutput("r0", "a2", [3], FinishReason.STOP))
    assert await merged.__anext__() == (0, StreamDelta("aa2", [1, 3], None))
    assert await merged.__anext__() == (0, None)
    loop.call_soon(streams[1].put, RequestOutput("r1", "c", [4], FinishReason.ERROR, RuntimeError("boom")))
    assert await merged.__anext__() == (1, StreamDelta("c", [4], None))  # the woken read
    with pytest.raises(RuntimeError, match="boom"):
        await merged.__anext__()
    assert aborted == []


async def test_a_request_speculates_over_http_and_metrics_count_its_drafts(client, url, llm):
    """``speculative_config`` per request (the server's engine has none), counted on /metrics with
    vLLM's names; a bad one is a 400 naming the key."""
    body = {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3}, "ignore_eos": True}
    with anyio.fail_after(30):
        done = await client.completions.create(
            model=MODEL, prompt="the the the the the", max_tokens=120, extra_body=body
        )
        assert done.usage.completion_tokens == 120
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"{url}/metrics")).text
            bad = await http.post(
                f"{url}/v1/completions",
                json={
                    "model": MODEL,
                    "prompt": "hi",
                    "speculative_config": {"method": "ngram", "num_speculative_tokens": 0},
                },
            )
    values = {}
    for line in metrics.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    stats = llm.stats()
    assert values["async_llm_spec_decode_num_draft_tokens_total"] == stats["spec_decode_num_draft_tokens"] > 0
    assert values["async_llm_spec_decode_num_accepted_tokens_total"] == stats["spec_decode_num_accepted_tokens"]
    assert bad.status_code == 400 and "num_speculative_tokens" in bad.text


async def test_deadlines_over_http_are_408_or_504_and_a_final_stream_event(client, url, llm, monkeypatch):
    """``timeout`` past its end: 504 naming the limit (``code``); a streamed one ends with an error
    event after the chunks it sent; a ``priority`` this FCFS server cannot honour is a 400."""
    run = llm.engine.runner.run

    def slow(forward, batch):  # 900 tokens outlast the deadline however fast the machine
        time.sleep(0.01)
        return run(forward, batch)

    monkeypatch.setattr(llm.engine.runner, "run", slow)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 900, "ignore_eos": True, "timeout": 1.5}
    with anyio.fail_after(30):
        async with httpx.AsyncClient() as http:
            late = await http.post(f"{url}/v1/completions", json=body)
            streamed = await http.post(f"{url}/v1/completions", json={**body, "stream": True})
            ok = await http.post(
                f"{url}/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 3, "priority": 0}
            )
            unhonoured = await http.post(
                f"{url}/v1/completions", json={"model": MODEL, "prompt": "Hello", "priority": -2}
            )
            bad = await http.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "Hello", "priority": "high"})
    assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
    events = [line.removeprefix("data: ") for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert streamed.status_code == 200 and '"text"' in events[0]
    assert json.loads(events[-2])["error"]["code"] == "timeout" and events[-1] == "[DONE]"
    assert ok.status_code == 200
    assert unhonoured.status_code == 400 and "scheduling_policy" in unhonoured.json()["error"]["message"]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "priority"
    assert not llm.engine.batch.holds_rows()


def test_a_timed_out_wait_maps_to_408_and_a_timed_out_run_to_504():
    from async_llm.errors import RequestTimeoutError
    from async_llm.serve.errors import from_exception

    assert from_exception(RequestTimeoutError("queue_timeout", 1.0)).status == 408
    for limit in ("timeout", "stall_timeout"):
        error = from_exception(RequestTimeoutError(limit, 2.0, [1, 2]))
        assert error.status == 504 and error.code == limit and "2 tokens produced" in error.message
