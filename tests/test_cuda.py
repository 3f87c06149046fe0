"""The static runner on a CUDA device: captured decode graphs give the eager step's tokens and
``generate``'s in float32, bfloat16 agrees with ``generate`` as stated, seeded sampling repeats, the
decode step reads nothing back from the device, and cancellation, faults and a capture out of memory
leave every slot free. Skipped without a GPU (the ``cuda`` marker)."""

from __future__ import annotations

import asyncio
import gc

import pytest
import torch

from async_llm import GenerationError, HuggingFaceLLM
from tests.conftest import PROMPTS, build_model, reference_ids
from tests.test_fast_decode import FAST

pytestmark = pytest.mark.cuda


@pytest.fixture
def cuda_model(tiny_tokenizer):
    """A fresh tiny Llama on the GPU (the session's tiny model stays on the CPU for other tests)."""
    return build_model(len(tiny_tokenizer)).cuda()


def _llm(model, tokenizer, **kwargs) -> HuggingFaceLLM:
    options = {"max_batch_size": 16, "max_model_len": 256, "max_tokens": 24, "prefix_cache": False, **kwargs}
    return HuggingFaceLLM(model=model, tokenizer=tokenizer, device="cuda", **options)


async def _greedy(llm: HuggingFaceLLM, n: int = 16) -> list[list[int]]:
    results = await asyncio.gather(
        *(llm.acomplete(p, chat_template=False, max_tokens=n, ignore_eos=True) for p in PROMPTS)
    )
    return [r.token_ids for r in results]


def _free(llm: HuggingFaceLLM) -> bool:
    gc.collect()
    return not llm.engine.batch.holds_rows()


@pytest.mark.parametrize("name", sorted(FAST))
async def test_graphs_give_the_eager_steps_and_generates_tokens_in_float32(name, tiny_tokenizer):
    model = FAST[name]().cuda()
    async with _llm(model, tiny_tokenizer) as graphed:
        assert graphed.engine.runner.name == "static"  # the default on CUDA
        graphs = graphed.engine.runner.graphs  # type: ignore[attr-defined]
        assert graphs is not None and graphs.graphs and graphs.capture_seconds > 0
        with_graphs = await _greedy(graphed)
        assert _free(graphed)
    async with _llm(model, tiny_tokenizer, cuda_graphs=False) as eager:
        assert eager.engine.runner.graphs is None  # type: ignore[attr-defined]
        assert await _greedy(eager) == with_graphs
    for prompt, ids in zip(PROMPTS, with_graphs):
        expected = reference_ids(model, tiny_tokenizer(prompt).input_ids, 16)
        assert ids[: len(expected)] == expected


async def test_bfloat16_keeps_the_static_runner_and_agrees_with_generate(tiny_tokenizer):
    """In bfloat16 the fused products round differently from transformers' separate ones, so a
    greedy continuation may part from ``generate``'s at a near-tie; the start-up check accepts the
    runner (it compares with a tolerance scaled to the dtype), and the first tokens agree."""
    model = FAST["llama"]().to("cuda", torch.bfloat16)
    async with _llm(model, tiny_tokenizer) as llm:
        assert llm.engine.runner.name == "static"
        got = await _greedy(llm, 8)
    agree = []
    for prompt, ids in zip(PROMPTS, got):
        expected = reference_ids(model, tiny_tokenizer(prompt).input_ids, 8)
        same = next((i for i, (a, b) in enumerate(zip(ids, expected)) if a != b), len(expected))
        agree.append(same)
    assert min(agree) >= 4, f"tokens agreeing with generate per prompt: {agree}"


async def test_seeded_sampling_repeats_whatever_the_batch(cuda_model, tiny_tokenizer):
    async with _llm(cuda_model, tiny_tokenizer) as llm:
        alone = await llm.acomplete("Hello", max_tokens=16, temperature=1.0, seed=5, ignore_eos=True)
        crowd = await asyncio.gather(
            llm.acomplete("Hello", max_tokens=16, temperature=1.0, seed=5, ignore_eos=True),
            *(llm.acomplete(p, max_tokens=20, temperature=0.7, ignore_eos=True) for p in PROMPTS),
        )
        assert crowd[0].token_ids == alone.token_ids
        assert _free(llm)


async def test_a_decode_step_reads_nothing_back_from_the_device(cuda_model, tiny_tokenizer):
    """The runner's decode step (graph replay and the logits' gather) makes no host sync; the one
    sync of a step is the update's copy of the sampled ids."""
    async with _llm(cuda_model, tiny_tokenizer) as llm:
        runner = llm.engine.runner
        run = runner.run
        synced: list[str] = []

        def watched(forward, batch):
            if forward.items:
                return run(forward, batch)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return run(forward, batch)
            except RuntimeError as exc:
                synced.append(str(exc))
                raise
            finally:
                torch.cuda.set_sync_debug_mode("default")

        runner.run = watched  # type: ignore[method-assign]
        await _greedy(llm)
        assert not synced


async def test_cancellation_and_a_faulty_step_free_their_slots(cuda_model, tiny_tokenizer):
    async with _llm(cuda_model, tiny_tokenizer) as llm:
        stream = llm.astream("Hello", max_tokens=200, ignore_eos=True)
        async for _ in stream:
            break
        await stream.aclose()
        decoder = llm.engine.runner.decoder  # type: ignore[attr-defined]
        graphs = llm.engine.runner.graphs  # type: ignore[attr-defined]
        replay = graphs.run

        def broken(rows):
            raise RuntimeError("injected fault")

        graphs.run = broken
        with pytest.raises(GenerationError, match="injected fault"):
            await llm.arun("Hello", max_tokens=8, ignore_eos=True)
        graphs.run = replay
        assert _free(llm)
        assert decoder is llm.engine.runner.decoder  # type: ignore[attr-defined]
        assert await llm.arun("Hello", max_tokens=5)


async def test_a_capture_out_of_memory_runs_that_size_eagerly(cuda_model, tiny_tokenizer, monkeypatch):
    real = torch.cuda.graph
    calls = 0

    def failing(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 1:  # the largest size, captured first
            raise torch.OutOfMemoryError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "graph", failing)
    model = cuda_model
    async with _llm(model, tiny_tokenizer) as llm:
        graphs = llm.engine.runner.graphs  # type: ignore[attr-defined]
        assert len(graphs.eager) == 1 and graphs.graphs
        got = await _greedy(llm)
    for prompt, ids in zip(PROMPTS, got):
        expected = reference_ids(model, tiny_tokenizer(prompt).input_ids, 16)
        assert ids[: len(expected)] == expected


def test_the_static_store_is_sized_from_the_card(cuda_model):
    from async_llm.engine.config import EngineConfig
    from async_llm.engine.core import Engine

    engine = Engine(cuda_model, 0, EngineConfig(max_model_len=256, gpu_memory_utilization=0.5))
    free, total = torch.cuda.mem_get_info()
    assert engine.slots is not None and engine.slots.bytes <= total * 0.5
    assert engine.scheduler.max_batch_size == engine.slots.rows == 256  # a tiny model: the most rows


async def test_overlap_is_on_by_default_and_changes_no_output(cuda_model, tiny_tokenizer):
    calls = [dict(max_tokens=20, ignore_eos=True), dict(max_tokens=12, temperature=0.9, seed=4, ignore_eos=True)]

    async def run(llm: HuggingFaceLLM) -> list[list[int]]:
        results = await asyncio.gather(*(llm.acomplete(p, chat_template=False, **c) for p in PROMPTS for c in calls))
        return [r.token_ids for r in results]

    async with _llm(cuda_model, tiny_tokenizer) as llm:
        assert llm.engine.overlap
        overlapped = await run(llm)
        assert _free(llm)
    async with _llm(cuda_model, tiny_tokenizer, overlap=False) as llm:
        assert await run(llm) == overlapped


async def test_ngram_speculation_on_the_static_runner_changes_no_greedy_token(cuda_model, tiny_tokenizer):
    """Verify steps over the slots (eager, beside the captured one-token steps): the same greedy
    tokens, drafts counted, every slot free after."""
    async with _llm(cuda_model, tiny_tokenizer) as llm:
        plain = await _greedy(llm, 120)
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "disable_by_batch_size": 16}
    async with _llm(cuda_model, tiny_tokenizer, speculative_config=spec) as llm:
        assert llm.engine.runner.name == "static"
        assert await _greedy(llm, 120) == plain
        assert llm.stats()["spec_decode_num_draft_tokens"] > 0
        assert _free(llm)
