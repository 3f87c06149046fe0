"""Ray Serve: the deployment in Serve's local testing mode (fast), and two replicas on a real local
cluster behind Serve's HTTP proxy (bounded, a minute or so on 2 cores).

Marked ``ray``: the plain test run deselects them (``addopts``) and ``.ci/run`` runs them with
``-m ray`` after installing the ``ray`` extra. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

pytestmark = pytest.mark.ray

MODEL = "tiny"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def ray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Read by ray.init and inherited by every Ray process: no telemetry, no token files in ~/.ray.
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # In "cluster mode" Ray swaps 127.0.0.1 for the machine's address and its agents listen there;
    # off, every Ray process listens on loopback only. The driver reads the flag at import time,
    # so it is patched too (ray may have been imported before this fixture ran).
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    pytest.importorskip("ray.serve", reason="needs the ray extra: pip install 'async-llm[ray]'")
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)


def _app(model_dir: Path, **options: Any) -> Any:
    from async_llm.serve.ray import build_app

    return build_app(
        str(model_dir), model_name=MODEL, device="cpu", max_tokens=16, max_batch_size=8,
        ray_actor_options={"num_cpus": 0}, **options,
    )  # fmt: skip


def _engines(app: Any) -> Any:
    """The engine deployment of an app: behind the ingress with prefix routing, the app itself without."""
    deployment = app._bound_deployment
    if deployment.name == "AsyncLLMIngress":
        return deployment.init_args[0]._bound_deployment
    return deployment


def test_build_app_sizes_the_deployment_from_the_batch(ray_env):
    from async_llm.serve.ray import build_app

    deployment = _engines(build_app("unused", max_batch_size=16))
    # Serve's default of 5 ongoing requests would starve a batch of 16.
    assert deployment.max_ongoing_requests == 32 and deployment.num_replicas == 1
    scaled = build_app("unused", max_batch_size=16, autoscaling_config={"min_replicas": 1, "max_replicas": 4})
    config = _engines(scaled)._deployment_config.autoscaling_config
    assert (config.min_replicas, config.max_replicas, config.target_ongoing_requests) == (1, 4, 16)
    with pytest.raises(ValueError, match="not both"):
        build_app("unused", num_replicas=2, autoscaling_config={"max_replicas": 4})


def test_build_app_routes_by_prefix_through_an_ingress_by_default(ray_env):
    from async_llm.serve.ray import build_app

    app = build_app("unused", max_batch_size=16, num_replicas=2)
    assert app._bound_deployment.name == "AsyncLLMIngress" and app._bound_deployment.num_replicas == 1
    router = _engines(app)._deployment_config.request_router_config
    assert router.request_router_class == "async_llm.serve.ray_router.PrefixAffinityRouter"
    # An engine a batch behind another is passed over for it.
    assert router.request_router_kwargs == {"imbalance_threshold": 16}
    tuned = _engines(build_app("unused", router_kwargs={"imbalance_threshold": 3, "block_chars": 32}))
    assert tuned._deployment_config.request_router_config.request_router_kwargs == {
        "imbalance_threshold": 3, "block_chars": 32,
    }  # fmt: skip
    plain = build_app("unused", num_replicas=2, routing="power_of_two")._bound_deployment
    assert plain.name == "AsyncLLM" and plain.num_replicas == 2
    with pytest.raises(ValueError, match="routing"):
        build_app("unused", routing="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="router_kwargs"):
        build_app("unused", routing="power_of_two", router_kwargs={"block_chars": 8})
    with pytest.raises(ValueError, match="block_chars"):
        build_app("unused", router_kwargs={"block_chars": 0})


class _HandleToServer:
    """What the ingress's handle does, in process: ``relay.remote(request)`` streams from ``server``."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.cancelled = 0

    def options(self, **_: Any) -> _HandleToServer:
        return self

    @property
    def relay(self) -> _HandleToServer:
        return self

    def remote(self, request: Any) -> Any:
        handle = self
        messages = self.server.relay(request)

        class Stream:
            def __aiter__(self) -> Any:
                return messages

            def cancel(self) -> None:
                handle.cancelled += 1

        return Stream()


async def _call(app: Any, method: str, path: str, body: bytes = b"", *, stop_after_body: int | None = None):
    """Run one HTTP request through an ASGI app; returns (status, body chunks, the task)."""
    scope = {
        "type": "http", "http_version": "1.1", "method": method, "scheme": "http", "path": path,
        "raw_path": path.encode(), "root_path": "", "query_string": b"", "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000), "headers": [(b"content-type", b"application/json")],
        "asgi": {"version": "3.0"},
    }  # fmt: skip
    sent = [{"type": "http.request", "body": body, "more_body": False}]
    statuses: list[int] = []
    chunks: list[bytes] = []
    enough = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if sent:
            return sent.pop()
        await asyncio.Event().wait()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])
        elif message.get("body"):
            chunks.append(message["body"])
            if stop_after_body is not None and len(chunks) >= stop_after_body:
                enough.set()

    task = asyncio.create_task(app(scope, receive, send))
    waiter = asyncio.create_task(enough.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    return statuses[0] if statuses else None, chunks, task


async def test_ingress_relays_requests_to_the_replica_app_and_aborts_when_the_client_leaves(
    ray_env, tiny_model_dir, llm
):
    import json

    from async_llm.serve.ray import LLMServer
    from async_llm.serve.ray_router import LLMIngress

    server = object.__new__(LLMServer)  # the replica class, outside Serve (its __init__ is async)
    await server.__init__(str(tiny_model_dir), model_name=MODEL, llm_kwargs={"device": "cpu", "max_tokens": 16})
    handle = _HandleToServer(server)
    ingress = LLMIngress(handle, max_body_bytes=10_000)  # type: ignore[arg-type]
    try:
        with anyio.fail_after(60):
            body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 12}
            status, chunks, _ = await _call(ingress.asgi, "POST", "/v1/completions", json.dumps(body).encode())
            assert status == 200
            text = json.loads(b"".join(chunks))["choices"][0]["text"]
            assert text == await llm.arun(body["prompt"], chat_template=False, max_tokens=12)

            # Errors of the replica's app come back as they are; the ingress's own limits apply first.
            bad = json.dumps({"prompt": "Hi", "temperature": -1}).encode()
            status, chunks, _ = await _call(ingress.asgi, "POST", "/v1/completions", bad)
            assert status == 400 and "temperature" in b"".join(chunks).decode()
            status, chunks, _ = await _call(ingress.asgi, "POST", "/v1/completions", b"x" * 10_001)
            assert status == 413
            status, chunks, _ = await _call(ingress.asgi, "GET", "/v1/nothing")
            assert status == 404 and "/v1/chat/completions" in b"".join(chunks).decode()
            assert handle.cancelled == 0

            # A client that leaves mid-stream (Serve cancels the ingress's request): the relay is
            # cancelled, the replica's app with it, and the engine frees the row.
            long = json.dumps({"prompt": "Hi", "max_tokens": 500, "ignore_eos": True, "stream": True}).encode()
            status, chunks, task = await _call(ingress.asgi, "POST", "/v1/completions", long, stop_after_body=2)
            assert status == 200 and chunks[0].startswith(b"data: ")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert handle.cancelled == 1
            while (stats := server.stats())["num_aborted"] < 1 or stats["num_running"]:
                await asyncio.sleep(0.05)
    finally:
        await server.llm.aclose()


async def test_local_testing_mode_answers_streams_and_aborts(ray_env, tiny_model_dir, llm):
    from ray import serve

    handle = serve.run(_app(tiny_model_dir, routing="power_of_two"), name="local", _local_testing_mode=True)
    with anyio.fail_after(60):
        body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 12}
        response = await handle.completion.remote(body)
        assert response["choices"][0]["text"] == await llm.arun(body["prompt"], chat_template=False, max_tokens=12)

        chunks = [c async for c in handle.options(stream=True).stream_chat_completion.remote({"messages": CHAT})]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == await llm.arun(CHAT, max_tokens=16)  # the replica's default max_tokens is 16
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")

        with pytest.raises(Exception, match="temperature"):
            await handle.completion.remote({"prompt": "Hi", "temperature": -1})

        # Cancelling a handle stream (what Serve does when an HTTP client leaves) aborts the request.
        long = {"prompt": "Hi", "max_tokens": 500, "ignore_eos": True}
        stream = handle.options(stream=True).stream_completion.remote(long)
        assert (await stream.__anext__())["choices"][0]["finish_reason"] is None
        stream.cancel()
        while (stats := await handle.stats.remote())["num_aborted"] < 1 or stats["num_running"]:
            await asyncio.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def local_cluster(ray_env) -> Iterator[int]:
    """A 2-CPU Ray cluster on loopback with Serve's proxy on a free port; always torn down."""
    import ray
    from ray import serve

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray puts unix sockets in it
    port = _free_port()
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir)
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(300)
def test_two_replicas_stream_over_http_on_a_local_cluster(local_cluster, tiny_model_dir, tiny_model, tiny_tokenizer):
    import openai
    from ray import serve

    from async_llm import HuggingFaceLLM

    serve.run(_app(tiny_model_dir, num_replicas=2), name="llm", route_prefix="/")  # waits for both replicas
    prompts = [f"Prompt {i}: the quick brown fox" for i in range(8)]

    async def stream_all(client: openai.AsyncOpenAI) -> tuple[list[str], set[str]]:
        async def one(prompt: str) -> tuple[str, str]:
            stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, stream=True)
            chunks = [chunk async for chunk in stream]
            return "".join(c.choices[0].text for c in chunks if c.choices), chunks[0].system_fingerprint

        results = await asyncio.gather(*(one(p) for p in prompts))
        return [text for text, _ in results], {fingerprint for _, fingerprint in results}

    async def main() -> None:
        async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, device="cpu") as direct:
            expected = [await direct.arun(p, chat_template=False, max_tokens=24) for p in prompts]
        base = f"http://127.0.0.1:{local_cluster}/v1"
        async with openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60) as client:
            with anyio.fail_after(120):
                replicas: set[str] = set()
                for _ in range(5):  # Serve picks replicas at random: a few rounds see both
                    texts, fingerprints = await stream_all(client)
                    assert texts == expected
                    replicas |= fingerprints
                    if len(replicas) == 2:
                        break
                assert len(replicas) == 2, replicas
                models = await client.models.list()
                assert [m.id for m in models.data] == [MODEL]
                await same_prefix_same_replica(client)

    async def same_prefix_same_replica(client: openai.AsyncOpenAI) -> None:
        # Prefix routing: each system prompt's requests all reach one replica; the second system
        # prompt, first sent while the loads are equal, goes to the replica that has seen less.
        systems = [f"You are assistant number {n}. Answer in one short sentence, politely. " * 3 for n in (1, 2)]

        async def ask(system: str, question: str) -> str:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            response = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)  # type: ignore[arg-type]
            return str(response.system_fingerprint)

        # A Responses follow-up goes to the replica that keeps the response it continues (any other
        # would answer 404): its input alone, short and without a known prefix, says nothing.
        from async_llm.serve.responses import response_server

        bases: dict[str | None, str] = {}  # a response kept on each replica (new long inputs spread)
        for n in range(8):
            text = f"Conversation {n}: my name is Ada and this opening message is long enough to be routed."
            base = await client.responses.create(model=MODEL, input=text, max_output_tokens=4)
            bases.setdefault(response_server(base.id), base.id)
            if len(bases) == 2:
                break
        assert len(bases) == 2 and None not in bases, bases
        for _ in range(3):
            for base_id in bases.values():
                follow = await client.responses.create(
                    model=MODEL, input="Name?", previous_response_id=base_id, max_output_tokens=2
                )
                assert follow.previous_response_id == base_id and response_server(follow.id) == response_server(base_id)

        first = [await ask(system, "Hello?") for system in systems]
        assert first[0] != first[1], first
        questions = [f"Question {i}?" for i in range(6)]
        later = await asyncio.gather(*(ask(system, q) for system in systems for q in questions))
        assert later == [first[0]] * 6 + [first[1]] * 6

    asyncio.run(main())
