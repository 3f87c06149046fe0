"""Prefill grouping: the split of admitted prompts into padded prefill forwards."""

from __future__ import annotations

import itertools
import random

from async_llm.scheduler import prefill_groups


def _cost(groups: list[list[int]], lengths: list[int], overhead: int) -> int:
    return sum(overhead + len(g) * max(lengths[i] for i in g) for g in groups)


def _brute_force(lengths: list[int], overhead: int) -> int:
    """The cheapest split over every set partition (small n only)."""

    def partitions(items: list[int]):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for part in partitions(rest):
            for k in range(len(part)):
                yield [*part[:k], [first, *part[k]], *part[k + 1 :]]
            yield [[first], *part]

    return min(_cost(p, lengths, overhead) for p in partitions(list(range(len(lengths)))))


def test_groups_cover_every_prompt_once_shortest_first():
    lengths = [20, 180, 22, 175, 60]
    groups = prefill_groups(lengths, overhead_tokens=32)
    assert sorted(itertools.chain(*groups)) == list(range(len(lengths)))
    assert groups == [[0, 2], [4], [3, 1]]  # 20 and 22 together, 175 and 180 together, 60 alone
    maxima = [max(lengths[i] for i in g) for g in groups]
    assert maxima == sorted(maxima)


def test_similar_lengths_stay_in_one_forward_and_zero_overhead_splits_by_length():
    assert prefill_groups([12, 16, 11, 14], overhead_tokens=32) == [[2, 0, 3, 1]]
    assert prefill_groups([12, 16, 11, 12], overhead_tokens=0) == [[2], [0, 3], [1]]
    assert prefill_groups([], 32) == [] and prefill_groups([7], 32) == [[0]]


def test_the_split_is_optimal():
    rng = random.Random(3)
    for _ in range(60):
        lengths = [rng.choice([rng.randint(1, 30), rng.randint(100, 400)]) for _ in range(rng.randint(1, 7))]
        overhead = rng.choice([0, 8, 32, 256])
        groups = prefill_groups(lengths, overhead)
        assert _cost(groups, lengths, overhead) == _brute_force(lengths, overhead), (lengths, overhead)
