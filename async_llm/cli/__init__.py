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

The modules: ``parser`` (the arguments), ``commands`` (what each command does), ``console`` (the
command's stderr: progress line, log events, errors), ``demo_view`` (the demo's live output). Only
the commands import the library's heavy parts, inside their bodies: ``--help`` and a bad argument
import no torch, transformers or web server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Sequence

# The underscored names are how tests reach this package's parts (main looks the commands up here,
# so that a test can replace one): the names they had when the command was one module.
from async_llm.cli.commands import DEMO_PROMPTS
from async_llm.cli.commands import batch as _batch
from async_llm.cli.commands import demo as _demo
from async_llm.cli.commands import generate as _generate
from async_llm.cli.commands import serve as _serve
from async_llm.cli.console import EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_USAGE, CliLogging, fail
from async_llm.cli.console import ReadableEvents as _ReadableEvents  # noqa: F401
from async_llm.cli.demo_view import tail_fitting as _tail_fitting  # noqa: F401
from async_llm.cli.parser import BODY_TIMEOUT_HELP as _BODY_TIMEOUT_HELP  # noqa: F401
from async_llm.cli.parser import MAX_BODY_HELP as _MAX_BODY_HELP  # noqa: F401
from async_llm.cli.parser import UsageError as _UsageError
from async_llm.cli.parser import build_parser
from async_llm.errors import AsyncLLMError, ModelNotAvailableError

__all__ = ["DEMO_PROMPTS", "build_parser", "main"]


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
        return fail(f"async-llm: error: {exc}", EXIT_USAGE)
    except SystemExit as exc:  # --help / --version: argparse has printed, report its code
        return exc.code if isinstance(exc.code, int) else 0
    runner = {"batch": _batch, "demo": _demo, "generate": _generate, "serve": _serve}[args.command]
    with CliLogging(args.verbose):
        try:
            return asyncio.run(runner(args))
        except KeyboardInterrupt:
            return fail("interrupted", EXIT_INTERRUPTED)
        except BrokenPipeError:
            # `async-llm demo | head`: the reader left. Point stdout at devnull so the interpreter's
            # final flush does not print a second BrokenPipeError, and exit quietly.
            with contextlib.suppress(OSError, ValueError):  # stdout without a file descriptor
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_RUNTIME
        except (_UsageError, ModelNotAvailableError, ValueError, OSError) as exc:
            # User-fixable: a bad parameter, a missing model or file. One line, no traceback.
            return fail(f"async-llm: error: {exc}", EXIT_USAGE)
        except AsyncLLMError as exc:
            return fail(f"async-llm: error: {type(exc).__name__}: {exc}", EXIT_RUNTIME)
