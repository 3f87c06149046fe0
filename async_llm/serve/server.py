"""``async-llm serve``: the OpenAI-compatible server from the command line, on uvicorn or Ray Serve.

The command line is the application here, so this module may configure uvicorn's logging (uvicorn's
defaults: its start line and errors on stderr) and block in ``ray.init``/``serve.run`` on the main
loop, which serves nothing else while the Ray path runs.

The listening socket is bound (:func:`bind_listener`) before the model loads, so a port in use is
reported at once rather than after a load of seconds or minutes; uvicorn then serves on that socket.
On Ctrl-C (or SIGTERM) uvicorn stops accepting, the streams still open end with an error event and
``data: [DONE]`` (see :mod:`async_llm.serve.openai_app`), and the engine closes. Both serving
functions return the signal that stopped them; the command turns SIGINT into its exit status 130.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

import anyio
import uvicorn
from uvicorn.server import HANDLED_SIGNALS

from async_llm.log import get_logger
from async_llm.serve.limits import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES

if TYPE_CHECKING:
    from async_llm.llm.huggingface import HuggingFaceLLM

__all__ = ["API_KEY_ENV", "bind_listener", "resolve_api_key", "running_server", "serve_http", "serve_ray"]

log = get_logger("async_llm.serve")

#: Environment variable read for the API key when ``--api-key`` is not given.
API_KEY_ENV = "ASYNC_LLM_API_KEY"
#: Seconds uvicorn waits at shutdown for open requests before it cancels them. Streams end sooner:
#: they are told at once (``openai_app.SHUTDOWN_GRACE_S``).
SHUTDOWN_TIMEOUT_S = 10


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


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind the server's TCP socket now (not yet listening), so that a port in use is found before
    the model loads. :func:`serve_http` hands it to uvicorn.

    Args:
        host: Address to listen on (an IPv6 address contains ``:``).
        port: Port; 0 picks a free one.

    Returns:
        The bound socket (close it if it is never served).

    Raises:
        OSError: The address cannot be bound; the message names it and, for a port in use, says so.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As uvicorn does: a restart may reuse the port while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            why = "the port is in use (another server?); choose one with --port"
        else:
            why = exc.strerror or str(exc)
        error = OSError(f"cannot listen on {where}: {why}")
        error.errno = exc.errno  # kept for callers that test it; the message stays free of "[Errno N]"
        raise error from None
    sock.set_inheritable(True)
    return sock


class _CliServer(uvicorn.Server):
    """uvicorn on a socket bound beforehand, which tells its caller which signal stopped it.

    It logs its start line itself (uvicorn logs none when handed a socket). Its signals are handled
    as uvicorn does (the first SIGINT or SIGTERM shuts down gracefully, a second SIGINT at once), but
    the signal is not raised again at the end: uvicorn restores the previous handler and re-raises
    what it caught, so that the process ends as that handler decides. Under ``asyncio.run`` that
    handler turns SIGINT into KeyboardInterrupt (exit status 130), but a process that inherited
    SIGINT as ignored (a job started with ``&`` by a shell script, or by a test suite run so) has no
    such handler: the re-raised signal was dropped and the command exited 0. The signal is kept in
    :attr:`stopped_by` instead, and the command chooses its exit status from it.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        #: The last shutdown signal received (SIGINT or SIGTERM); None while none has come.
        self.stopped_by: signal.Signals | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stopped_by = signal.Signals(sig)
        super().handle_exit(sig, frame)  # uvicorn's (as patched by sse-starlette to end open streams)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and sockets:
            host, port = sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            message = "Uvicorn running on http://%s:%d (Press CTRL+C to quit)"
            logging.getLogger("uvicorn.error").info(message, shown, port)


async def serve_http(args: argparse.Namespace, llm: HuggingFaceLLM, listener: socket.socket) -> signal.Signals | None:
    """Serve ``llm`` with uvicorn on ``listener`` until interrupted; closes both.

    Args:
        args: The parsed ``serve`` arguments (``api_key``, ``served_model_name``, ``max_body_bytes``,
            ``body_timeout``, ``limit_concurrency``, ``reject_unknown_fields``, ``verbose``).
        llm: The loaded model (the app owns it: closed at shutdown).
        listener: The socket from :func:`bind_listener`.

    Returns:
        The signal that shut the server down (SIGINT or SIGTERM), or None when it stopped without
        one (its start-up failed; uvicorn has logged why).
    """
    from async_llm.serve.openai_app import create_app

    try:
        app = create_app(
            llm, model_name=args.served_model_name, api_key=resolve_api_key(args.api_key), owns_llm=True,
            max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
            body_timeout_s=args.body_timeout or DEFAULT_BODY_TIMEOUT_S,
            reject_unknown_fields=args.reject_unknown_fields,
        )  # fmt: skip
        config = uvicorn.Config(
            app, log_level="debug" if args.verbose > 1 else "info", access_log=args.verbose > 0,
            timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S, limit_concurrency=args.limit_concurrency,
        )  # fmt: skip
        server = _CliServer(config)
        await server.serve(sockets=[listener])
    finally:
        listener.close()  # uvicorn closes it too at shutdown; not when startup failed
        await llm.aclose()  # idempotent: the app's shutdown closed it unless startup failed
    return server.stopped_by


async def serve_ray(args: argparse.Namespace, engine_options: dict[str, Any] | None = None) -> signal.Signals:
    """Start (or join, with ``RAY_ADDRESS``) a Ray cluster and serve ``--replicas`` engines on it.

    Args:
        args: As for :func:`serve_http`, plus ``replicas`` and ``replica_cpus``.
        engine_options: ``HuggingFaceLLM`` keyword arguments of every replica's engine
            (``max_batch_size``, ``runner``, ``max_model_len``...; the command's engine flags).

    Returns:
        The signal (SIGINT for Ctrl-C, or SIGTERM) that shut the application and the local cluster down.

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
        replicas: dict[str, Any] = {"num_replicas": args.replicas}
        if getattr(args, "max_replicas", None) is not None:  # Serve scales on requests in flight per engine
            replicas = {"autoscaling_config": {"min_replicas": args.replicas, "max_replicas": args.max_replicas}}
        app = build_app(
            model, device=args.device, model_name=args.served_model_name, api_key=resolve_api_key(args.api_key),
            ray_actor_options={"num_cpus": args.replica_cpus}, routing=getattr(args, "routing", None) or "prefix",
            **replicas, **(engine_options or {}),
        )  # fmt: skip
        serve.run(app, blocking=False)  # returns once every replica has loaded its engine
        log.info("serving", url=f"http://{args.host}:{args.port}/v1", replicas=args.replicas)
        stopped_by = await _until_signalled()
    finally:
        serve.shutdown()
        ray.shutdown()
    return stopped_by


async def _until_signalled() -> signal.Signals:
    """Wait for SIGINT or SIGTERM and return which came; either shuts down cleanly (SIGTERM would
    otherwise kill the driver before it stops Serve and the Ray processes it started)."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()

    def stop(sig: signal.Signals) -> None:
        if not received.done():  # a second signal while shutting down changes nothing
            received.set_result(sig)

    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await received
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
