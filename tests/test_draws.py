"""Counter-based draws (engine.draws) and the sampler's step without host syncs.

Every value here is deterministic (pure integer hashing of fixed inputs), so the statistical bounds
are checks of fixed numbers, not chances of a flake.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import anyio
import pytest
import torch

from async_llm.engine.draws import hash32, uniforms
from async_llm.engine.sampler import SamplingBatch, apply_penalties, sample
from async_llm.engine.update import StepUpdate
from async_llm.sampling_params import MAX_SEED, SamplingParams
from tests.conftest import limit_device_rows

SEEDS = (0, 1, 7, 2**32, 2**32 - 1, 123_456_789_012_345, MAX_SEED - 1)


def _full(value: int, n: int) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.long)


# -- the draws ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_uniforms_over_counters_are_in_range_and_uniform(seed):
    n, bins = 40_000, 40
    u = uniforms(_full(seed, n), torch.arange(n))
    assert u.dtype == torch.float32 and u.shape == (n,)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01
    expected = n / bins
    chi2 = float((((torch.histc(u, bins, 0.0, 1.0) - expected) ** 2) / expected).sum())
    assert chi2 < 100  # 39 degrees of freedom: about 39 +- 9 for uniform numbers
    # Successive draws of one request are not correlated.
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.03


def test_uniforms_over_seeds_are_uniform_and_neighbouring_seeds_unrelated():
    n, bins = 40_000, 40
    seeds = torch.arange(n)
    for counter in (0, 1, 1000):
        u = uniforms(seeds, _full(counter, n))
        expected = n / bins
        chi2 = float((((torch.histc(u, bins, 0.0, 1.0) - expected) ** 2) / expected).sum())
        assert chi2 < 100 and abs(float(u.mean()) - 0.5) < 0.01
    # Seeds s and s + 1 (the n choices of one request) draw unrelated sequences.
    a, b = uniforms(seeds, torch.arange(n)), uniforms(seeds + 1, torch.arange(n))
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.03


def test_distinct_seeds_or_counters_give_distinct_draws():
    n = 10_000
    # One seed: distinct counters give distinct 32-bit hashes (the chain is a bijection of the counter).
    assert len(set(hash32(_full(42, n), torch.arange(n)).tolist())) == n
    # One counter: distinct seeds, low and high words alike, give (almost surely) distinct draws.
    seeds = torch.tensor([*range(1000), *(s << 32 for s in range(1, 1000))])
    assert len(set(hash32(seeds, _full(0, len(seeds))).tolist())) == len(seeds)
    first = uniforms(torch.tensor([5, 6]), torch.tensor([0, 0]))
    assert float(first[0]) != float(first[1])


def test_a_rows_draw_depends_only_on_its_seed_and_counter():
    seeds = torch.tensor(SEEDS)
    counters = torch.tensor([0, 3, 1, 9, 2, 5, 1 << 20])
    together = uniforms(seeds, counters)
    alone = torch.cat([uniforms(seeds[i : i + 1], counters[i : i + 1]) for i in range(len(SEEDS))])
    assert torch.equal(together, alone)
    order = torch.randperm(len(SEEDS), generator=torch.Generator().manual_seed(0))
    assert torch.equal(uniforms(seeds[order], counters[order]), together[order])
    padded = uniforms(torch.cat([seeds, seeds]), torch.cat([counters, counters + 1]))  # a bigger batch
    assert torch.equal(padded[: len(SEEDS)], together)


def test_draws_are_exact_multiples_of_two_to_the_minus_24():
    u = uniforms(_full(3, 1000), torch.arange(1000)).double()
    scaled = u * 2**24
    assert torch.equal(scaled, scaled.floor()) and float(scaled.max()) <= 2**24 - 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_equal_cpu_draws():
    seeds = torch.tensor(SEEDS).repeat_interleave(100)
    counters = torch.arange(len(seeds))
    on_cuda = uniforms(seeds.cuda(), counters.cuda())
    assert on_cuda.device.type == "cuda"
    assert torch.equal(on_cuda.cpu(), uniforms(seeds, counters))


# -- the sampler: top-k from a Python int, no host sync -------------------------------------------


def _batch(*params: SamplingParams, vocab: int) -> SamplingBatch:
    return SamplingBatch.build(list(params), vocab, torch.device("cpu"))


def test_build_keeps_the_largest_k_of_the_sampled_rows_as_an_int():
    sampled = SamplingParams(temperature=1.0)
    sb = _batch(SamplingParams(), sampled.merge(top_k=3), sampled.merge(top_k=5), vocab=10)
    assert sb.top_k_max == 5 and isinstance(sb.top_k_max, int)
    assert sb.top_k is not None and sb.top_k.tolist()[1:] == [3, 5]
    assert _batch(sampled.merge(top_k=3), sampled, vocab=10).top_k_max == 10  # a row with top-k off
    assert _batch(sampled.merge(top_k=50), vocab=10).top_k_max == 10  # k beyond the vocabulary: all tokens
    assert _batch(sampled.merge(top_k=50), vocab=10).top_k is None
    assert _batch(SamplingParams(top_k=3), vocab=10).top_k is None  # greedy rows never filter


def _reference_top_k(logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> list[int]:
    """Row by row, the plain rule: keep the k best scores, softmax, first token whose cdf exceeds u."""
    tokens = []
    for row, p in zip(logits, params, strict=True):
        if p.greedy:
            tokens.append(int(row.argmax()))
            continue
        scores = row / p.effective_temperature
        if 0 < p.top_k < len(row):
            kth = scores.sort(descending=True).values[p.top_k - 1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        cdf = torch.softmax(scores, -1).cumsum(-1)
        above = (cdf > float(u[len(tokens)]) * cdf[-1]).nonzero()
        tokens.append(int(above[0]) if len(above) else len(row) - 1)
    return tokens


def test_top_k_with_mixed_k_per_row_matches_the_plain_rule():
    vocab = 32
    params = [
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=0.7, top_k=4),
        SamplingParams(),  # greedy
        SamplingParams(temperature=1.3, top_k=9),
        SamplingParams(temperature=1.0),  # top-k off
        SamplingParams(temperature=1.0, top_k=100),  # beyond the vocabulary
    ]
    sb = _batch(*params, vocab=vocab)
    logits = torch.randn(len(params), vocab, generator=torch.Generator().manual_seed(0))
    for step in range(200):
        u = uniforms(torch.arange(len(params)), _full(step, len(params)))
        assert sample(logits.clone(), sb, u).tolist() == _reference_top_k(logits, params, u)


@pytest.fixture
def no_host_reads(monkeypatch):
    """Make every way of reading a tensor back to the host raise (on CPU, as a device sync would cost)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read back to the host")

    def arm() -> None:
        for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
            monkeypatch.setattr(torch.Tensor, name, refuse)

    return arm


@pytest.mark.parametrize(
    "filters",
    [
        {"top_k": 5},  # the partial-sort path
        {"top_k": 5, "top_p": 0.8, "min_p": 0.05},  # the sorted path
        {"top_p": 0.9},
        {"min_p": 0.1},
    ],
)
def test_sample_and_penalties_never_read_a_tensor_back(no_host_reads, filters):
    vocab = 16
    params = [
        SamplingParams(temperature=0.9, repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.1, **filters),
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(repetition_penalty=1.1),  # greedy
    ]
    sb = _batch(*params, vocab=vocab)
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(1))
    counts = torch.zeros(3, vocab)
    counts[:, 2] = 2.0
    prompt_mask = torch.zeros(3, vocab, dtype=torch.bool)
    prompt_mask[:, :4] = True
    u = uniforms(torch.tensor([11, 12, 13]), torch.tensor([0, 0, 0]))
    expected = sample(apply_penalties(logits, sb, counts, prompt_mask), sb, u)
    no_host_reads()
    with pytest.raises(AssertionError, match="read back"):
        int(torch.tensor(1))  # the fixture is armed
    tokens = sample(apply_penalties(logits, sb, counts, prompt_mask), sb, u)
    assert torch.equal(tokens, expected)


# -- the engine's draws: per request, counted, seeded ---------------------------------------------


def _updater(engine_seed: int) -> StepUpdate:
    update = StepUpdate()
    update._rng = torch.Generator().manual_seed(engine_seed)
    update.device = torch.device("cpu")
    return update


def _request(**params: object) -> SimpleNamespace:
    return SimpleNamespace(params=SamplingParams(**params), draw_seed=None, draws=0)  # the fields _uniforms reads


def _draws(update: StepUpdate, requests: list[SimpleNamespace]) -> torch.Tensor:
    sb = SamplingBatch.build([r.params for r in requests], 8, torch.device("cpu"))
    u = update._uniforms(requests, sb)  # type: ignore[arg-type]
    assert u is not None
    return u


def test_a_seeded_request_draws_its_own_sequence_whatever_the_batch():
    seeded = _request(temperature=1.0, seed=1234)
    expected = uniforms(_full(1234, 4), torch.arange(4))
    update = _updater(0)
    got = [
        _draws(update, [seeded])[0],
        _draws(update, [_request(temperature=1.0), seeded])[1],
        _draws(update, [seeded, _request(), _request(temperature=0.5, seed=9)])[0],
        _draws(_updater(99), [_request(temperature=1.0), _request(temperature=1.0), seeded])[2],
    ]
    assert torch.equal(torch.stack(got), expected)
    assert seeded.draws == 4  # a preempted request keeps its count and goes on from there


def test_greedy_rows_draw_nothing_and_all_greedy_batches_get_no_uniforms():
    greedy = _request()
    update = _updater(0)
    sb = SamplingBatch.build([greedy.params], 8, torch.device("cpu"))
    assert update._uniforms([greedy], sb) is None  # type: ignore[list-item]
    _draws(update, [greedy, _request(temperature=1.0)])
    assert (greedy.draws, greedy.draw_seed) == (0, None)


def test_unseeded_requests_take_a_seed_from_the_engine_generator_once():
    def run(engine_seed: int) -> list[list[float]]:
        update = _updater(engine_seed)
        rows = [_request(temperature=1.0), _request(temperature=1.0, top_k=3)]
        steps = [_draws(update, rows).tolist() for _ in range(5)]
        assert all(r.draw_seed is not None and 0 <= r.draw_seed < MAX_SEED for r in rows)
        assert rows[0].draw_seed != rows[1].draw_seed
        return steps

    assert run(5) == run(5)  # the engine's seed makes unseeded runs reproducible
    assert run(5) != run(6)
    steps = run(5)
    assert steps[0] != steps[1] and steps[0][0] != steps[0][1]  # each request and step draws anew


# -- end to end ------------------------------------------------------------------------------------


async def test_a_preempted_seeded_request_continues_its_draws(plain_llm, monkeypatch):
    """A seeded request that an out-of-memory preempts resumes where its draws stopped: its text is
    the one it has when it runs alone."""
    prompts = ["Hello", "The quick brown fox", "日本語 🎉", "def hello(name):"]
    kwargs = dict(chat_template=False, max_tokens=16, ignore_eos=True, temperature=1.0, top_k=20)
    with anyio.fail_after(60):
        alone = [(await plain_llm.acomplete(p, seed=i, **kwargs)).token_ids for i, p in enumerate(prompts)]
    ooms = limit_device_rows(plain_llm, monkeypatch)
    with anyio.fail_after(60):
        results = await asyncio.gather(*(plain_llm.acomplete(p, seed=i, **kwargs) for i, p in enumerate(prompts)))
    assert ooms["n"] > 0 and plain_llm.engine.scheduler.num_preempted > 0
    assert [r.token_ids for r in results] == alone
