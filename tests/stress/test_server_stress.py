"""The HTTP server under hostile clients: bulk disconnects, bad bodies, slow bodies, bad keys.

Each test runs uvicorn in the test's loop on a free port over the tiny model, mixes good clients in
with the hostile ones, and checks three things: every good answer equals the engine's own greedy
answer, every hostile request gets its typed error (or nothing, when it went away), and afterwards
nothing is running or waiting and the KV buffer is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections import Counter
from typing import Any

import anyio
import httpx

from async_llm import HuggingFaceLLM
from async_llm.serve import create_app
from async_llm.serve.server import running_server
from tests.rawhttp import exchange, request_head
from tests.stress.conftest import scaled

MODEL = "tiny"
KEY = "s3cret"
AUTH = {"authorization": f"Bearer {KEY}"}
PROMPTS = ["Hello", "The quick brown fox", "日本語 🎉", "def hello(name):", "What is the capital of France?"]


async def _settled(llm: HuggingFaceLLM, timeout: float = 30.0) -> None:
    with anyio.fail_after(timeout):
        while (s := llm.stats())["num_running"] or s["num_waiting"] or llm.engine.batch.kv is not None:
            await asyncio.sleep(0.02)


async def _solo(llm: HuggingFaceLLM, prompts: list[str], tokens: int) -> dict[str, str]:
    return {p: await llm.arun(p, chat_template=False, max_tokens=tokens, ignore_eos=True) for p in prompts}


async def _good(http: httpx.AsyncClient, base: str, prompt: str, tokens: int, stream: bool) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": tokens, "ignore_eos": True, "stream": stream}
    if not stream:
        response = await http.post(f"{base}/v1/completions", json=body, headers=AUTH)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]
    text = []
    async with http.stream("POST", f"{base}/v1/completions", json=body, headers=AUTH) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                text.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(text)


async def test_bulk_disconnects_free_every_row(tiny_model, tiny_tokenizer):
    """Hundreds of clients; most go away at random points (after k stream chunks, or by timing out a
    plain request); the rest must get exact answers, and every abandoned row must be freed."""
    rng = random.Random(7)
    total = scaled(300, minimum=40)
    async with HuggingFaceLLM(
        model=tiny_model, tokenizer=tiny_tokenizer, max_batch_size=32, max_queue_size=total
    ) as llm:
        solo = await _solo(llm, PROMPTS, 24)
        submitted = len(PROMPTS)
        engine_submit = llm.engine.submit

        def counting_submit(request: Any) -> None:
            nonlocal submitted
            engine_submit(request)
            submitted += 1

        llm.engine.submit = counting_submit  # type: ignore[method-assign]
        app = create_app(llm, model_name=MODEL, api_key=KEY)
        limits = httpx.Limits(max_connections=total, max_keepalive_connections=0)
        async with running_server(app) as base, httpx.AsyncClient(limits=limits, timeout=60) as http:

            async def leaver(prompt: str) -> str:
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 400, "ignore_eos": True}
                if rng.random() < 0.3:  # plain request, client gives up waiting
                    with contextlib.suppress(httpx.ReadTimeout):
                        await http.post(
                            f"{base}/v1/completions", json=body, headers=AUTH,
                            timeout=httpx.Timeout(60, read=rng.uniform(0.05, 0.5)),
                        )  # fmt: skip
                        return "finished"
                    return "left"
                chunks = rng.randint(0, 6)
                async with http.stream(
                    "POST", f"{base}/v1/completions", json={**body, "stream": True}, headers=AUTH
                ) as r:
                    assert r.status_code == 200
                    seen = 0
                    async for line in r.aiter_lines():
                        seen += line.startswith("data: {")
                        if seen > chunks:
                            return "left"  # leaving the block closes the connection mid-stream
                return "finished"

            jobs: list[tuple[str, Any]] = []
            for _ in range(total):
                prompt = rng.choice(PROMPTS)
                if rng.random() < 0.3:
                    jobs.append((prompt, _good(http, base, prompt, 24, stream=rng.random() < 0.5)))
                else:
                    jobs.append(("", leaver(prompt)))
            with anyio.fail_after(240):
                results = await asyncio.gather(*(job for _, job in jobs))
            good = [(prompt, text) for (prompt, _), text in zip(jobs, results, strict=True) if prompt]
            assert good and all(text == solo[prompt] for prompt, text in good)
            outcomes = Counter(text for (prompt, _), text in zip(jobs, results, strict=True) if not prompt)
            assert outcomes["left"] > total // 3, outcomes
            await _settled(llm)
            stats = llm.stats()
            # Every request that reached the engine ended (finished or aborted): none is left over.
            # Under this load some clients leave before the server has read their request at all.
            assert stats["num_failed"] == 0
            assert stats["num_finished"] + stats["num_aborted"] == submitted
            assert 0 < stats["num_aborted"] <= outcomes["left"]
            print(
                f"server disconnects: {total} clients, {outcomes['left']} left mid-way, {submitted - len(PROMPTS)} "
                f"reached the engine, {stats['num_aborted']} aborted there, {len(good)} good answers exact"
            )
            # and the server still answers exactly
            with anyio.fail_after(30):
                assert await _good(http, base, PROMPTS[0], 24, stream=True) == solo[PROMPTS[0]]


def _hostile_requests(max_body: int) -> list[tuple[str, dict[str, str], bytes, int]]:
    """(path, headers, body, expected status) for every kind of bad request the server must refuse."""
    ok = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 4}).encode()
    json_ct = {"content-type": "application/json", **AUTH}
    completions, chat = "/v1/completions", "/v1/chat/completions"
    return [
        (completions, json_ct, b'{"model": "tiny", "prompt": "Hi", ', 400),  # truncated
        (completions, json_ct, b"not json at all", 400),
        (completions, json_ct, b"[1, 2, 3]", 400),  # valid JSON, not an object
        (completions, json_ct, b'"just a string"', 400),
        (completions, json_ct, b"", 400),
        (completions, json_ct, b"\xff\xfe\xfa invalid utf-8", 400),
        (completions, json_ct, b'{"prompt": "\\ud800 lone surrogate", "model": "tiny", "max_tokens": 2}', 400),
        (completions, json_ct, b"[" * 20_000 + b"]" * 20_000, 400),  # nesting deeper than any parser's stack
        (completions, json_ct, b'{"model": "tiny", "prompt": "Hi", "max_tokens": NaN}', 400),
        (completions, json_ct, b'{"model": "tiny", "prompt": "Hi", "max_tokens": 1e999}', 400),
        (completions, json_ct, b'{"model": "tiny", "prompt": {"nested": ["x"]}}', 400),
        (chat, json_ct, b'{"model": "tiny", "messages": "hello"}', 400),
        (chat, json_ct, b'{"model": "tiny", "messages": [{"role": "user", "content": 5}]}', 400),
        (completions, json_ct, json.dumps({"model": MODEL, "prompt": "x" * (max_body + 10)}).encode(), 413),
        (completions, {"content-type": "text/plain", **AUTH}, ok, 415),
        (completions, {"content-type": "application/x-www-form-urlencoded", **AUTH}, b"model=tiny&prompt=Hi", 415),
        (completions, {"content-type": "application/xml", **AUTH}, b"<prompt>Hi</prompt>", 415),
        (completions, {"content-type": "application/json"}, ok, 401),  # no key
        (completions, {"content-type": "application/json", "authorization": "Bearer wrong"}, ok, 401),
        (completions, {"content-type": "application/json", "authorization": f"Basic {KEY}"}, ok, 401),
        (completions, {"content-type": "application/json", "authorization": "Bearer"}, ok, 401),
        ("/v1/models", {"authorization": f"Bearer {KEY}x"}, b"", 401),
        ("/v1/nowhere", json_ct, ok, 404),
    ]


async def test_hostile_bodies_and_keys_among_good_requests(tiny_model, tiny_tokenizer):
    rng = random.Random(11)
    max_body = 64 * 1024
    rounds = scaled(10, minimum=2)
    async with HuggingFaceLLM(
        model=tiny_model, tokenizer=tiny_tokenizer, max_batch_size=16, max_queue_size=1000
    ) as llm:
        solo = await _solo(llm, PROMPTS, 16)
        app = create_app(llm, model_name=MODEL, api_key=KEY, max_body_bytes=max_body)
        hostile = _hostile_requests(max_body)
        async with running_server(app) as base, httpx.AsyncClient(timeout=60) as http:

            async def bad(path: str, headers: dict[str, str], body: bytes, expected: int) -> None:
                method = "GET" if path == "/v1/models" else "POST"
                response = await http.request(method, f"{base}{path}", content=body, headers=headers)
                assert response.status_code == expected, (path, headers, body[:80], response.text[:300])
                if expected != 200:
                    error = response.json()["error"]
                    assert error["message"] and error["type"], error

            jobs = []
            for _ in range(rounds):
                jobs += [bad(*case) for case in hostile]
                jobs += [_good(http, base, p, 16, stream=rng.random() < 0.5) for p in PROMPTS]
            rng.shuffle(jobs)
            with anyio.fail_after(240):
                results = await asyncio.gather(*jobs, return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            assert not errors, errors[:3]
            texts = Counter(r for r in results if isinstance(r, str))
            assert sum(texts.values()) == rounds * len(PROMPTS)
            assert set(texts) <= set(solo.values()), set(texts) - set(solo.values())
            await _settled(llm)
            assert llm.stats()["num_failed"] == 0
            registry = app.state.serving.metrics.registry
            assert (
                registry.get_sample_value(
                    "async_llm_http_requests_total", {"endpoint": "/v1/completions", "status": "500"}
                )
                is None
            )
            print(
                f"hostile: {rounds * len(hostile)} bad requests ({len(hostile)} kinds) "
                f"among {sum(texts.values())} good ones"
            )


async def _trickle(base: str, body: bytes, step: int, pause: float, send_body: bool = True) -> tuple[int | None, float]:
    """A slowloris client: full headers, then ``step`` bytes of body every ``pause`` s (or nothing at
    all). Returns the status the server answered with and when it answered."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    head = request_head("/v1/completions", len(body), {"content-type": "application/json", **AUTH})
    parts = [body[i : i + step] for i in range(0, len(body), step)] if send_body else []
    status, _ = await exchange(base, head, parts, pause)
    return status, loop.time() - started


async def test_slow_bodies_are_cut_off_while_good_clients_are_served(tiny_model, tiny_tokenizer):
    body_timeout = 1.0
    slow = scaled(100, minimum=10)
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, max_batch_size=16) as llm:
        solo = await _solo(llm, PROMPTS, 16)
        app = create_app(llm, model_name=MODEL, api_key=KEY, body_timeout_s=body_timeout)
        body = json.dumps({"model": MODEL, "prompt": "Hello " * 40, "max_tokens": 4}).encode()
        async with running_server(app) as base, httpx.AsyncClient(timeout=60) as http:
            trickles = [
                asyncio.ensure_future(_trickle(base, body, step=3, pause=0.2, send_body=i % 4 != 0))
                for i in range(slow)  # every fourth sends its headers and then nothing at all
            ]
            with anyio.fail_after(60):
                # Good clients meanwhile: served at once, not after the slow ones.
                for prompt in PROMPTS:
                    assert await _good(http, base, prompt, 16, stream=False) == solo[prompt]
                results = await asyncio.gather(*trickles)
        statuses = Counter(status for status, _ in results)
        assert statuses == {408: slow}, statuses
        slowest = max(elapsed for _, elapsed in results)
        assert slowest < body_timeout + 5
        print(f"slowloris: {slow} slow clients, all 408, the last answered {slowest:.2f} s after it connected")
        await _settled(llm)
        assert llm.stats()["num_finished"] == 2 * len(PROMPTS)  # the slow ones never reached the engine
