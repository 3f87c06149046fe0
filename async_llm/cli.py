"""The ``async-llm`` command: a streaming demo of concurrent requests, and one-off generation.

``async-llm demo`` sends several different prompts at once through one model and streams them
together, so the continuous batching is visible: on a terminal as a live panel with one line per
request, elsewhere (logs, CI) as ``[i] delta`` lines in arrival order. ``async-llm generate`` streams
one answer to stdout. ``async-llm serve`` serves the model over an OpenAI-compatible HTTP API.

Loading shows one line of the command's own on stderr (``loading NAME... done (6.2 s)``) and
nothing from transformers; the library's warnings appear as readable lines, and ``-v``/``-vv`` show
all its log events as JSON.

Exit codes: 0 success, 1 a runtime failure of the library, 2 a usage error (bad arguments,
invalid sampling parameters, a model that cannot be found, a port in use), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import textwrap
import time
import unicodedata
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn, TextIO

from async_llm.errors import AsyncLLMError, ModelNotAvailableError
from async_llm.llm.concurrency import gather

__all__ = ["DEMO_PROMPTS", "build_parser", "main"]

#: Prompts of the demo, deliberately varied so the answers differ in length and content.
DEMO_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Explain in two sentences why batching requests makes language model inference faster.",
    "Give me three tips for writing readable Python code.",
    "What is the difference between a list and a tuple in Python?",
    "Tell me a very short story about a robot that learns to paint.",
    "How do plants make their food?",
    "Translate 'good morning, how are you?' into Spanish and into French.",
)

_EXIT_RUNTIME, _EXIT_USAGE, _EXIT_INTERRUPTED = 1, 2, 130
# Redraw the live panel at most this often: redrawing per token for many rows floods slow terminals.
_REDRAW_INTERVAL_S = 1 / 30
# The serve command's body limits, shown in --help (async_llm.serve.limits holds the values; importing
# it here would import FastAPI for every command; tests/test_new_user.py checks these agree).
_MAX_BODY_HELP, _BODY_TIMEOUT_HELP = "4 MiB", "30"


class _UsageError(Exception):
    """Bad command-line arguments (argparse would otherwise print usage and call sys.exit)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse hook: raise instead of print + exit
        raise _UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``async-llm`` command.

    Returns:
        The parser; its ``command`` attribute names the chosen subcommand.
    """
    parser = _Parser(prog="async-llm", description="Run causal LMs with continuous batching and streaming.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug) to stderr")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    demo = commands.add_parser("demo", help="stream several different prompts at once through one model")
    _add_model_args(demo)
    demo.add_argument("--requests", type=_positive_int, default=6, help="number of concurrent requests (default 6)")
    demo.add_argument("--max-tokens", type=int, default=96, help="tokens per answer at most (default 96)")
    demo.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    demo.add_argument("--plain", action="store_true", help="print deltas as lines even on a terminal")

    gen = commands.add_parser("generate", help="stream the answer to one prompt to stdout")
    gen.add_argument("prompt", help="the prompt (the user message when a chat template is used)")
    _add_model_args(gen)
    gen.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    gen.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the library's)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1]")
    gen.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    gen.add_argument("--seed", type=int, default=None, help="seed of this request's sampling")
    gen.add_argument("--system-prompt", default=None, help="system message for the chat template")
    gen.add_argument(
        "--no-chat-template", dest="chat_template", action="store_false", help="send the prompt as raw text"
    )

    srv = commands.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    _add_model_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    srv.add_argument("--api-key", default=None, help="require this bearer key (default: $ASYNC_LLM_API_KEY)")
    srv.add_argument("--served-model-name", default=None, help="model id clients send (default: the model's)")
    # Defaults None: serve_http fills in async_llm.serve.limits' values.
    srv.add_argument(
        "--max-body-bytes", type=_positive_int, default=None,
        help=f"larger request bodies get 413 (default {_MAX_BODY_HELP})",
    )  # fmt: skip
    srv.add_argument(
        "--body-timeout", type=_positive_float, default=None,
        help=f"seconds a request body may take to arrive, else 408 (default {_BODY_TIMEOUT_HELP})",
    )  # fmt: skip
    srv.add_argument(
        "--limit-concurrency", type=_positive_int, default=None,
        help="open connections at most; more get 503 from uvicorn (default: no limit)",
    )  # fmt: skip
    srv.add_argument("--ray", action="store_true", help="serve replicas on Ray Serve (needs async-llm[ray])")
    srv.add_argument("--replicas", type=_positive_int, default=1, help="engines with --ray (default 1)")
    srv.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")

    # Listed for --help only: main() hands `bench ...` to the suite's own parser (async-llm bench --help).
    commands.add_parser("bench", help="benchmark suite against transformers and peers (async-llm bench --help)")
    return parser


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="model folder, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1, mps (default: best)")
    parser.add_argument("--max-batch-size", type=_positive_int, default=32, help="rows decoded together (default 32)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``async-llm`` command.

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit code (see the module docstring).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from async_llm.bench.cli import main as bench_main

        return bench_main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        return _fail(f"async-llm: error: {exc}", _EXIT_USAGE)
    except SystemExit as exc:  # --help / --version: argparse has printed, report its code
        return exc.code if isinstance(exc.code, int) else 0
    runner = {"demo": _demo, "generate": _generate, "serve": _serve}[args.command]
    with _CliLogging(args.verbose):
        try:
            return asyncio.run(runner(args))
        except KeyboardInterrupt:
            return _fail("interrupted", _EXIT_INTERRUPTED)
        except BrokenPipeError:
            # `async-llm demo | head`: the reader left. Point stdout at devnull so the interpreter's
            # final flush does not print a second BrokenPipeError, and exit quietly.
            with contextlib.suppress(OSError, ValueError):  # stdout without a file descriptor
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return _EXIT_RUNTIME
        except (_UsageError, ModelNotAvailableError, ValueError, OSError) as exc:
            # User-fixable: a bad parameter, a missing model or file. One line, no traceback.
            return _fail(f"async-llm: error: {exc}", _EXIT_USAGE)
        except AsyncLLMError as exc:
            return _fail(f"async-llm: error: {type(exc).__name__}: {exc}", _EXIT_RUNTIME)


def _fail(message: str, code: int) -> int:
    first_line = message.strip().splitlines()[0] if message.strip() else "error"
    print(first_line, file=sys.stderr, flush=True)
    return code


class _CliLogging:
    """Show the library's log events on stderr at the chosen level, restoring the logger afterwards.

    The library logs through the stdlib logger ``async_llm`` and never configures it; the command
    line is the application, so it decides: warnings and errors as readable lines by default, every
    event at the level asked for as the library's JSON lines with ``-v``/``-vv``. Restoring keeps
    ``main()`` from changing global state for whoever calls it (tests, notebooks).
    """

    def __init__(self, verbosity: int) -> None:
        self._level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
        self._logger = logging.getLogger("async_llm")
        self._handler = logging.StreamHandler(sys.stderr)
        self._handler.setFormatter(_ReadableEvents() if verbosity == 0 else logging.Formatter("%(message)s"))
        self._saved_level = logging.NOTSET

    def __enter__(self) -> None:
        self._saved_level = self._logger.level
        self._logger.setLevel(self._level)
        self._logger.addHandler(self._handler)

    def __exit__(self, *exc_info: object) -> None:
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._saved_level)


class _ReadableEvents(logging.Formatter):
    """A library event (a JSON line) as ``async-llm: warning: stream failed (error=...)``."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        try:
            event = json.loads(message)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            return f"async-llm: {record.levelname.lower()}: {message}"
        text = str(event.pop("event", ""))
        details = [f"{k}={v}" for k, v in event.items() if k not in ("logger", "level", "timestamp", "exception")]
        return f"async-llm: {record.levelname.lower()}: {text}" + (f" ({', '.join(details)})" if details else "")


def _check_model(model: str | None) -> str:
    """Check ``--model`` before anything loads, so a wrong path fails at once in one line, and return
    what the progress line says while it loads (converting a GGUF file first, when it must)."""
    from async_llm.loading.default import DEFAULT_MODEL_NAME, find_default_gguf
    from async_llm.loading.gguf import cached_conversion
    from async_llm.loading.paths import check_model_id

    if model is None:
        name, gguf = DEFAULT_MODEL_NAME, str(find_default_gguf())  # raises the install hint if missing
    else:
        check_model_id(model)
        path = os.path.expanduser(model)
        exists = os.path.exists(path)  # else a hub id: shown as given
        name, gguf = os.path.basename(os.path.normpath(path)) if exists else model, path
    if gguf.lower().endswith(".gguf") and cached_conversion(gguf) is None:
        return f"converting {os.path.basename(gguf)} to a transformers folder (once; later runs reuse it), loading it"
    return f"loading {name}"


@contextlib.contextmanager
def _progress(what: str, verbosity: int) -> Iterator[None]:
    """The command's one line on stderr about a load: ``what... done (6.2 s)``.

    The line is opened before the load and finished after, unless log lines may come in between
    (``-v``): it is then written whole at the end. On failure it ends with ``failed`` (on a terminal
    it is erased instead: the error line that follows says it all).
    """
    err = sys.stderr
    live = verbosity == 0
    tty = bool(getattr(err, "isatty", lambda: False)())
    if live:
        err.write(f"{what}...")
        err.flush()
    start = time.perf_counter()
    try:
        yield
    except BaseException as exc:
        if live:
            failed = " failed\n" if isinstance(exc, Exception) else "\n"
            err.write("\r\x1b[2K" if tty else failed)
            err.flush()
        raise
    seconds = time.perf_counter() - start
    err.write(f" done ({seconds:.1f} s)\n" if live else f"{what}... done ({seconds:.1f} s)\n")
    err.flush()


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Sampling overrides the user gave, validated now so a typo fails before a slow model load.

    Raises:
        _UsageError: the values are invalid (``SamplingParams`` raised ValueError/TypeError).
    """
    from async_llm import SamplingParams

    names = ("max_tokens", "temperature", "top_p", "top_k", "seed")
    kwargs = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    try:
        SamplingParams().merge(**kwargs)  # the same check the stream call makes, minus the model load
    except (ValueError, TypeError) as exc:
        raise _UsageError(f"invalid sampling parameters: {exc}") from None
    return kwargs


async def _serve(args: argparse.Namespace) -> int:
    import anyio

    from async_llm import HuggingFaceLLM
    from async_llm.serve.server import bind_listener, serve_http, serve_ray

    if not args.ray:
        what = _check_model(args.model)
        listener = bind_listener(args.host, args.port)  # a port in use fails now, not after the load
        load = functools.partial(HuggingFaceLLM, args.model, device=args.device, max_batch_size=args.max_batch_size)
        try:
            with _progress(what, args.verbose):
                llm = await anyio.to_thread.run_sync(load)
        except BaseException:
            listener.close()
            raise
        return await serve_http(args, llm, listener)
    try:
        return await serve_ray(args)
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("ray"):
            raise
        raise _UsageError("--ray needs Ray Serve: pip install 'async-llm[ray]'") from None


async def _generate(args: argparse.Namespace) -> int:
    from async_llm import HuggingFaceLLM

    sampling = _sampling_kwargs(args)
    with _progress(_check_model(args.model), args.verbose):
        llm = HuggingFaceLLM(
            model_id=args.model,
            device=args.device,
            max_batch_size=args.max_batch_size,
            system_prompt=args.system_prompt,
        )
    out = sys.stdout
    wrote = False
    async with llm:
        try:
            async for delta in llm.astream(args.prompt, chat_template=args.chat_template, **sampling):
                out.write(delta)
                out.flush()  # per delta: the point is to see tokens as they come
                wrote = True
        except BaseException:
            if wrote:  # end the partial line so the error message starts on its own line
                out.write("\n")
                out.flush()
            raise
    out.write("\n")
    out.flush()
    return 0


async def _demo(args: argparse.Namespace) -> int:
    from async_llm import HuggingFaceLLM

    sampling = _sampling_kwargs(args)
    with _progress(_check_model(args.model), args.verbose):
        llm = HuggingFaceLLM(model_id=args.model, device=args.device, max_batch_size=args.max_batch_size)
    out = sys.stdout
    prompts = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(args.requests)]
    texts = [""] * len(prompts)

    async with llm:
        view = _make_view(out, prompts, plain=args.plain)

        async def consume(i: int) -> None:
            async for delta in llm.astream(prompts[i], **sampling):
                texts[i] += delta
                view.on_delta(i, delta, texts)
            view.on_done(i, texts)

        start = time.perf_counter()
        try:
            # On the first failure (or Ctrl-C) the other streams stop too; closing a stream aborts it.
            await gather([functools.partial(consume, i) for i in range(len(prompts))])
        finally:
            view.close(texts)
        elapsed = time.perf_counter() - start
        stats = llm.stats()

    out.write("\nAnswers\n")
    for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        out.write(f"({i}) {prompt}\n{textwrap.indent(text.strip() or '(empty)', '    ')}\n")
    tokens = int(stats["tokens_generated"])
    rate = tokens / elapsed if elapsed > 0 else 0.0
    out.write(
        f"{len(prompts)} requests, {tokens} tokens in {elapsed:.2f} s: {rate:.1f} tokens/s, "
        f"peak batch size {int(stats['peak_batch_size'])}\n"
    )
    out.flush()
    return 0


class _LineView:
    """Non-terminal output: one ``[i] delta`` line per delta, in arrival order, flushed at once."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def on_delta(self, i: int, delta: str, texts: list[str]) -> None:
        # One line per delta keeps the interleaving readable in logs; newlines are shown escaped.
        self._out.write(f"[{i}] {delta.replace(chr(13), '').replace(chr(10), chr(92) + 'n')}\n")
        self._out.flush()

    def on_done(self, i: int, texts: list[str]) -> None:
        pass

    def close(self, texts: list[str]) -> None:
        pass


class _PanelView:
    """Terminal output: one line per request, rewritten in place (ANSI) as deltas arrive."""

    def __init__(self, out: TextIO, prompts: list[str], width: int) -> None:
        self._out = out
        self._width = max(20, width - 1)  # never fill the last column: some terminals wrap there
        self._done = [False] * len(prompts)
        self._last_draw = 0.0
        self._closed = False
        out.write("\x1b[?25l")  # hide the cursor while redrawing; close() shows it again
        out.write("".join(self._line(i, "") + "\n" for i in range(len(prompts))))
        out.flush()

    def _line(self, i: int, text: str) -> str:
        mark = "done" if self._done[i] else "...."
        head = f"[{i}] {mark} "
        flat = " ".join(text.split())  # one screen line per request: newlines would break the layout
        return head + _tail_fitting(flat, self._width - len(head))

    def _draw(self, texts: list[str]) -> None:
        n = len(texts)
        # Cursor n lines up, to column 0; rewrite every line (\x1b[2K clears what was there).
        lines = "".join("\x1b[2K" + self._line(i, texts[i]) + "\n" for i in range(n))
        self._out.write(f"\x1b[{n}F" + lines)
        self._out.flush()
        self._last_draw = time.monotonic()

    def on_delta(self, i: int, delta: str, texts: list[str]) -> None:
        if time.monotonic() - self._last_draw >= _REDRAW_INTERVAL_S:
            self._draw(texts)

    def on_done(self, i: int, texts: list[str]) -> None:
        self._done[i] = True
        self._draw(texts)

    def close(self, texts: list[str]) -> None:
        if not self._closed:
            self._closed = True
            self._draw(texts)
            self._out.write("\x1b[?25h")
            self._out.flush()


def _make_view(out: TextIO, prompts: list[str], *, plain: bool) -> _LineView | _PanelView:
    size = shutil.get_terminal_size(fallback=(80, 24))
    is_tty = bool(getattr(out, "isatty", lambda: False)())
    # The panel rewrites its lines by moving the cursor up; more lines than the screen can't work.
    if plain or not is_tty or len(prompts) > size.lines - 2:
        return _LineView(out)
    return _PanelView(out, prompts, size.columns)


def _char_width(ch: str) -> int:
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def _tail_fitting(text: str, width: int) -> str:
    """The end of ``text`` that fits ``width`` terminal columns (the newest tokens stay visible)."""
    if width <= 0:
        return ""
    used, start = 0, len(text)
    while start > 0 and used + _char_width(text[start - 1]) <= width:
        start -= 1
        used += _char_width(text[start])
    return text[start:] if start == 0 else "…" + text[start + 1 :]


if __name__ == "__main__":  # pragma: no cover - `python -m async_llm.cli`
    sys.exit(main())
