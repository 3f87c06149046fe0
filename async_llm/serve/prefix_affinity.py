"""Prefix affinity: send requests that share a prompt prefix to the replica that already holds it.

Each replica's engine keeps the keys and values of the prompts it has seen (its prefix cache). With
several replicas behind a router that ignores prompts, a system prompt shared by many requests is
prefilled, and cached, on every replica, and under memory pressure each replica evicts what the
others hold: the cache works for one replica and stops working for two. This module is the
router's memory of which replica was sent which prefix, and its rule for choosing:

* A prompt is cut into blocks of ``block_chars`` characters and each block is named by a chain hash
  (the block's text and every block before it), the way an engine's prefix cache names its token
  blocks: two prompts share their first *n* hashes exactly when they share their first *n* blocks.
* Each replica remembers the hashes of the requests routed to it, least recently used first out
  past ``max_blocks_per_replica`` (the replica's own cache evicts too; this is an estimate of it,
  as SGLang's router and Ray Serve's prefix-aware router keep one).
* A request goes to the replica with the longest match, when the match is worth it (at least
  ``match_fraction`` of the prompt's blocks, or ``match_blocks`` blocks) and that replica's queue
  is not longer than the shortest queue by more than ``imbalance_threshold`` requests (a cache hit
  does not pay for waiting behind a batch's worth of requests). Otherwise, among the replicas within
  that load tolerance, the one remembering the fewest blocks takes it (new prefixes spread over the
  caches, as SGLang's router sends them to its smallest tree), ties going to the less loaded and
  then to a hash of the prompt's first block (so routers in different processes agree where they
  can). The match rule keeps a short preamble that many prompts share ("You are a helpful
  assistant.") from pulling every prompt to the first replica that saw it: a new system prompt
  behind it goes where the load says, and its own later requests follow it there.

Pure Python, no Ray: :mod:`async_llm.serve.ray_router` wraps it in Serve's request-router API.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

__all__ = [
    "DEFAULT_BLOCK_CHARS",
    "DEFAULT_MAX_BLOCKS",
    "DEFAULT_MATCH_BLOCKS",
    "DEFAULT_MATCH_FRACTION",
    "DEFAULT_MAX_BLOCKS_PER_REPLICA",
    "PrefixAffinity",
    "block_hashes",
    "routing_text",
]

DEFAULT_BLOCK_CHARS = 64
"""Characters per block: about 16 tokens of English, the prefix cache's block size."""

DEFAULT_MAX_BLOCKS = 256
"""Blocks hashed per request (16 KiB of text): prefixes longer than that route as equal."""

DEFAULT_MAX_BLOCKS_PER_REPLICA = 65_536
"""Blocks remembered per replica (4 MiB of prompt text), least recently routed out first."""

DEFAULT_MATCH_FRACTION = 0.5
"""A match of half the prompt routes by affinity (SGLang's router uses the same share)."""

DEFAULT_MATCH_BLOCKS = 32
"""So does a match of 32 blocks (2,048 characters, about 500 tokens of prefill saved)."""


def block_hashes(
    text: str, block_chars: int = DEFAULT_BLOCK_CHARS, max_blocks: int = DEFAULT_MAX_BLOCKS
) -> list[bytes]:
    """Chain hashes of ``text``'s whole blocks: the i-th names blocks 0..i together.

    A trailing partial block is left out (as an engine caches whole blocks only). The hashes are
    stable across processes (not Python's salted ``hash``).
    """
    hashes: list[bytes] = []
    previous = b""
    for start in range(0, min(len(text), block_chars * max_blocks) - block_chars + 1, block_chars):
        previous = hashlib.blake2b(previous + text[start : start + block_chars].encode(), digest_size=16).digest()
        hashes.append(previous)
    return hashes


def routing_text(body: Any) -> str | None:
    """The text a request's prompt begins with, for prefix matching; ``None`` when it has none.

    ``body`` is an OpenAI request body as a dict or as an object with the same attributes: chat
    (``messages``, with ``tools`` first, where chat templates render them), completions (``prompt``:
    a string, a list of token ids, or a list of prompts, of which the first is used) or responses
    (``instructions`` and ``input``).
    """
    fields = _fields(body)
    if fields is None:
        return None
    parts: list[str] = []
    tools = fields.get("tools")
    if tools:
        parts.append(json.dumps(_plain(tools), sort_keys=True, default=str))
    instructions = fields.get("instructions")
    if isinstance(instructions, str):
        parts.append(instructions)
    for name in ("messages", "input"):
        value = fields.get(name)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts.extend(_message_text(message) for message in value)
    prompt = fields.get("prompt")
    if isinstance(prompt, str):
        parts.append(prompt)
    elif isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, int):
            parts.append(",".join(str(token) for token in prompt))
        elif isinstance(first, str):
            parts.append(first)
        elif isinstance(first, list):
            parts.append(",".join(str(token) for token in first))
    return "".join(parts) or None


def _fields(body: Any) -> Mapping[str, Any] | None:
    if isinstance(body, Mapping):
        return body
    names = ("messages", "prompt", "input", "instructions", "tools")
    found = {name: getattr(body, name) for name in names if getattr(body, name, None) is not None}
    return found if ("messages" in found or "prompt" in found or "input" in found) else None


def _plain(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(exclude_none=True)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _message_text(message: Any) -> str:
    message = _plain(message)
    if isinstance(message, str):
        return message
    if not isinstance(message, Mapping):
        return ""
    role = message.get("role", "")
    return f"\x1e{role}\x1f{_content_text(message.get('content'))}"


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_content_text(part) for part in content)
    if isinstance(content, Mapping):
        text = content.get("text")
        return text if isinstance(text, str) else json.dumps(content, sort_keys=True, default=str)
    return str(content)


R = TypeVar("R", bound=Hashable)


class PrefixAffinity(Generic[R]):
    """Which replica was sent which prefix, and the rule for choosing (see the module docstring).

    Replicas are any hashable ids. Not thread-safe: one router owns one instance on its event loop.

    Args:
        imbalance_threshold: Queue-length lead (requests) past which the longest match is passed
            over for the least loaded replica.
        match_fraction: A match of at least this share of the prompt's blocks routes by affinity.
        match_blocks: So does a match of at least this many blocks, whatever the share (a long
            shared prefix is worth routing for even under a longer unique rest).
        block_chars: Characters per block.
        max_blocks: Blocks hashed per request.
        max_blocks_per_replica: Blocks remembered per replica.

    Raises:
        ValueError: A size below 1 or a negative threshold.
    """

    def __init__(
        self,
        *,
        imbalance_threshold: int = 32,
        match_fraction: float = DEFAULT_MATCH_FRACTION,
        match_blocks: int = DEFAULT_MATCH_BLOCKS,
        block_chars: int = DEFAULT_BLOCK_CHARS,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
        max_blocks_per_replica: int = DEFAULT_MAX_BLOCKS_PER_REPLICA,
    ) -> None:
        for name, value, least in (
            ("imbalance_threshold", imbalance_threshold, 0),
            ("match_blocks", match_blocks, 1),
            ("block_chars", block_chars, 1),
            ("max_blocks", max_blocks, 1),
            ("max_blocks_per_replica", max_blocks_per_replica, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if (
            isinstance(match_fraction, bool)
            or not isinstance(match_fraction, int | float)
            or not 0 < match_fraction <= 1
        ):
            raise ValueError(f"match_fraction must be a number in (0, 1], got {match_fraction!r}")
        self.imbalance_threshold = imbalance_threshold
        self.match_fraction = float(match_fraction)
        self.match_blocks = match_blocks
        self.block_chars = block_chars
        self.max_blocks = max_blocks
        self.max_blocks_per_replica = max_blocks_per_replica
        self._blocks: dict[R, OrderedDict[bytes, None]] = {}

    def hashes(self, text: str | None) -> list[bytes]:
        """``text``'s block hashes under this instance's sizes (none for ``None``)."""
        return block_hashes(text, self.block_chars, self.max_blocks) if text else []

    def matched_blocks(self, replica: R, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of a prompt ``replica`` was sent before."""
        known = self._blocks.get(replica)
        if not known:
            return 0
        matched = 0
        for block in hashes:
            if block not in known:
                break
            matched += 1
        return matched

    def remembered(self, replica: R) -> int:
        """Blocks remembered for ``replica``."""
        return len(self._blocks.get(replica, ()))

    def record(self, replica: R, hashes: Iterable[bytes]) -> None:
        """Remember that a prompt with ``hashes`` was sent to ``replica``."""
        known = self._blocks.setdefault(replica, OrderedDict())
        for block in hashes:
            known[block] = None
            known.move_to_end(block)
        while len(known) > self.max_blocks_per_replica:
            known.popitem(last=False)

    def forget(self, replica: R) -> None:
        """Drop a replica that left (its cache went with it)."""
        self._blocks.pop(replica, None)

    def keep_only(self, replicas: Iterable[R]) -> None:
        """Forget every replica not in ``replicas``."""
        alive = set(replicas)
        for replica in [r for r in self._blocks if r not in alive]:
            del self._blocks[replica]

    def rank(self, candidates: Sequence[R], loads: Mapping[R, int | None], hashes: Sequence[bytes]) -> list[R]:
        """``candidates`` from most to least preferred for a prompt with ``hashes``.

        Args:
            candidates: The replicas that may take the request.
            loads: Each replica's queue length (requests in flight); ``None`` or missing counts as 0.
            hashes: The prompt's block hashes (:meth:`hashes`).

        Returns:
            All of ``candidates``, the chosen one first, then the rest by load.
        """
        if not candidates:
            return []
        load = {replica: loads.get(replica) or 0 for replica in candidates}
        least = min(load.values())
        matched = {replica: self.matched_blocks(replica, hashes) for replica in candidates}
        worth = min(self.match_blocks, max(1, math.ceil(self.match_fraction * len(hashes))))
        affine = [r for r in candidates if matched[r] >= worth and load[r] - least <= self.imbalance_threshold]
        if affine:
            chosen = min(affine, key=lambda r: (-matched[r], load[r], self.remembered(r)))
        else:  # a new prefix: the smallest record within the load tolerance, where it will have room
            first = hashes[0] if hashes else b""
            balanced = [r for r in candidates if load[r] - least <= self.imbalance_threshold]
            chosen = min(balanced, key=lambda r: (self.remembered(r), load[r], _rendezvous(first, r)))
        rest = sorted((r for r in candidates if r != chosen), key=lambda r: (load[r], -matched[r]))
        return [chosen, *rest]


def _rendezvous(block: bytes, replica: Hashable) -> bytes:
    """Highest-random-weight order of ``replica`` for ``block`` (stable across processes)."""
    return hashlib.blake2b(block + str(replica).encode(), digest_size=8).digest()
