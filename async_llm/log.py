"""Structured logging: structlog event dicts rendered as JSON, emitted through stdlib ``logging``.

The library never configures logging globally and never prints: events go to the ``async_llm``
stdlib loggers, so the application decides where they land and at which level (by default, Python
shows only warnings and errors). Disabled levels cost one level check.
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


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger writing JSON lines to the stdlib logger ``name``."""
    logger: structlog.stdlib.BoundLogger = structlog.wrap_logger(
        logging.getLogger(name), processors=_PROCESSORS, wrapper_class=structlog.stdlib.BoundLogger
    )
    return logger
