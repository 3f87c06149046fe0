"""Host values onto the engine's device (:func:`async_llm.engine.transfer.device_tensor`): the
tensor ``torch.tensor`` makes, with its inferred dtype; on CUDA queued through pinned memory, so
neither it nor a row leaving an overlapped batch makes the host wait for the device."""

from __future__ import annotations

import asyncio

import pytest
import torch

from async_llm import HuggingFaceLLM
from async_llm.engine.transfer import device_tensor
from tests.conftest import build_model

CASES = [[3, 1, 4], [[1, 2], [3, 4]], [0.5, 1.5], [True, False], []]


def _same(made: torch.Tensor, data: object, dtype: torch.dtype | None) -> None:
    expected = torch.tensor(data, dtype=dtype)
    assert made.dtype == expected.dtype and torch.equal(made.cpu(), expected)


@pytest.mark.parametrize("dtype", [None, torch.long, torch.float32])
@pytest.mark.parametrize("data", CASES)
def test_values_on_the_cpu_are_torch_tensors(data, dtype):
    if dtype is not None and data and isinstance(data[0], bool):
        dtype = None
    _same(device_tensor(data, dtype=dtype, device=torch.device("cpu")), data, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("data", CASES)
def test_values_reach_cuda_without_a_sync(data):
    torch.cuda.set_sync_debug_mode("error")
    try:
        made = device_tensor(data, device=torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert made.device.type == "cuda"
    _same(made, data, None)


@pytest.mark.cuda
async def test_rows_joining_and_leaving_the_static_batch_do_not_sync(tiny_tokenizer):
    """Requests of different lengths end at different steps of an overlapped batch: their rows
    leave (and others join) without a host sync, which would wait for the step queued ahead."""
    model = build_model(len(tiny_tokenizer)).cuda()
    llm = HuggingFaceLLM(model=model, tokenizer=tiny_tokenizer, device="cuda", max_batch_size=8, max_model_len=256)
    synced: list[str] = []
    async with llm:
        batch = llm.engine.batch

        def watched(method):
            def call(*args, **kwargs):
                torch.cuda.set_sync_debug_mode("error")
                try:
                    return method(*args, **kwargs)
                except RuntimeError as exc:
                    synced.append(f"{method.__name__}: {exc}")
                    raise
                finally:
                    torch.cuda.set_sync_debug_mode("default")

            return call

        batch.remove = watched(batch.remove)
        results = await asyncio.gather(
            *(llm.acomplete(f"row {i}", chat_template=False, max_tokens=4 + 3 * i, ignore_eos=True) for i in range(6))
        )
    assert not synced
    assert [len(r.token_ids) for r in results] == [4 + 3 * i for i in range(6)]
