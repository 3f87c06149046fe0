"""Tool calls as they stream: OpenAI chat-completion-chunk deltas (``content``, then each call's
name once and its arguments as they grow), agreeing with :func:`~async_llm.llm.tools.parse_tool_calls`
on the finished text however it is split: Hermes blocks of a call or a list of calls, and an output
that is a JSON call or list of calls, after a call marker or not."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import partial_json_parser  # type: ignore[import-untyped]

from async_llm.llm.tools import (
    _ARGS_KEY,
    CLOSE,
    MARKERS,
    OPEN,
    Delta,
    ToolChoice,
    _call,
    _call_from,
    _decode,
    _functions,
    _new_id,
    _skip_ws,
)

_NO_PARTIAL_STR = partial_json_parser.Allow.ALL & ~partial_json_parser.Allow.STR


@dataclass
class _Item:
    """One call's JSON object while it streams in; offsets index the parser's buffer."""

    start: int  # its "{"
    index: int | None = None  # OpenAI's tool_calls index, set when the name is sent
    call_id: str = ""
    name: str = ""
    rejected: bool = False  # known not to be a call of a known tool
    args_at: int | None = None  # where the arguments value starts
    args_sent: int = 0  # the arguments text before this offset has been sent
    streamed: bool = False  # the value is an object, sent raw as it grows (else sent once, re-serialised)
    args_done: bool = False
    end: int | None = None  # just past the object, once it parses
    valid: bool = False  # complete and well-formed: it is in tool_calls


class ToolCallStreamParser:
    """Turns text deltas into OpenAI chat-completion-chunk deltas (``content`` or ``tool_calls``).

    Agrees with :func:`parse_tool_calls` on the same text however it is split, except on output that
    breaks after a call's name was sent (only truncation can, when ``tool_choice`` constrains the output):
    that call is dropped, neither in :attr:`tool_calls` nor repeated as content, and the calls of a
    list (plain or in a block) sent before it breaks (or holds a non-call) stay calls, where the parse
    keeps it all as content.

    Args:
        tools, tool_choice: Checked by :func:`check_tools` and :func:`check_tool_choice`.
    """

    def __init__(self, tools: Sequence[Mapping[str, Any]], tool_choice: ToolChoice) -> None:
        self._names = _functions(tools)
        self._named: str | None = tool_choice["function"]["name"] if isinstance(tool_choice, Mapping) else None
        self._raw = tool_choice == "none" or not self._names
        self._buf = ""
        self._pos = 0  # the text before this offset is sent or decided
        self._state = "start"  # start | text | block | json | tail: the method _<state> reads on
        self._item: _Item | None = None
        self._block_at = 0  # offset of the current "<tool_call>"
        self._body: str | None = None  # what the current block holds: None (not known yet), "json"
        # (being read), "done" (a complete call or list of calls), "broken" or "text" (no calls)
        self._cursor = 0  # next offset to read in a JSON value of calls (plain output or block)
        self._list = False  # that value is a list
        self._committed = False  # a call of that value was sent: no going back to content
        self._headers = 0
        self._calls: list[dict[str, Any]] = []
        self._ws = ""  # content's trailing whitespace, sent only if more content follows (content is stripped)
        self._content_started = False

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The complete calls so far, shaped as in :func:`parse_tool_calls`."""
        return list(self._calls)

    def feed(self, delta: str) -> list[Delta]:
        """Take the next text ``delta``; returns the chunk deltas to send (text may be held back)."""
        if self._raw:
            return [{"content": delta}] if delta else []
        self._buf += delta
        return self._run(final=False)

    def finish(self) -> list[Delta]:
        """At the end of the output, returns the last deltas (held-back text that is content)."""
        out = [] if self._raw else self._run(final=True)
        self._ws = ""
        return out

    def _run(self, final: bool) -> list[Delta]:
        out: list[Delta] = []
        while getattr(self, "_" + self._state)(out, final):
            pass
        return out

    def _start(self, out: list[Delta], final: bool) -> bool:
        buf = self._buf
        j = _skip_ws(buf, self._pos)
        if j == len(buf):
            return False  # leading whitespace is never sent: content is stripped
        self._pos = j
        if self._named is not None:
            if buf[j] == "{":  # the arguments object of a known call: one JSON item
                self._item = _Item(j, args_at=j, args_sent=j, streamed=True)
                self._commit(self._item, self._named, out)
                self._state, self._committed = "json", True
            else:
                self._state = "tail"
            return True
        marker = next((m for m in MARKERS if buf.startswith(m, j)), "")
        if not marker and not final and any(m.startswith(buf[j:]) for m in MARKERS):
            return False  # "[" or "<|" may open a marker: wait for the next delta
        k = _skip_ws(buf, j + len(marker))
        if marker and k == len(buf) and not final:
            return False
        if k < len(buf) and buf[k] in "{[":  # the marker (if any) stays in the content if no call follows
            self._state, self._list, self._cursor = "json", buf[k] == "[", k + (buf[k] == "[")
        else:
            self._state = "text"
        return True

    def _text(self, out: list[Delta], final: bool) -> bool:
        buf = self._buf
        at = buf.find(OPEN, self._pos)
        if at < 0:  # a trailing "<tool" may be the start of a block: hold it back until it is known
            hold = buf.rfind("<", self._pos)
            stop = hold if hold >= 0 and not final and OPEN.startswith(buf[hold:]) else len(buf)
            self._emit(out, buf[self._pos : stop])
            self._pos = stop
            return False
        self._emit(out, buf[self._pos : at])
        self._block_at, self._pos, self._item, self._state = at, at + len(OPEN), None, "block"
        self._body, self._committed = None, False
        return True

    def _block(self, out: list[Delta], final: bool) -> bool:
        buf = self._buf
        close = buf.find(CLOSE, self._pos)
        limit = close if close >= 0 else len(buf)
        if self._body is None:
            j = _skip_ws(buf, self._pos, limit)
            if j < limit and buf[j] in "{[":
                self._body, self._list, self._cursor = "json", buf[j] == "[", j + (buf[j] == "[")
            elif j < limit or close >= 0 or final:
                self._body = "text"  # no JSON value: the block is content
            else:
                return False
        if self._body == "json":
            over = self._read_calls(limit, out)
            if over is not None:
                self._body = "done" if over else "broken"
        if close < 0 and not final:
            return False
        stop = close + len(CLOSE) if close >= 0 else len(buf)
        if self._body == "done":  # calls, or an empty list (no call): the text after them is content
            self._emit(out, buf[self._cursor : limit].strip())
        elif not self._committed:
            self._emit(out, buf[self._block_at : stop])
        self._pos, self._item, self._body, self._state = stop, None, None, "text"
        return True

    def _json(self, out: list[Delta], final: bool) -> bool:
        over = self._read_calls(len(self._buf), out)
        if over is None and not final:
            return False
        # Truncated: all content when nothing was sent as a call, else the unfinished call is dropped.
        return self._json_over(self._cursor if over is not None else len(self._buf))

    def _read_calls(self, limit: int, out: list[Delta]) -> bool | None:
        """Read the JSON value of calls at :attr:`_cursor` (a call object, or the items of a list),
        up to ``limit``, sending what it can.

        Returns:
            None while it needs more text; True once the value is over (:attr:`_cursor` just past
            it); False when it is not (or no longer) a value of calls (:attr:`_cursor` where it stops).
        """
        buf = self._buf
        while True:
            if self._item is None:
                j = _skip_ws(buf, self._cursor, limit)
                if j < limit and self._list and buf[j] == ",":
                    self._cursor = j + 1
                    continue
                if j == limit:
                    return None
                if buf[j] != "{":  # the list ends ("]") or is not made of calls
                    self._cursor = j + (self._list and buf[j] == "]")
                    return self._list and buf[j] == "]"
                self._item = _Item(j)
            item = self._item
            self._advance(item, limit, out)
            self._committed |= item.index is not None
            if not self._committed and (item.rejected or item.end is not None):
                return False
            if item.end is None:
                return None
            self._cursor, self._item = item.end, None
            if not self._list:
                return True

    def _json_over(self, stop: int) -> bool:
        # After a JSON value of calls comes content; a JSON value that holds no call is all content.
        self._pos, self._item, self._state = stop if self._committed else self._pos, None, "tail"
        return True

    def _tail(self, out: list[Delta], final: bool) -> bool:
        self._emit(out, self._buf[self._pos :])
        self._pos = len(self._buf)
        return False

    def _advance(self, item: _Item, limit: int, out: list[Delta]) -> None:
        """Learn the name, stream the arguments and complete the call of ``item``, reading up to ``limit``."""
        text = self._buf if limit == len(self._buf) else self._buf[:limit]
        obj, end = _decode(text, item.start)
        if item.args_at is None and (key := _ARGS_KEY.search(text, item.start, end or limit)):
            item.args_at = item.args_sent = key.end()
            item.streamed = text[key.end()] == "{"
        if item.index is None and not item.rejected:
            seen = obj if end else _partial(text[item.start :])
            name = seen.get("name") if isinstance(seen, dict) else None
            known = isinstance(name, str) and name in self._names
            # Sent once the arguments are known to stream as an object, or the call is complete and valid,
            # so that string or missing arguments cannot turn a sent call invalid.
            if known and (item.streamed or (end and _call_from(obj, self._names))):
                self._commit(item, str(name), out)
            elif end or (name is not None and not known) or seen is None:
                item.rejected = True
        if item.index is not None and item.streamed and not item.args_done:
            self._stream_args(item, text, end or limit, out)
        if not end:
            return
        item.end = end
        found = _call_from(obj, self._names) if self._named is None else (self._named, obj)
        if item.index is None or found is None:
            return  # not a call, or (rarely) its name was sent and it is malformed: dropped
        arguments = json.dumps(found[1], ensure_ascii=False) if self._named is None else text[item.start : end]
        if not item.streamed:
            out.append(_args_delta(item, arguments))
        item.valid = True
        self._calls.append(_call(item.name, arguments, item.call_id))

    def _commit(self, item: _Item, name: str, out: list[Delta]) -> None:
        item.index, item.call_id, item.name = self._headers, _new_id(), name
        self._headers += 1
        head = {"index": item.index, "id": item.call_id, "type": "function"}
        out.append({"tool_calls": [head | {"function": {"name": name, "arguments": ""}}]})

    def _stream_args(self, item: _Item, text: str, bound: int, out: list[Delta]) -> None:
        assert item.args_at is not None  # streamed implies located
        stop = _decode(text, item.args_at)[1]  # until the value parses, all the text so far belongs to it
        item.args_done = bool(stop)
        stop = stop or bound
        if stop > item.args_sent:
            out.append(_args_delta(item, text[item.args_sent : stop]))
            item.args_sent = stop

    def _emit(self, out: list[Delta], text: str) -> None:
        text = self._ws + (text if self._content_started else text.lstrip())
        body = text.rstrip()
        self._ws = text[len(body) :]
        if body:
            self._content_started = True
            out.append({"content": body})


def _args_delta(item: _Item, text: str) -> Delta:
    return {"tool_calls": [{"index": item.index, "function": {"arguments": text}}]}


def _partial(text: str) -> Any:
    """The complete parts of an object's JSON prefix (``text[0] == "{"``), or None when it cannot be one."""
    if '"name"' not in text:  # the full parse is pure Python, rerun at each delta: only when it may pay
        j = _skip_ws(text, 1)
        return {} if j == len(text) or text[j] in '"}' else None
    try:
        return partial_json_parser.loads(text, _NO_PARTIAL_STR)
    except (ValueError, AssertionError, IndexError, KeyError, TypeError, RecursionError):
        return None
