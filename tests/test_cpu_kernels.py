"""The fast runner's products on a CPU: bfloat16 prepacked through oneDNN where the CPU multiplies it
in hardware (AVX512-BF16, AMX), ``dtype="auto"`` choosing bf16 there and float32 elsewhere, and one
float32 row through the plain kernel."""

from __future__ import annotations

import asyncio

import pytest
import torch

from async_llm import HuggingFaceLLM
from async_llm.engine.runners import fast_linear
from async_llm.loading import loading
from async_llm.loading.loading import LoadOptions
from tests.conftest import PROMPTS, build_model


@pytest.mark.parametrize("hardware_bf16", [True, False])
def test_bfloat16_weights_are_prepacked_only_where_the_cpu_multiplies_them(hardware_bf16, monkeypatch):
    monkeypatch.setattr(fast_linear, "onednn_bf16", lambda: hardware_bf16)
    weight = torch.randn(32, 16).bfloat16()
    linear = fast_linear.prepacked_linear(weight, None, 4)
    assert isinstance(linear, fast_linear.PackedLinear) is (hardware_bf16 and fast_linear.onednn_prepack())
    x = torch.randn(3, 16).bfloat16()
    assert torch.allclose(linear(x).float(), torch.nn.functional.linear(x, weight).float(), rtol=2e-2, atol=2e-2)
    assert fast_linear.prepacks(weight.float()) is fast_linear.onednn_prepack()  # float32: always


@pytest.mark.parametrize("fastest", [torch.bfloat16, torch.float32])
def test_auto_dtype_on_a_cpu_is_its_fastest_and_elsewhere_the_checkpoints(fastest, monkeypatch):
    monkeypatch.setattr(loading, "cpu_dtype", lambda: fastest)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert LoadOptions(cpu, "auto").resolved_dtype() is fastest
    assert LoadOptions(cpu, None).resolved_dtype() is None  # the checkpoint's, as before
    assert LoadOptions(cpu, torch.float16).resolved_dtype() is torch.float16  # given: kept
    assert LoadOptions(cuda, "auto").resolved_dtype() == "auto"  # transformers reads the checkpoint's


def test_cpu_dtype_follows_the_cpus_bf16_instructions():
    expected = torch.bfloat16 if fast_linear.onednn_bf16() else torch.float32
    assert loading.cpu_dtype() is expected
    if fast_linear.onednn_bf16():  # only where the CPU has the instructions
        assert {"avx512_bf16", "amx_bf16"} & fast_linear.cpu_flags()


async def test_auto_dtype_loads_a_folder_in_the_cpus_dtype(tiny_model_dir):
    async with HuggingFaceLLM(tiny_model_dir, device="cpu", dtype="auto", max_tokens=8) as llm:
        assert next(llm.model.parameters()).dtype is loading.cpu_dtype()
        assert llm.engine.runner.name == "fast"  # the fast runner in either dtype
        assert await llm.arun("Hello")


@pytest.mark.skipif(not fast_linear.onednn_bf16(), reason="this CPU multiplies bf16 in software")
async def test_the_bfloat16_fast_runner_agrees_with_transformers_bf16(tiny_tokenizer):
    """Where the arithmetic allows: greedy tokens equal transformers' own bf16 forward's until a
    near-tie (the start-up check's tolerance) parts them; on the tiny model, over 16 tokens."""
    model = build_model(len(tiny_tokenizer)).to(torch.bfloat16)

    async def greedy(fast_path: bool) -> list[list[int]]:
        async with HuggingFaceLLM(
            model=model, tokenizer=tiny_tokenizer, device="cpu", fast_path=fast_path, max_tokens=16
        ) as llm:
            assert (llm.engine.runner.name == "fast") is fast_path
            if fast_path:
                assert isinstance(llm.engine.runner.decoder.lm_head, fast_linear.PackedLinear)
            results = await asyncio.gather(*(llm.acomplete(p, chat_template=False, ignore_eos=True) for p in PROMPTS))
        return [r.token_ids for r in results]

    fast, plain = await greedy(True), await greedy(False)
    agree = [next((i for i, (a, b) in enumerate(zip(f, p)) if a != b), len(f)) for f, p in zip(fast, plain)]
    print("bf16 tokens agreeing with transformers' bf16 per prompt:", agree)
    assert sum(agree) >= 0.75 * 16 * len(PROMPTS), f"tokens agreeing per prompt: {agree}"


@pytest.mark.skipif(not fast_linear.onednn_prepack(), reason="no prepacked linear in this torch")
def test_one_float32_row_multiplies_through_the_plain_kernel_over_the_modules_weights(monkeypatch):
    """One row streams each weight once: the default matrix-vector kernel over the modules' own
    weights (nothing held twice), the packed kernel from two rows up; the results agree."""
    torch.manual_seed(0)
    modules = [torch.nn.Linear(16, n, bias=False) for n in (8, 4, 4)]
    fused = fast_linear.fused_linear(modules, batch_hint=4, owned=False)
    single = fast_linear.prepacked_linear(modules[0].weight, None, 4)
    assert isinstance(fused, fast_linear.PackedLinear) and isinstance(single, fast_linear.PackedLinear)
    one, two = torch.randn(1, 16), torch.randn(2, 16)
    expected = torch.cat([m(one) for m in modules], dim=-1)
    calls = []
    packed = torch.ops.mkldnn._linear_pointwise

    def counting(*args):
        calls.append(args[0].shape[0])
        return packed(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counting)
    with torch.inference_mode():
        assert torch.equal(fused(one), expected.detach()) and torch.equal(single(one), modules[0](one).detach())
        assert calls == []  # one row: the plain kernel
        assert torch.allclose(fused(two), torch.cat([m(two) for m in modules], dim=-1), atol=1e-5)
    assert calls == [2]
