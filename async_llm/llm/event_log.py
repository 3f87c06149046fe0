"""An LLM's event log file: JSON lines written by a background thread, flushed on close.

``enable_logging`` attaches a :class:`logging.handlers.QueueHandler` to the library's ``async_llm``
logger: a log call only puts the record on a queue, and a :class:`QueueListener` thread writes it
to the file, so logging never blocks the event loop on disk I/O. Events are structlog JSON (see
:mod:`async_llm.log`), one per line.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue


class EventLog:
    """A file that receives the library's log events while it is open.

    Args:
        path: File to append JSON lines to (created with its folder).
        level: Lowest level written.
    """

    def __init__(self, path: str | os.PathLike[str], level: int = logging.INFO) -> None:
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        self._file_handler = logging.FileHandler(self.path, encoding="utf-8", delay=False)
        self._file_handler.setFormatter(logging.Formatter("%(message)s"))
        records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._queue_handler = logging.handlers.QueueHandler(records)
        self._queue_handler.setLevel(level)
        self._listener = logging.handlers.QueueListener(records, self._file_handler, respect_handler_level=False)
        self._logger = logging.getLogger("async_llm")
        self._saved_level = self._logger.level
        if self._logger.getEffectiveLevel() > level:
            self._logger.setLevel(level)
        self._logger.addHandler(self._queue_handler)
        self._listener.start()

    def close(self) -> None:
        """Detach, write everything queued, and close the file. Idempotent."""
        if self._queue_handler not in self._logger.handlers:
            return
        self._logger.removeHandler(self._queue_handler)
        self._logger.setLevel(self._saved_level)
        self._listener.stop()  # drains the queue
        self._file_handler.close()
