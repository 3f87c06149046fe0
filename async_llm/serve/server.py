"""``async-llm serve``: the OpenAI-compatible server from the command line, on uvicorn or Ray Serve.

The command line is the application here, so this module may configure uvicorn's logging (uvicorn's
defaults: its start line and errors on stderr) and block in ``ray.init``/``serve.run`` on the main
loop, which serves nothing else while the Ray path runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import uvicorn

from async_llm.log import get_logger

__all__ = ["API_KEY_ENV", "resolve_api_key", "running_server", "serve_http", "serve_ray"]

log = get_logger("async_llm.serve")

#: Environment variable read for the API key when ``--api-key`` is not given.
API_KEY_ENV = "ASYNC_LLM_API_KEY"


def resolve_api_key(flag: str | None) -> str | None:
    """The API key to require: ``--api-key``, else ``$ASYNC_LLM_API_KEY``, else none (open server)."""
    return flag or os.environ.get(API_KEY_ENV) or None


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: Ctrl-C belongs to the host program (a test runner)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def running_server(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = 30.0,  # noqa: ASYNC109  # bounds start-up and shutdown, not a caller's await
) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on the current event loop for the duration of the block.

    Args:
        app: An ASGI app (for example from :func:`create_app`).
        host: Address to listen on; loopback by default.
        port: Port; 0 picks a free one.
        timeout: Seconds to wait for the server to start, and for it to stop at the end.

    Returns:
        The base URL, e.g. ``http://127.0.0.1:54321``.

    Raises:
        TimeoutError: The server did not start within ``timeout``.
    """
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5
    )
    server = _EmbeddedServer(config)
    task = asyncio.ensure_future(server.serve())
    try:
        with anyio.fail_after(timeout):
            while not server.started:
                if task.done():
                    task.result()  # raises what made startup fail
                    raise RuntimeError("uvicorn stopped before it started")
                await asyncio.sleep(0.01)
        bound_port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        with anyio.fail_after(timeout):
            await asyncio.gather(task, return_exceptions=True)


async def serve_http(args: argparse.Namespace) -> int:
    """Load the model and serve it with uvicorn until interrupted.

    Args:
        args: The parsed ``serve`` arguments (``model``, ``device``, ``max_batch_size``, ``host``,
            ``port``, ``api_key``, ``served_model_name``, ``verbose``).

    Returns:
        0 after a clean shutdown.
    """
    from async_llm.llm.huggingface import HuggingFaceLLM
    from async_llm.serve.openai_app import create_app

    load = functools.partial(HuggingFaceLLM, args.model, device=args.device, max_batch_size=args.max_batch_size)
    llm = await anyio.to_thread.run_sync(load)
    try:
        app = create_app(
            llm, model_name=args.served_model_name, api_key=resolve_api_key(args.api_key), owns_llm=True,
            max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout,
        )  # fmt: skip
        config = uvicorn.Config(
            app, host=args.host, port=args.port, log_level="debug" if args.verbose > 1 else "info",
            access_log=args.verbose > 0, timeout_graceful_shutdown=10, limit_concurrency=args.limit_concurrency,
        )  # fmt: skip
        await uvicorn.Server(config).serve()
    finally:
        await llm.aclose()  # idempotent: the app's shutdown closed it unless startup failed
    return 0


async def serve_ray(args: argparse.Namespace) -> int:
    """Start (or join, with ``RAY_ADDRESS``) a Ray cluster and serve ``--replicas`` engines on it.

    Args:
        args: As for :func:`serve_http`, plus ``replicas`` and ``replica_cpus``.

    Returns:
        0 after SIGINT (Ctrl-C) or SIGTERM has shut the application and the local cluster down.

    Raises:
        ImportError: Ray Serve is not installed (the ``ray`` extra).
    """
    import ray
    from ray import serve

    from async_llm.serve.ray import build_app

    model = args.model
    if model is not None:
        path = await anyio.Path(model).expanduser()
        if await path.exists():
            model = str(await path.resolve())  # replicas may run in another directory
    ray.init(include_dashboard=False, ignore_reinit_error=True)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_app(
            model, num_replicas=args.replicas, max_batch_size=args.max_batch_size, device=args.device,
            model_name=args.served_model_name, api_key=resolve_api_key(args.api_key),
            ray_actor_options={"num_cpus": args.replica_cpus},
        )  # fmt: skip
        serve.run(app, blocking=False)  # returns once every replica has loaded its engine
        log.info("serving", url=f"http://{args.host}:{args.port}/v1", replicas=args.replicas)
        await _until_signalled()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


async def _until_signalled() -> None:
    """Wait for SIGINT or SIGTERM; either shuts down cleanly (SIGTERM would otherwise kill the
    driver before it stops Serve and the Ray processes it started)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
