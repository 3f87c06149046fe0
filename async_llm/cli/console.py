"""What the ``async-llm`` command writes to stderr: its one progress line per load, the library's
log events, and its one-line errors with the exit status that goes with them."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator

__all__ = ["EXIT_INTERRUPTED", "EXIT_RUNTIME", "EXIT_USAGE", "CliLogging", "ReadableEvents", "fail", "progress"]

#: Exit statuses: a runtime failure of the library, a usage error, interrupted (Ctrl-C).
EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def fail(message: str, code: int) -> int:
    """Print the first line of ``message`` on stderr and return ``code`` (the exit status)."""
    first_line = message.strip().splitlines()[0] if message.strip() else "error"
    print(first_line, file=sys.stderr, flush=True)
    return code


class CliLogging:
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
        self._handler.setFormatter(ReadableEvents() if verbosity == 0 else logging.Formatter("%(message)s"))
        self._saved_level = logging.NOTSET

    def __enter__(self) -> None:
        self._saved_level = self._logger.level
        self._logger.setLevel(self._level)
        self._logger.addHandler(self._handler)

    def __exit__(self, *exc_info: object) -> None:
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._saved_level)


class ReadableEvents(logging.Formatter):
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


@contextlib.contextmanager
def progress(what: str, verbosity: int) -> Iterator[None]:
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
