"""Incremental detokenization and stop strings, one instance per request.

Text is produced with the tokenizers library's ``DecodeStream`` (Rust, UTF-8 aware: it holds back
bytes until they form whole characters) for fast tokenizers, and with a prefix/read-offset
re-decode for slow ones. On top of that, any tail of the text that could be the start of a stop
string is held back until it is known not to be one, so no part of a stop string is ever shown.
"""

from __future__ import annotations

import weakref
from typing import Any

from tokenizers.decoders import DecodeStream

# Prompt tokens given to the decoder as context: enough for tokenizers whose decoding of a token
# depends on what precedes it (leading-space markers, byte fallback), cheap to re-decode.
_CONTEXT_TOKENS = 6

_SPECIAL_IDS: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


def _special_ids(tokenizer: Any, backend: Any) -> frozenset[int]:
    """The ids of ``backend``'s special added tokens (those ``skip_special_tokens`` leaves out),
    found once per tokenizer."""
    ids = _SPECIAL_IDS.get(tokenizer)
    if ids is None:
        ids = frozenset(i for i, token in backend.get_added_tokens_decoder().items() if token.special)
        _SPECIAL_IDS[tokenizer] = ids
    return ids


class Detokenizer:
    """Turns one request's output token ids into safe-to-show text deltas.

    Args:
        tokenizer: A transformers tokenizer.
        prompt_ids: The request's prompt ids (the tail gives the decoder its context).
        stop: Stop strings; generation ends at the first one and it is cut from the text.
        include_stop: Keep the stop string that ended generation in the text (cut after it).
        skip_special_tokens: Leave special tokens out of the text.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: list[int],
        stop: tuple[str, ...] = (),
        *,
        include_stop: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self._stop = stop
        self._include_stop = include_stop
        self._skip_special = skip_special_tokens
        self._max_stop = max((len(s) for s in stop), default=0)
        self._text = ""  # all text decided so far, stop string excluded
        self._emitted = 0  # len of the prefix of _text already handed out
        self.stopped = False
        self._tokenizer = tokenizer
        self._generated: list[int] = []
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self._backend = backend
            self._stream: DecodeStream | None = DecodeStream(context, skip_special_tokens=skip_special_tokens)
            # A skipped special token adds no text, and the decoder keeps every id since its last
            # text to decode again at each step: fed a run of them (eos after eos when eos is
            # ignored), each step would cost the run's length. They are not fed (either decoder).
            self._skipped = _special_ids(tokenizer, backend) if skip_special_tokens else frozenset()
        else:  # slow tokenizer: re-decode a short window (prefix_offset:read_offset) per token
            self._stream = None
            self._skipped = frozenset(getattr(tokenizer, "all_special_ids", ())) if skip_special_tokens else frozenset()
            self._ids = context
            self._prefix_offset = 0
            self._read_offset = len(context)

    @property
    def text(self) -> str:
        """All text decided so far (excluding any stop string)."""
        return self._text

    def add_token(self, token_id: int) -> bool:
        """Feed one generated token. Returns True when a stop string was reached."""
        if self.stopped:
            return True
        self._generated.append(token_id)
        chunk = self._decode(token_id)
        if chunk:
            self._append(chunk)
        return self.stopped

    def take_delta(self, final: bool = False) -> str:
        """Return the text not handed out yet that is safe to show.

        Args:
            final: The request has ended: flush what was held back for stop-string matching, and
                bytes of an unfinished UTF-8 character (shown as U+FFFD, as ``tokenizer.decode`` does).
        """
        if final and not self.stopped:
            self._flush_incomplete()
        end = len(self._text) if (final or self.stopped) else len(self._text) - self._held_back()
        if end <= self._emitted:
            return ""
        delta = self._text[self._emitted : end]
        self._emitted = end
        return delta

    def _flush_incomplete(self) -> None:
        # The decoder holds back the bytes of a character that never completed; decoding the whole
        # output shows them as U+FFFD. Only a pure tail is taken, so context-dependent decoders
        # (leading-space markers) that decode differently without the prompt change nothing.
        full = self._tokenizer.decode(self._generated, skip_special_tokens=self._skip_special)
        if len(full) > len(self._text) and full.startswith(self._text):
            self._append(full[len(self._text) :])

    def _decode(self, token_id: int) -> str:
        if token_id in self._skipped:
            return ""
        if self._stream is not None:
            return self._stream.step(self._backend, token_id) or ""
        self._ids.append(token_id)
        skip = self._skip_special
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=skip)
        full = self._tokenizer.decode(self._ids[self._prefix_offset :], skip_special_tokens=skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return str(full[len(prefix) :])

    def _append(self, chunk: str) -> None:
        # A stop string can start at most max_stop-1 characters before the new chunk.
        search_from = max(self._emitted, len(self._text) - self._max_stop + 1)
        self._text += chunk
        if not self._stop:
            return
        hits = [(i, len(s)) for s, i in ((s, self._text.find(s, search_from)) for s in self._stop) if i != -1]
        if hits:
            start, length = min(hits)
            self._text = self._text[: start + length if self._include_stop else start]
            self.stopped = True

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        tail_max = min(self._max_stop - 1, len(self._text) - self._emitted)
        for k in range(tail_max, 0, -1):
            tail = self._text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0
