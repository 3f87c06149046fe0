"""The padded batch's buffer is allocated uninitialised: whatever memory it gets (here, NaN in every
element), rows joining at different lengths, a longer row opening columns on the left, and rows
leaving give ``generate``'s tokens, so nothing outside a row's tokens and zeroed padding is read."""

from __future__ import annotations

import asyncio

import pytest
import torch

from async_llm import HuggingFaceLLM
from async_llm.engine import batch as batch_module
from tests.conftest import PROMPTS, reference_ids


@pytest.mark.parametrize("first", [0, 2], ids=["shortest first", "longest first"])
@pytest.mark.parametrize("fast_path", [True, False])
async def test_garbage_in_a_fresh_buffer_never_reaches_a_row(fast_path, first, tiny_model, tiny_tokenizer, monkeypatch):
    """The first prompt decodes alone; the others join it, longer than it (columns open on the
    left) or shorter (padded on the left), into a buffer grown for them."""
    prompts = [PROMPTS[first], *(p for i, p in enumerate(PROMPTS) if i != first)]
    real_empty = torch.empty
    poisoned = 0

    def nan_empty(*shape, **kwargs):
        nonlocal poisoned
        poisoned += 1
        return real_empty(*shape, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(batch_module.torch, "empty", nan_empty)
    async with HuggingFaceLLM(
        model=tiny_model, tokenizer=tiny_tokenizer, device="cpu", fast_path=fast_path, prefix_cache=False
    ) as llm:
        stream = await llm.submit(prompts[0], chat_template=False, max_tokens=120, ignore_eos=True)
        await stream.__anext__()  # it decodes alone, then the others join it
        others = await asyncio.gather(
            *(llm.acomplete(p, chat_template=False, max_tokens=12, ignore_eos=True) for p in prompts[1:])
        )
        async for _ in stream:
            pass
        first_ids = list(stream.token_ids)
    monkeypatch.undo()
    assert poisoned > 0
    expected = reference_ids(tiny_model, tiny_tokenizer(prompts[0]).input_ids, 120)
    assert first_ids[: len(expected)] == expected
    for prompt, result in zip(prompts[1:], others):
        expected = reference_ids(tiny_model, tiny_tokenizer(prompt).input_ids, 12)
        assert result.token_ids[: len(expected)] == expected
