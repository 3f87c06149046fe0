"""n-gram speculative decoding: the drafts, the verify step inside continuous batching (greedy output
token for token what one-token steps give, on every architecture the fast runner takes, with drafts
right and wrong), rejection sampling's distribution, and what does not speculate."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import pytest
import torch

from async_llm import HuggingFaceLLM
from async_llm.engine.config import EngineConfig
from async_llm.engine.runners.fast_forward import Chunk
from async_llm.engine.speculative import (
    ACCEPTANCE_WINDOW,
    BACKOFF_TOKENS,
    NgramIndex,
    RowSpeculation,
    SpeculativeConfig,
    accept,
    probabilities,
)
from async_llm.errors import InvalidParameterError, ParameterTypeError
from async_llm.sampling_params import SamplingParams
from tests.conftest import PROMPTS
from tests.test_fast_decode import FAST, PLAIN

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "disable_by_batch_size": 8}

#: The runners that speculate: the fast one over the padded batch (the CPU default) and the static
#: one over fixed slots (CUDA's default; run eagerly here), with a small store.
RUNNERS = {
    "fast": {},
    "static": {"runner": "static", "max_batch_size": 8, "max_model_len": 256, "kv_cache_bytes": 64 * 2**20},
}


# -- drafts -----------------------------------------------------------------------------------------
def test_a_draft_is_what_followed_the_latest_earlier_occurrence_of_the_longest_suffix():
    index = NgramIndex(1, 3)
    index.extend([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    # "2 3" occurs at 1-2 (then 9) and 5-6 (then 7 8 5): the latest wins; "5 2 3" never occurred before.
    assert index.draft(4) == [7, 8, 5, 2]
    index.extend([7])  # "2 3 7" occurred before: followed by 8 5 2 3 7
    assert index.draft(3) == [8, 5, 2]
    assert NgramIndex(2, 3).draft(4) == []
    lone = NgramIndex(2, 2)
    lone.extend([4, 5, 6])
    assert lone.draft(4) == []  # "5 6" never occurred before its own end


def test_the_index_grown_step_by_step_drafts_as_one_built_at_once():
    tokens = [int(t) for t in torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(0))]
    whole = NgramIndex(2, 4)
    whole.extend(tokens)
    grown = NgramIndex(2, 4)
    for t in tokens:
        grown.extend([t])
    assert grown.following == whole.following and grown.draft(5) == whole.draft(5)


def test_a_row_with_low_acceptance_pauses_then_drafts_again():
    speculation = RowSpeculation(SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=1))
    prompt = [1, 2, 3, 1, 2]
    assert speculation.draft(prompt, []) == [3, 1, 2]
    speculation.record(ACCEPTANCE_WINDOW, 0, produced=10)  # nothing accepted over a window
    assert speculation.draft(prompt, [0] * 10) == []
    assert speculation.draft(prompt, [0] * (10 + BACKOFF_TOKENS)) != []  # "0 0" repeats: drafts again


K = "speculative_config.num_speculative_tokens"


@pytest.mark.parametrize(
    ("value", "param", "error"),
    [
        ({"method": "eagle"}, "speculative_config.method", InvalidParameterError),
        ({"method": "ngram", "num_speculative_tokens": 0}, K, InvalidParameterError),
        ({"num_speculative_tokens": 17}, K, InvalidParameterError),
        ({"num_speculative_tokens": "4"}, K, ParameterTypeError),
        (
            {"prompt_lookup_min": 5, "prompt_lookup_max": 3},
            "speculative_config.prompt_lookup_min",
            InvalidParameterError,
        ),
        ({"ngram": True}, "speculative_config", InvalidParameterError),
        ("ngram", "speculative_config", ParameterTypeError),
    ],
)
def test_bad_speculative_config_is_a_typed_error_naming_the_key(value, param, error):
    with pytest.raises(error) as caught:
        EngineConfig(speculative_config=value)
    assert caught.value.param == param
    with pytest.raises(error):
        SamplingParams(speculative_config=value)


def test_bad_speculative_config_is_refused_before_the_model_loads(monkeypatch):
    monkeypatch.setattr("async_llm.llm.huggingface.model_to_serve", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(InvalidParameterError):
        HuggingFaceLLM("no/such-model", device="cpu", speculative_config={"method": "medusa"})


# -- rejection sampling -----------------------------------------------------------------------------
def test_rejection_sampling_keeps_each_positions_distribution():
    """A draft of two tokens against fixed logits over a 5-token vocabulary: the first emitted token
    is distributed as position 0's distribution, and the second, where the first draft token was
    accepted, as position 1's (as if no draft had been made)."""
    v, t, rows = 5, 3, 20000
    logits = torch.tensor([[0.5, 1.5, -0.5, 1.0, 0.0], [1.0, -1.0, 0.3, 0.8, 0.2], [0.0, 0.0, 0.0, 0.0, 0.0]])
    draft = [1, 3]
    sampling = {"temperature": torch.full((rows,), 0.9), "top_k": None, "top_p": None, "min_p": None}
    emitted = accept(logits[None].expand(rows, t, v), [draft] * rows, [False] * rows, sampling, range(rows), [0] * rows)
    p = probabilities(logits, torch.full((t,), 0.9), None, None, None)
    first = torch.bincount(torch.tensor([e[0] for e in emitted]), minlength=v).float() / rows
    assert (first - p[0]).abs().max() < 0.015
    after = [e[1] for e in emitted if e[0] == draft[0]]
    second = torch.bincount(torch.tensor(after), minlength=v).float() / len(after)
    assert (second - p[1]).abs().max() < 0.02
    assert all(1 <= len(e) <= t for e in emitted)


def test_probabilities_follow_the_samplers_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    one = torch.ones(1)
    top_k = probabilities(logits, one, torch.tensor([2]), None, None)
    assert (top_k[0, 2:] == 0).all() and torch.isclose(top_k.sum(), torch.tensor(1.0))
    top_p = probabilities(logits, one, None, torch.tensor([0.5]), None)
    assert top_p[0, 0] == 1.0  # the first token already holds more than half the mass
    min_p = probabilities(logits, one, None, None, torch.tensor([0.3]))
    assert (min_p[0, 2:] == 0).all() and (min_p[0, :2] > 0).all()


# -- the verify step in the engine ------------------------------------------------------------------
def _oracle(monkeypatch: pytest.MonkeyPatch, references: dict[tuple[int, ...], list[int]], wrong_every: int) -> None:
    """Drafts from the known answer (every ``wrong_every``-th drafted position wrong): what a
    proposer that is mostly right does, so that the verify step keeps several tokens a step."""

    def draft(self: RowSpeculation, prompt: Sequence[int], output: Sequence[int]) -> list[int]:
        answer = references[tuple(prompt)]
        tokens = list(answer[len(output) : len(output) + self.config.num_speculative_tokens])
        for i in range(len(tokens)):
            if wrong_every and (len(output) + i) % wrong_every == wrong_every - 1:
                tokens[i] = (tokens[i] + 1) % 50
        return tokens

    monkeypatch.setattr(RowSpeculation, "draft", draft)


async def _answers(model, tokenizer, spec, prompts=PROMPTS, max_tokens=24, runner=None, **kwargs):
    options = RUNNERS[runner or "fast"]
    async with HuggingFaceLLM(
        model=model, tokenizer=tokenizer, device="cpu", pad_token_id=0, speculative_config=spec, **options
    ) as llm:
        llm.engine.ready.wait()
        assert runner is None or llm.engine.runner.name == runner  # the runner asked for runs
        results = await asyncio.gather(
            *(llm.acomplete(p, chat_template=False, max_tokens=max_tokens, ignore_eos=True, **kwargs) for p in prompts)
        )
        assert llm.engine.batch.size == 0 and not llm.engine.batch.holds_rows()
        return results, llm.stats()


@pytest.mark.parametrize("runner", sorted(RUNNERS))
@pytest.mark.parametrize("name", sorted(FAST))
@pytest.mark.parametrize("wrong_every", [0, 3])
async def test_greedy_output_is_unchanged_by_drafts_right_or_wrong(
    name, wrong_every, runner, tiny_tokenizer, monkeypatch
):
    model = FAST[name]()
    plain, _ = await _answers(model, tiny_tokenizer, None)
    references = {tuple(r.prompt_token_ids): r.token_ids for r in plain}
    _oracle(monkeypatch, references, wrong_every)
    speculated, stats = await _answers(model, tiny_tokenizer, SPEC, runner=runner)
    assert [r.token_ids for r in speculated] == [r.token_ids for r in plain]
    assert [r.text for r in speculated] == [r.text for r in plain]
    assert stats["spec_decode_num_accepted_tokens"] > 0
    # Several tokens a step: fewer steps than tokens.
    assert stats["spec_decode_num_verify_steps"] < sum(len(r.token_ids) for r in plain)


@pytest.mark.parametrize("runner", sorted(RUNNERS))
async def test_ngram_drafts_from_the_context_leave_greedy_output_unchanged(runner, tiny_model, tiny_tokenizer):
    prompts = ["a b c d a b c d a b c", *PROMPTS]
    plain, _ = await _answers(tiny_model, tiny_tokenizer, None, prompts, max_tokens=120)
    speculated, stats = await _answers(tiny_model, tiny_tokenizer, SPEC, prompts, max_tokens=120, runner=runner)
    assert [r.token_ids for r in speculated] == [r.token_ids for r in plain]
    assert stats["spec_decode_num_draft_tokens"] > 0


async def test_a_stop_string_inside_a_multi_token_step_ends_the_text_there(tiny_model, tiny_tokenizer, monkeypatch):
    plain, _ = await _answers(tiny_model, tiny_tokenizer, None, PROMPTS[:1], max_tokens=32)
    text = plain[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    expected, _ = await _answers(tiny_model, tiny_tokenizer, None, PROMPTS[:1], max_tokens=32, stop=[stop])
    _oracle(monkeypatch, {tuple(plain[0].prompt_token_ids): plain[0].token_ids}, 0)
    got, _ = await _answers(tiny_model, tiny_tokenizer, SPEC, PROMPTS[:1], max_tokens=32, stop=[stop])
    assert got[0].text == expected[0].text and stop not in got[0].text
    assert got[0].finish_reason == "stop"


async def test_rows_that_cannot_speculate_decode_beside_those_that_do(tiny_model, tiny_tokenizer, monkeypatch):
    """Logprobs and penalties rows decode one token a step in the same verify forwards; their output
    is what it is without speculation, and they never draft."""
    plain, _ = await _answers(tiny_model, tiny_tokenizer, None, PROMPTS, max_tokens=20)
    references = {tuple(r.prompt_token_ids): r.token_ids for r in plain}
    drafted_for: list[tuple[int, ...]] = []
    _oracle(monkeypatch, references, 4)
    oracle = RowSpeculation.draft

    def draft(self, prompt, output):
        drafted_for.append(tuple(prompt))
        return oracle(self, prompt, output)

    monkeypatch.setattr(RowSpeculation, "draft", draft)
    async with HuggingFaceLLM(
        model=tiny_model, tokenizer=tiny_tokenizer, device="cpu", pad_token_id=0, speculative_config=SPEC
    ) as llm:
        kwargs = [{}, {"logprobs": True}, {"repetition_penalty": 1.0 + 1e-9}, {"speculative_config": False}]
        results = await asyncio.gather(
            *(
                llm.acomplete(p, chat_template=False, max_tokens=20, ignore_eos=True, **kw)
                for p, kw in zip(PROMPTS, kwargs, strict=False)
            )
        )
    assert results[0].token_ids == plain[0].token_ids and results[1].token_ids == plain[1].token_ids
    assert results[1].logprobs is not None and len(results[1].logprobs) == 20
    assert set(drafted_for) == {tuple(results[0].prompt_token_ids)}


async def test_past_disable_by_batch_size_steps_decode_plainly(tiny_model, tiny_tokenizer):
    prompts = ["a b c d a b c d a b c"] * 3
    _, stats = await _answers(tiny_model, tiny_tokenizer, {**SPEC, "disable_by_batch_size": 2}, prompts, 40)
    assert stats["spec_decode_num_verify_steps"] == 0


async def test_a_speculated_row_leaves_its_keys_and_values_to_the_prefix_cache(tiny_model, tiny_tokenizer, monkeypatch):
    """A row that kept part of its verify steps' columns has holes in its buffer; what it leaves
    the prefix cache when it ends is its tokens' keys and values without them: those a prefill of
    the same tokens computes."""
    plain, _ = await _answers(tiny_model, tiny_tokenizer, None, PROMPTS[:1], max_tokens=72)  # > 2 cache blocks
    _oracle(monkeypatch, {tuple(plain[0].prompt_token_ids): plain[0].token_ids}, 3)
    async with HuggingFaceLLM(
        model=tiny_model, tokenizer=tiny_tokenizer, device="cpu", pad_token_id=0, speculative_config=SPEC
    ) as llm:
        result = await llm.acomplete(PROMPTS[0], chat_template=False, max_tokens=72, ignore_eos=True)
        assert result.token_ids == plain[0].token_ids
        tokens = result.prompt_token_ids + result.token_ids[:-1]

        def cached_and_fresh() -> tuple[torch.Tensor, torch.Tensor]:
            cache = llm.engine.prefix_cache
            assert cache is not None
            hit = cache.match(tokens, count=False)
            decoder = llm.engine.runner.decoder  # type: ignore[attr-defined]
            fresh = decoder.new_kv(len(tokens))
            with torch.inference_mode():
                decoder.prefill([Chunk(tokens, fresh)])
            return torch.cat(hit.blocks, dim=3), fresh[:, :, :, : hit.tokens]

        cached, fresh = await asyncio.wrap_future(llm.engine.call_when_idle(cached_and_fresh))
    assert cached.shape[3] >= 64
    assert torch.allclose(cached, fresh, atol=1e-4, rtol=1e-4)


async def test_cancelling_a_speculating_stream_frees_its_row(tiny_model, tiny_tokenizer):
    async with HuggingFaceLLM(
        model=tiny_model, tokenizer=tiny_tokenizer, device="cpu", pad_token_id=0, speculative_config=SPEC
    ) as llm:
        stream = llm.astream("a b c d a b c d a b c", max_tokens=400, ignore_eos=True, chat_template=False)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 30:
                break
        await stream.aclose()
        for _ in range(200):
            if not llm.engine.batch.holds_rows() and not llm.engine.scheduler.has_work:
                break
            await asyncio.sleep(0.01)
        assert llm.engine.batch.size == 0 and not llm.engine.batch.holds_rows()
        again = await llm.acomplete("a b c", chat_template=False, max_tokens=5, ignore_eos=True)
        assert len(again.token_ids) == 5


async def test_seeded_sampling_with_speculation_runs_and_repeats(tiny_model, tiny_tokenizer, monkeypatch):
    """A seeded sampled row's verify steps draw from its own seed: the same text every run."""
    prompts = ["a b c d a b c d a b c"]
    greedy, _ = await _answers(tiny_model, tiny_tokenizer, None, prompts, 60)
    _oracle(monkeypatch, {tuple(greedy[0].prompt_token_ids): greedy[0].token_ids * 2}, 0)  # likely tokens
    kw = {"temperature": 0.8, "top_p": 0.9, "seed": 7}
    one, stats = await _answers(tiny_model, tiny_tokenizer, SPEC, prompts, 60, **kw)
    two, _ = await _answers(tiny_model, tiny_tokenizer, SPEC, prompts, 60, **kw)
    assert one[0].token_ids == two[0].token_ids and len(one[0].token_ids) == 60
    assert stats["spec_decode_num_draft_tokens"] > 0


@pytest.mark.parametrize("name", sorted(PLAIN))
async def test_a_runner_that_does_not_speculate_says_so_once_and_decodes_as_before(name, tiny_tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="async_llm")
    model = PLAIN[name]()
    plain, _ = await _answers(model, tiny_tokenizer, None, PROMPTS[:2], max_tokens=12)
    speculated, stats = await _answers(model, tiny_tokenizer, SPEC, PROMPTS[:2], max_tokens=12)
    assert [r.token_ids for r in speculated] == [r.token_ids for r in plain]
    assert stats["spec_decode_num_verify_steps"] == 0
    said = [r for r in caplog.records if "speculation off" in r.getMessage()]
    assert len(said) == 1 and "transformers" in said[0].getMessage()
