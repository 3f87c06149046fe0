"""How ``async-llm demo`` shows its streams: on a terminal a live panel with one line per request,
elsewhere (logs, CI) one ``[i] delta`` line per delta in arrival order."""

from __future__ import annotations

import shutil
import time
import unicodedata
from typing import TextIO

__all__ = ["LineView", "PanelView", "make_view", "tail_fitting"]

# Redraw the live panel at most this often: redrawing per token for many rows floods slow terminals.
_REDRAW_INTERVAL_S = 1 / 30


class LineView:
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


class PanelView:
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
        return head + tail_fitting(flat, self._width - len(head))

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


def make_view(out: TextIO, prompts: list[str], *, plain: bool) -> LineView | PanelView:
    """The panel on a terminal tall enough for one line per prompt, else (or ``plain``) lines."""
    size = shutil.get_terminal_size(fallback=(80, 24))
    is_tty = bool(getattr(out, "isatty", lambda: False)())
    # The panel rewrites its lines by moving the cursor up; more lines than the screen can't work.
    if plain or not is_tty or len(prompts) > size.lines - 2:
        return LineView(out)
    return PanelView(out, prompts, size.columns)


def _char_width(ch: str) -> int:
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def tail_fitting(text: str, width: int) -> str:
    """The end of ``text`` that fits ``width`` terminal columns (the newest tokens stay visible)."""
    if width <= 0:
        return ""
    used, start = 0, len(text)
    while start > 0 and used + _char_width(text[start - 1]) <= width:
        start -= 1
        used += _char_width(text[start])
    return text[start:] if start == 0 else "…" + text[start + 1 :]
