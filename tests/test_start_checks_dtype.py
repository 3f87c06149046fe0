"""The fast runner's start-up check in bfloat16 and float16: a tolerance scaled to the dtype and the
same greedy tokens over a few decode steps, so that rounding keeps the fast runner and a wrong forward
does not; float32's 1e-3 unchanged; a verdict kept for one dtype is not reused for another."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import pytest
import torch

from async_llm import HuggingFaceLLM
from async_llm.engine.model_api import cache_kwarg, input_device, last_logits, probe_batch, vocab_size
from async_llm.engine.runners import fast_check
from async_llm.engine.runners.fast_check import GREEDY_STEPS, agreement, compared_logits, prepare, tolerance
from async_llm.engine.runners.fast_forward import FastDecoder, Rows
from async_llm.engine.runners.fast_linear import fused_linear
from tests.conftest import build_model

VOCAB = 400


def _tiny(dtype: torch.dtype, seed: int = 0) -> Any:
    """The suite's tiny random Llama (hidden 64, 2 layers) in ``dtype``."""
    return build_model(VOCAB, seed).to(dtype)


@pytest.fixture(scope="module")
def bf16_model() -> Any:
    return _tiny(torch.bfloat16)


def _probe_logits(model: Any) -> torch.Tensor:
    """``[2, V]`` float32 next-token logits of the plain forward on the check's probe prompts."""
    ids, mask = probe_batch(0, input_device(model), vocab_size(model))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        return last_logits(model, cache_kwarg(model), None, input_ids=ids, attention_mask=mask, position_ids=positions)


def _two_rows(second: float) -> torch.Tensor:
    """``[2, V]`` logits: small noise, row 0's top 10 (clear), row 1's top 10 at token 7 and
    ``second`` at token 8."""
    logits = torch.rand(2, VOCAB, generator=torch.Generator().manual_seed(0))
    logits[0, 3] = 10.0
    logits[1, 7], logits[1, 8] = 10.0, second
    return logits


def test_the_tolerance_is_the_dtypes():
    assert tolerance(torch.float32) == tolerance(torch.float64) == fast_check.TOLERANCE == 1e-3
    assert tolerance(torch.bfloat16) == 8 * 2**-7  # 6.3e-2
    assert tolerance(torch.float16) == 8 * 2**-10  # 7.8e-3
    with pytest.raises(ValueError, match="floating-point"):
        tolerance(torch.int64)


def test_float32_still_applies_1e_3():
    reference = _two_rows(second=9.0)
    within, beyond = reference.clone(), reference.clone()
    within[0, 100] += 0.9e-3 * 10
    beyond[0, 100] += 1.1e-3 * 10
    assert agreement(reference, within, torch.float32) is None
    why = agreement(reference, beyond, torch.float32)
    assert why is not None and why.startswith("its logits differ") and "(> 0.001)" in why
    assert agreement(reference, beyond, torch.bfloat16) is None  # rounding in bf16


@pytest.mark.parametrize(("dtype", "refusal"), [(torch.bfloat16, "greedy token"), (torch.float32, "logits differ")])
def test_a_flipped_clear_greedy_token_is_refused(dtype, refusal):
    """Row 1's top two logits are 10% of the largest apart (no tie in bf16's 6.3%); the candidate,
    6% off, takes the second: within bf16's tolerance of logits, but a wrong greedy token."""
    reference = _two_rows(second=9.0)
    candidate = reference.clone()
    candidate[1, 7] -= 0.6
    candidate[1, 8] += 0.6
    why = agreement(reference, candidate, dtype)
    assert why is not None and refusal in why


def test_a_near_tie_may_flip_in_low_precision():
    """Row 1's top two are 1% of the largest apart: a tie in bf16 (either token is right), not in
    fp16 (0.78%). The candidate, 0.6% off, takes the second: within both tolerances of logits."""
    reference = _two_rows(second=9.9)
    candidate = reference.clone()
    candidate[1, 7], candidate[1, 8] = 9.94, 9.96
    assert agreement(reference, candidate, torch.bfloat16) is None
    assert "greedy token" in str(agreement(reference, candidate, torch.float16))
    assert "logits differ" in str(agreement(reference, candidate, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_logits_with_a_nan_are_refused(dtype):
    reference = _two_rows(second=9.0)
    candidate = reference.clone()
    candidate[0, 100] = float("nan")
    assert "logits differ" in str(agreement(reference, candidate, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_logits_of_another_model_are_refused(dtype):
    reference, other = _probe_logits(_tiny(dtype, seed=0)), _probe_logits(_tiny(dtype, seed=1))
    assert "logits differ" in str(agreement(reference, other, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_fast_runner_is_kept_in_low_precision(dtype):
    """The tiny Llama's fast step agrees with the plain one within the dtype's tolerance, with the
    same greedy tokens, after the prompts and over every greedy step the check takes.

    The Python layers reproduce the transformers forward's roundings here bit for bit, so both rows
    keep their tokens through step 1, where one row's two best logits tie exactly in bfloat16. The
    native step (sums in another order) may break that tie the other way: the row then leaves the
    comparison, and the check still accepts every step it compares."""
    model = _tiny(dtype)
    with torch.inference_mode():
        decoder, why = prepare(model, 0, cache_kwarg(model))
        assert why is None and isinstance(decoder, FastDecoder)
        decoder.native = False
        compared = list(compared_logits(decoder, model, 0, cache_kwarg(model), GREEDY_STEPS))
        decoder.native = True
        compared_native = list(compared_logits(decoder, model, 0, cache_kwarg(model), GREEDY_STEPS))
    assert len(compared) == 1 + GREEDY_STEPS and all(len(reference) == 2 for _, reference, _ in compared)
    assert [agreement(reference, candidate, dtype) for _, reference, candidate in compared] == [None] * len(compared)
    assert len(compared_native) == 1 + GREEDY_STEPS and len(compared_native[0][1]) == 2
    assert all(agreement(reference, candidate, dtype) is None for _, reference, candidate in compared_native)


async def test_a_bfloat16_model_decodes_with_the_fast_runner(tiny_tokenizer):
    model = build_model(len(tiny_tokenizer)).to(torch.bfloat16)
    async with HuggingFaceLLM(model=model, tokenizer=tiny_tokenizer, device="cpu") as llm:
        assert llm.engine.runner.name == "fast"
        result = await llm.acomplete("Hello", chat_template=False, max_tokens=8, ignore_eos=True)
    assert len(result.token_ids) == 8


def test_the_greedy_steps_agree_in_bfloat16(bf16_model):
    """Each side decodes on its own greedy tokens, over its own keys and values, for GREEDY_STEPS
    steps: they keep the same tokens (no row left the comparison) and the check accepts each step."""
    decoder = FastDecoder(bf16_model)
    decoder.native = False  # the Python layers: see test_the_fast_runner_is_kept_in_low_precision
    with torch.inference_mode():
        compared = list(compared_logits(decoder, bf16_model, 0, cache_kwarg(bf16_model), GREEDY_STEPS))
        assert fast_check._difference(decoder, bf16_model, 0, cache_kwarg(bf16_model)) is None
        decoder.native = True
        assert fast_check._difference(decoder, bf16_model, 0, cache_kwarg(bf16_model)) is None
    assert [where for where, _, _ in compared] == ["after the prompts", *(f"decode step {i}" for i in range(1, 5))]
    for _, reference, candidate in compared:
        assert reference.shape == candidate.shape == (2, VOCAB)
        assert agreement(reference, candidate, torch.bfloat16) is None


def test_a_fast_side_with_a_wrong_weight_is_refused(bf16_model, monkeypatch):
    """The decoder's own fused gate/up of one layer in the wrong order (up, then gate): refused. The
    model the plain forward runs is not touched (owned=False: the decoder's fused weight is a copy)."""
    before = {name: tensor.clone() for name, tensor in bf16_model.state_dict().items()}
    decoder = FastDecoder(bf16_model, owned=False)
    mlp = bf16_model.model.layers[1].mlp
    swapped = fused_linear([copy.deepcopy(mlp.up_proj), copy.deepcopy(mlp.gate_proj)], 16, owned=False)
    monkeypatch.setattr(decoder.layers[1], "gate_up", swapped)
    with torch.inference_mode():
        why = fast_check._difference(decoder, bf16_model, 0, cache_kwarg(bf16_model))
    assert why is not None and why.startswith("its logits differ")
    after = bf16_model.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())


def test_a_fault_in_a_later_decode_step_is_refused(bf16_model, monkeypatch):
    """A fast step that feeds the wrong token from its third decode step on: the check's greedy
    steps catch it there."""
    decoder = FastDecoder(bf16_model)
    step, calls = decoder.step, {"decode": 0}

    def wrong_token_from_step_3(rows: Rows | None, chunks: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if rows is not None:
            calls["decode"] += 1
            if calls["decode"] >= 3:
                rows = dataclasses.replace(rows, input_ids=(rows.input_ids + 1) % VOCAB)
        return step(rows, chunks)

    monkeypatch.setattr(decoder, "step", wrong_token_from_step_3)
    with torch.inference_mode():
        why = fast_check._difference(decoder, bf16_model, 0, cache_kwarg(bf16_model))
    assert why is not None and why.endswith(", decode step 3")


class _Store:
    """A CheckStore in memory, keyed by the check and its whole context."""

    def __init__(self) -> None:
        self.verdicts: dict[str, str | bool | None] = {}

    def _key(self, check: str, context: Mapping[str, str]) -> str:
        return json.dumps([check, dict(context)], sort_keys=True)

    def get(self, check: str, context: Mapping[str, str]) -> dict[str, Any] | None:
        key = self._key(check, context)
        return {"verdict": self.verdicts[key]} if key in self.verdicts else None

    def put(self, check: str, context: Mapping[str, str], verdict: str | bool | None) -> None:
        self.verdicts[self._key(check, context)] = verdict


def test_a_verdict_is_kept_per_dtype(monkeypatch):
    runs: list[int] = []
    real = fast_check._difference

    def counted(*args: Any) -> str | None:
        runs.append(1)
        return real(*args)

    monkeypatch.setattr(fast_check, "_difference", counted)
    store = _Store()
    with torch.inference_mode():
        for dtype in (torch.float32, torch.float32, torch.bfloat16, torch.bfloat16):
            model = _tiny(dtype)
            decoder, why = prepare(model, 0, cache_kwarg(model), checks=store)
            assert why is None and decoder is not None
    assert len(runs) == 2  # once per dtype, the second start of each reused its verdict
    contexts = [json.loads(key)[1] for key in store.verdicts]
    assert sorted(c["compute_dtype"] for c in contexts) == ["torch.bfloat16", "torch.float32"]
