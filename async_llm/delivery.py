"""Handing results from a worker thread back to the callers' event loops.

A worker collects one step's results here and flushes them with one ``call_soon_threadsafe`` per
event loop per step (not per token): each call runs :meth:`TokenStream._put` for that loop's streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import torch

from async_llm.log import get_logger
from async_llm.request import FinishReason, Request
from async_llm.stream import TokenStream

log = get_logger("async_llm.delivery")

_Item = tuple[TokenStream, str, list[int], Any, Any]


class Deliveries:
    """One step's results, grouped per event loop."""

    def __init__(self) -> None:
        # stream -> [text parts, token ids, finish reason, error]
        self._items: dict[TokenStream, list[Any]] = {}

    def add(
        self,
        request: Request,
        text: str = "",
        tokens: Sequence[int] = (),
        reason: FinishReason | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Record new text/tokens of ``request``, and its end when ``reason`` is given."""
        item = self._items.setdefault(request.stream, [[], [], None, None])
        if text:
            item[0].append(text)
        item[1].extend(tokens)
        if reason is not None:
            item[2], item[3] = reason, error
        if request.streamer is not None:
            feed_streamer(request, tokens, reason)

    def flush(self) -> list[TokenStream]:
        """Hand every loop its results; returns the streams whose loop is gone (to abort)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Item]] = {}
        for stream, (parts, tokens, reason, error) in self._items.items():
            by_loop.setdefault(stream.loop, []).append((stream, "".join(parts), tokens, reason, error))
        self._items.clear()
        orphans: list[TokenStream] = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the caller's loop is closed: nobody will read these streams
                orphans.extend(stream for stream, *_ in items)
        return orphans


def _deliver(items: list[_Item]) -> None:
    for stream, text, tokens, reason, error in items:
        stream._put(text, tokens, reason, error)


def feed_streamer(request: Request, tokens: Sequence[int], reason: FinishReason | None) -> None:
    """Feed a transformers streamer (``put``/``end``) with ``request``'s new tokens, eos excluded.

    A streamer that raises is dropped (and logged): the caller's object must not fail the step of
    every other request in the batch.
    """
    streamer = request.streamer
    shown = [t for t in tokens if not (t in request.eos_token_ids and not request.params.ignore_eos)]
    try:
        if shown:
            streamer.put(torch.tensor(shown))
        if reason is not None:
            streamer.end()
    except Exception as exc:
        request.streamer = None
        log.warning("streamer failed; no longer fed", request_id=request.request_id, error=repr(exc))
