"""Static shapes for the static runner's decode step: row counts and attention widths rounded up to
a few sizes that repeat, so a captured graph (one per pair) serves every step. Pure Python.

Row buckets follow the anchors' (nano-vllm, vLLM): 1, 2, 4, 8, then every multiple of 8 to 32 and
of 16 past it, and the batch's own size last; a step pays for at most 15 idle rows, and a batch of
256 rows needs 21 graphs. Width
buckets are powers of two from :data:`MIN_WIDTH`: attention reads at most twice the columns a step
needs, and a context of 8192 tokens needs 7 widths.
"""

from __future__ import annotations

#: The narrowest attention width of a decode step, in columns.
MIN_WIDTH = 128


def row_buckets(max_rows: int) -> list[int]:
    """The row counts a decode step runs, ascending; the last is ``max_rows`` itself (the store
    holds no more).

    Raises:
        ValueError: ``max_rows`` < 1.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    sizes = [1, 2, 4, 8]
    while sizes[-1] < max_rows:
        sizes.append(sizes[-1] + (8 if sizes[-1] < 32 else 16))
    return [s for s in sizes if s < max_rows] + [max_rows]


def bucket(value: int, sizes: list[int]) -> int:
    """The smallest of ``sizes`` (ascending) that holds ``value``.

    Raises:
        ValueError: ``value`` is larger than every size.
    """
    for size in sizes:
        if size >= value:
            return size
    raise ValueError(f"{value} is larger than the largest bucket {sizes[-1]}")


def width_buckets(columns: int) -> list[int]:
    """The attention widths of a decode step over slots of ``columns`` columns, ascending: powers of
    two from :data:`MIN_WIDTH`, and ``columns`` itself last."""
    sizes = []
    width = MIN_WIDTH
    while width < columns:
        sizes.append(width)
        width *= 2
    return [*sizes, columns]
