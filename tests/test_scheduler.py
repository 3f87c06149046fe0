"""Prefill grouping: the split of admitted prompts into padded prefill forwards."""

from __future__ import annotations

import itertools
import random

import pytest

from async_llm.engine.runners.transformers_prefill import prefill_groups


def _group_cost(group: list[int], lengths: list[int], overhead: float, pair: float, packing: bool) -> float:
    longest, total = max(lengths[i] for i in group), sum(lengths[i] for i in group)
    padded = overhead + len(group) * (longest + longest * longest * pair)
    packed = overhead + total + total * total * pair
    return min(padded, packed) if packing and len(group) > 1 else padded


def _cost(groups, lengths, overhead, pair=0.0, packing=False) -> float:
    return sum(_group_cost([*g], lengths, overhead, pair, packing) for g in groups)


def _brute_force(lengths: list[int], overhead: float, pair: float = 0.0, packing: bool = False) -> float:
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

    return min(_cost(p, lengths, overhead, pair, packing) for p in partitions(list(range(len(lengths)))))


def test_padded_groups_cover_every_prompt_once_shortest_first():
    lengths = [20, 180, 22, 175, 60]
    groups = prefill_groups(lengths, overhead_tokens=32)
    assert sorted(itertools.chain(*(g for g, _ in groups))) == list(range(len(lengths)))
    # 20 and 22 together, 175 and 180 together, 60 alone; nothing packed when packing is off
    assert groups == [([0, 2], False), ([4], False), ([3, 1], False)]


def test_similar_lengths_stay_in_one_forward_and_zero_overhead_splits_by_length():
    assert prefill_groups([12, 16, 11, 14], overhead_tokens=32) == [([2, 0, 3, 1], False)]
    assert prefill_groups([12, 16, 11, 12], overhead_tokens=0) == [([2], False), ([0, 3], False), ([1], False)]
    assert prefill_groups([], 32) == [] and prefill_groups([7], 32, 0.001, True) == [([0], False)]


def test_packing_takes_mixed_lengths_in_one_forward_until_attention_outweighs_padding():
    pair = 1 / 3000  # SmolLM2-135M
    burst = [10, 12, 16, 14, 11, 13, 15, 16] * 2
    assert prefill_groups(burst, 48, pair, packing=True) == [(sorted(range(16), key=burst.__getitem__), True)]
    assert prefill_groups([20, 180, 22, 175, 60], 48, pair, packing=True) == [([0, 2, 4, 3, 1], True)]
    # Two long prompts: packing 4000 tokens costs 16M pairs; two padded forwards are cheaper.
    assert prefill_groups([2000, 2000], 48, pair, packing=True) == [([0, 1], False)]


def test_the_split_is_optimal_or_close_to_it():
    rng = random.Random(3)
    for _ in range(80):
        lengths = [rng.choice([rng.randint(1, 30), rng.randint(100, 400)]) for _ in range(rng.randint(1, 7))]
        overhead = rng.choice([0, 8, 32, 256])
        pair, packing = rng.choice([(0.0, False), (1 / 3000, True), (0.004, True), (0.0, True)])
        groups = prefill_groups(lengths, overhead, pair, packing)
        got = sum(_group_cost(g, lengths, overhead, pair, packing) for g, _ in groups)
        best = _brute_force(lengths, overhead, pair, packing)
        if packing:  # runs of neighbours only: within 1% of the best of all splits
            assert best - 1e-6 <= got <= best * 1.01 + 1e-6, (lengths, overhead, pair)
        else:  # exactly the best
            assert got == pytest.approx(best), (lengths, overhead)


def test_a_split_that_saves_little_is_not_worth_its_wait():
    """48 prompts of 13 tokens and 16 of 16: padding them apart saves ~14% of one forward, which
    the least-cost plan takes, but the first forward's rows would then wait for the second before
    their next token. With min_saving the burst is one forward; prompts of very different lengths
    are still split."""
    burst = [13] * 48 + [16] * 16
    assert len(prefill_groups(burst, 48, 0.0003)) == 2
    assert [sorted(g) for g, _ in prefill_groups(burst, 48, 0.0003, min_saving=0.25)] == [list(range(64))]
    assert len(prefill_groups([10] * 8 + [4000], 48, 0.0003, min_saving=0.25)) == 2
