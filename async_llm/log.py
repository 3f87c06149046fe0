"""Structured logging: structlog event dicts rendered as JSON, emitted through stdlib ``logging``.

The library never configures logging globally and never prints: events go to the ``async_llm``
stdlib loggers, so the application decides where they land and at which level. Until it configures
logging (``logging.basicConfig()``, a handler of its own...) nothing is shown, warnings and errors
included: the ``async_llm`` logger has a ``NullHandler``, as the logging HOWTO asks of libraries, so
Python's last-resort handler never prints the library's JSON lines on stderr. Failures the caller
must see are raised, not logged. Disabled levels cost one level check.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

_PROCESSORS: list[Any] = [
    structlog.stdlib.filter_by_level,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.format_exc_info,
    structlog.processors.JSONRenderer(),
]

#: The root of the library's loggers.
ROOT_LOGGER = "async_llm"
_root = logging.getLogger(ROOT_LOGGER)
if not any(isinstance(h, logging.NullHandler) for h in _root.handlers):  # once, even if reloaded
    _root.addHandler(logging.NullHandler())


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger writing JSON lines to the stdlib logger ``name``."""
    logger: structlog.stdlib.BoundLogger = structlog.wrap_logger(
        logging.getLogger(name), processors=_PROCESSORS, wrapper_class=structlog.stdlib.BoundLogger
    )
    return logger
