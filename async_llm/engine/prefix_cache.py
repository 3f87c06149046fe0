"""Keys and values of prompts, kept in token blocks and reused by later prompts that start the same.

A prompt's tokens are cut into blocks of ``block_size``; a block is identified by its tokens and the
block before it (a chain, as vLLM's block hashes are), so a block matches only when the whole prefix
up to its end matches. Keys are exact: a block's key holds its tokens and its parent's id, and dict
lookups compare them, so two prompts never share a block by a hash collision.

Memory is bounded: past ``capacity_bytes`` the least recently used blocks go first. A lookup touches
a chain from its last block to its first, so a parent is never older than its children and is never
evicted before them. A full cache evicts; it never refuses.

Only the engine thread touches a cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from async_llm.log import get_logger

log = get_logger("async_llm.engine.prefix_cache")

#: Tokens per block: long enough that the per-block bookkeeping is small against the copy, short
#: enough that a prompt shares most of a common prefix (vLLM's default on CPU is 16 to 128).
BLOCK_SIZE = 32

_Key = tuple[int, tuple[int, ...]]  # (id of the parent block, 0 for the first; the block's tokens)


@dataclass
class _Block:
    id: int
    kv: torch.Tensor  # [layers, 2, Hkv, block_size, D]


@dataclass
class PrefixHit:
    """The longest cached prefix of a prompt.

    Attributes:
        tokens: How many tokens of the prompt the blocks cover (a multiple of the block size).
        blocks: Their keys and values, first to last, each ``[layers, 2, Hkv, block_size, D]``.
    """

    tokens: int
    blocks: list[torch.Tensor]

    def copy_into(self, buffer: torch.Tensor) -> None:
        """Write the blocks into columns ``[0, tokens)`` of a row's ``[layers, 2, Hkv, L, D]`` buffer."""
        if not self.blocks:
            return
        size = self.blocks[0].shape[3]
        for i, block in enumerate(self.blocks):
            buffer[:, :, :, i * size : (i + 1) * size] = block


class PrefixCache:
    """Blocks of prompt keys and values, least recently used evicted past ``capacity_bytes``.

    Args:
        capacity_bytes: Most bytes of keys and values held.
        block_size: Tokens per block.
    """

    def __init__(self, capacity_bytes: int, block_size: int = BLOCK_SIZE) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.capacity_bytes = max(0, capacity_bytes)
        self.block_size = block_size
        self._blocks: OrderedDict[_Key, _Block] = OrderedDict()  # least recently used first
        self._next_id = 1
        self.bytes = 0
        self.hit_tokens = 0
        self.queried_tokens = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def _keys(self, tokens: Sequence[int], limit: int) -> list[tuple[int, tuple[int, ...]]]:
        """Token tuples of the full blocks within ``tokens[:limit]`` (without parent ids)."""
        size = self.block_size
        return [(i, tuple(tokens[i : i + size])) for i in range(0, limit - size + 1, size)]

    def chain(self, tokens: Sequence[int]) -> list[int]:
        """Chained hashes of the blocks :meth:`match` would look up for ``tokens`` (each the hash of
        the whole prefix up to its end): prompts that share ``k`` of them share ``k`` blocks."""
        hashes, h = [], 0
        for _, block_tokens in self._keys(tokens, len(tokens) - 1):
            h = hash((h, block_tokens))
            hashes.append(h)
        return hashes

    def record_hit(self, tokens: int) -> None:
        """Count ``tokens`` prompt tokens taken from the cache instead of computed."""
        self.hit_tokens += tokens

    def match(self, tokens: Sequence[int], count: bool = True) -> PrefixHit:
        """The longest cached prefix of ``tokens`` that leaves at least one token to compute (the
        prompt's last position must run to give the next token's logits). Counts the query unless
        ``count`` is False; the tokens a prompt takes from the hit are counted by :meth:`record_hit`."""
        if count:
            self.queried_tokens += len(tokens)
        parent, chain = 0, []
        for _, block_tokens in self._keys(tokens, len(tokens) - 1):
            block = self._blocks.get((parent, block_tokens))
            if block is None:
                break
            chain.append((parent, block_tokens))
            parent = block.id
        for key in reversed(chain):  # last block first: the first block ends most recently used
            self._blocks.move_to_end(key)
        return PrefixHit(len(chain) * self.block_size, [self._blocks[key].kv for key in chain])

    def insert(self, tokens: Sequence[int], kv: torch.Tensor) -> None:
        """Keep the full blocks of ``tokens`` whose keys and values are ``kv`` ``[layers, 2, Hkv,
        len(tokens), D]`` (blocks already cached are only touched). A chain longer than the whole
        budget keeps its first blocks."""
        block_bytes = kv[:, :, :, : self.block_size].numel() * kv.element_size()
        most = self.capacity_bytes // max(block_bytes, 1)
        parent, chain = 0, []
        for start, block_tokens in self._keys(tokens, len(tokens))[:most]:
            key = (parent, block_tokens)
            block = self._blocks.get(key)
            if block is None:
                try:
                    copy = kv[:, :, :, start : start + self.block_size].clone()
                except torch.OutOfMemoryError:  # keeping blocks is an optimisation: the chain stops here
                    log.warning("prefix cache: no device memory for a block; the rest of the chain is not kept")
                    break
                block = _Block(self._next_id, copy)
                self._next_id += 1
                self._blocks[key] = block
                self.bytes += block_bytes
            chain.append(key)
            parent = block.id
        for key in reversed(chain):
            self._blocks.move_to_end(key)
        while self.bytes > self.capacity_bytes:  # the new chain is the most recent: it stays
            _, block = self._blocks.popitem(last=False)
            self.bytes -= block.kv.numel() * block.kv.element_size()

    def clear(self) -> None:
        """Forget every block (another model, another device)."""
        self._blocks.clear()
        self.bytes = 0
