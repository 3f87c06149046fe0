"""Per-row sampling: seeds, filters, penalties, all in one batch."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import torch

from async_llm.engine.runners import native
from async_llm.engine.sampler import SamplingBatch, apply_penalties, greedy_tokens, sample
from async_llm.sampling_params import SamplingParams


async def test_seed_gives_same_text_alone_and_in_a_batch(llm):
    params = dict(temperature=1.0, top_p=0.9, seed=1234, max_tokens=30, ignore_eos=True)
    alone = await llm.arun("Hello", **params)
    noise = [llm.arun("The quick brown fox", temperature=1.2, max_tokens=30) for _ in range(3)]
    batched, *_ = await asyncio.gather(llm.arun("Hello", **params), *noise)
    assert alone == batched
    assert await llm.arun("Hello", **params) == alone
    other = await llm.arun("Hello", **{**params, "seed": 99})
    assert other != alone


async def test_unseeded_sampling_varies(llm):
    texts = {await llm.arun("Hello", temperature=1.5, max_tokens=20, ignore_eos=True) for _ in range(4)}
    assert len(texts) > 1


def _batch(*params: SamplingParams, vocab: int = 8) -> SamplingBatch:
    return SamplingBatch.build(list(params), vocab, torch.device("cpu"))


def test_greedy_rows_take_argmax_next_to_sampled_rows():
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    sb = _batch(SamplingParams(), SamplingParams(temperature=1.0), vocab=4)
    tokens = sample(logits, sb, torch.tensor([0.0, 0.999]))
    assert tokens[0].item() == 1
    assert 0 <= tokens[1].item() < 4


@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_greedy_tokens_are_argmax_with_its_ties_and_nans(kernel, monkeypatch):
    """The greedy choice is argmax's index on every row, through the native kernel and through
    torch's reduction: the first of tied maxima (ties placed far apart, across vectorised blocks, in
    vocabulary-wide rows), NaN taken as the maximum, -inf rows, in float32 and bfloat16."""
    if kernel == "native":
        if native.disabled_reason() is not None or not native.load():
            pytest.skip("the native step is not loaded here")
    else:
        monkeypatch.setattr(native, "_loaded", False)
    answered = []  # the native kernel's answers

    def counted(x: torch.Tensor, real=native.greedy) -> torch.Tensor | None:
        chosen = real(x)
        answered.append(chosen is not None)
        return chosen

    monkeypatch.setattr(native, "greedy", counted)
    generator = torch.Generator().manual_seed(0)
    for rows, vocab in ((1, 7), (2, 17), (3, 49_152), (64, 49_152), (5, 151_936)):
        logits = torch.randn(rows, vocab, generator=generator)
        top = logits.max() + 1
        for r in range(rows):
            for column in torch.randint(0, vocab, (1 + r % 4,), generator=generator).tolist():
                logits[r, column] = top
        if rows > 2:
            logits[1, vocab // 3] = float("nan")
            logits[1, vocab - 1] = float("nan")
            logits[2] = top  # every column tied
        if rows == 2:
            logits[0] = float("-inf")
            logits[1, 16] = float("nan")  # in the part after the last block of sixteen
        for x in (logits, logits.bfloat16()):
            assert torch.equal(greedy_tokens(x), x.argmax(dim=-1))
            assert torch.equal(greedy_tokens(x.reshape(rows, 1, vocab)), x.reshape(rows, 1, vocab).argmax(dim=-1))
    assert answered and all(answered) == (kernel == "native") and any(answered) == (kernel == "native")


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    sb = _batch(
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0, top_p=0.7),
        SamplingParams(temperature=1.0, min_p=0.5),
        vocab=4,
    )
    seen = [Counter() for _ in range(3)]
    for u in torch.linspace(0, 0.999, 200):
        for row, token in enumerate(sample(logits, sb, torch.full((3,), float(u))).tolist()):
            seen[row][token] += 1
    assert set(seen[0]) == {0}
    assert set(seen[1]) == {0, 1}  # 0.5 + 0.3 reaches 0.7: tokens 2 and 3 are cut
    assert set(seen[2]) == {0, 1}  # 0.15 < 0.5 * 0.5
    # Inverse CDF: the share of uniforms mapping to token 0 is its renormalised probability.
    assert abs(seen[1][0] / 200 - 0.5 / 0.8) < 0.02


def test_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0]] * 2)
    sb = _batch(SamplingParams(temperature=0.1), SamplingParams(temperature=10.0), vocab=4)
    cold, hot = Counter(), Counter()
    for u in torch.linspace(0, 0.999, 100):
        a, b = sample(logits, sb, torch.full((2,), float(u))).tolist()
        cold[a] += 1
        hot[b] += 1
    assert cold[0] > 95 and hot[0] < 40


def test_penalties_follow_transformers_and_openai_rules():
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0]])
    counts = torch.tensor([[0.0, 0.0, 2.0, 0.0]])
    prompt_mask = torch.tensor([[True, True, False, False]])
    rep = apply_penalties(logits, _batch(SamplingParams(repetition_penalty=2.0), vocab=4), counts, prompt_mask)
    assert rep.tolist() == [[1.0, -4.0, 0.5, 1.0]]
    freq = apply_penalties(
        logits, _batch(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), vocab=4), counts, prompt_mask
    )
    assert freq.tolist() == [[2.0, -2.0, 1.0 - 1.0 - 0.25, 1.0]]


async def test_repetition_penalty_changes_greedy_output(llm, tiny_model):
    plain = await llm.acomplete("Hello", chat_template=False, max_tokens=30, ignore_eos=True)
    penalised = await llm.acomplete(
        "Hello", chat_template=False, max_tokens=30, ignore_eos=True, repetition_penalty=5.0
    )
    assert plain.token_ids != penalised.token_ids
    # Same rule as transformers' RepetitionPenaltyLogitsProcessor: equal to generate with it.
    ids = torch.tensor([penalised.prompt_token_ids])
    ref = tiny_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=30,
        do_sample=False,
        repetition_penalty=5.0,
        eos_token_id=None,
        pad_token_id=0,
    )[0, ids.shape[1] :].tolist()
    assert penalised.token_ids == ref
