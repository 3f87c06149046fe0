"""The fast decode step: same greedy tokens as the transformers step and ``generate`` on every
Llama-family architecture it takes, the transformers step (with one log line saying why) on the
others, and the engine's fault handling on it."""

from __future__ import annotations

import asyncio
import json
import logging

import anyio
import pytest
import torch
import transformers

from async_llm import GenerationError, HuggingFaceLLM
from async_llm.engine.model_api import cache_kwarg
from async_llm.engine.runners import fast_check, fast_forward
from tests.conftest import PROMPTS, admitted_together, reference_ids

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.3,
    eos_token_id=2,
    pad_token_id=0,
    bos_token_id=1,
)


def _model(config_class: type, seed: int = 0, **overrides: object) -> torch.nn.Module:
    config = config_class(vocab_size=400, **{**SMALL, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return model


FAST = {
    "llama": lambda: _model(transformers.LlamaConfig, attention_bias=True),
    "mistral": lambda: _model(transformers.MistralConfig, sliding_window=None),
    "qwen2": lambda: _model(transformers.Qwen2Config, use_sliding_window=False),
    "qwen3": lambda: _model(transformers.Qwen3Config, head_dim=16, use_sliding_window=False),
}
PLAIN = {
    "gpt2": lambda: _model_gpt2(),
    "mistral with a sliding window": lambda: _model(transformers.MistralConfig, sliding_window=8),
}


def _model_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=400, n_embd=64, n_layer=2, n_head=4, n_positions=512, eos_token_id=2, bos_token_id=1
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


async def _greedy(model, tokenizer, fast_path: bool) -> tuple[list[list[int]], HuggingFaceLLM]:
    llm = HuggingFaceLLM(model=model, tokenizer=tokenizer, device="cpu", fast_path=fast_path, pad_token_id=0)
    async with llm:
        results = await asyncio.gather(
            *(llm.acomplete(p, chat_template=False, max_tokens=16, ignore_eos=True) for p in PROMPTS)
        )
    return [r.token_ids for r in results], llm


@pytest.mark.parametrize("name", sorted(FAST))
async def test_fast_step_gives_the_plain_steps_and_generates_greedy_tokens(name, tiny_tokenizer):
    model = FAST[name]()
    fast, fast_llm = await _greedy(model, tiny_tokenizer, fast_path=True)
    assert fast_llm.engine.runner.name == "fast", f"{name} should take the fast step"
    plain, plain_llm = await _greedy(model, tiny_tokenizer, fast_path=False)
    assert plain_llm.engine.runner.name != "fast"
    assert fast == plain
    for prompt, ids in zip(PROMPTS, fast):
        expected = reference_ids(model, tiny_tokenizer(prompt).input_ids, 16)  # generate stops at eos
        assert ids[: len(expected)] == expected


@pytest.mark.parametrize("name", sorted(FAST))
def test_logits_agree_within_float32_reassociation(name):
    """The start-up check's measure: fast against plain next-token logits, relative to the largest,
    after the prompts and over greedy decode steps."""
    model = FAST[name]()
    decoder = fast_forward.FastDecoder(model)
    with torch.inference_mode():
        cache_name = cache_kwarg(model)  # "cache" in recent transformers, "past_key_values" before
        assert fast_check._difference(decoder, model, 0, cache_name) is None
        compared = list(fast_check.compared_logits(decoder, model, 0, cache_name, steps=fast_check.GREEDY_STEPS))
    assert [where for where, _, _ in compared] == ["after the prompts", *(f"decode step {i}" for i in range(1, 5))]
    for _, reference, candidate in compared:
        assert reference.shape == candidate.shape == (2, 400)  # the greedy tokens never parted
        assert (reference - candidate).abs().max() < 1e-5 * reference.abs().max()


@pytest.mark.parametrize("name", sorted(PLAIN))
async def test_other_models_decode_with_transformers_and_say_why(name, tiny_tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="async_llm")
    model = PLAIN[name]()
    ids, llm = await _greedy(model, tiny_tokenizer, fast_path=True)
    assert llm.engine.runner.name != "fast"
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name.startswith("async_llm")]
    off = [e for e in events if e["event"].startswith("fast runner off")]
    assert len(off) == 1 and off[0]["reason"]
    for prompt, got in zip(PROMPTS, ids):
        assert got == reference_ids(model, tiny_tokenizer(prompt).input_ids, 16)[: len(got)]


async def test_fast_path_false_is_said_once(tiny_model, tiny_tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="async_llm")
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, fast_path=False):
        pass
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name.startswith("async_llm")]
    assert [e["reason"] for e in events if e["event"].startswith("fast runner off")] == ["fast_path=False"]


async def test_a_failing_fast_step_fails_its_rows_and_the_engine_keeps_serving(llm, monkeypatch):
    """The fast forward fails in a decode step (its prefill went through): the rows fail."""
    decoder = llm.engine.runner.decoder  # type: ignore[attr-defined]
    step = decoder.step

    def broken(rows, chunks):
        if rows is not None:
            raise RuntimeError("injected fault")
        return step(rows, chunks)

    monkeypatch.setattr(decoder, "step", broken)
    with pytest.raises(GenerationError, match="injected fault"):
        await llm.arun("Hello", max_tokens=8, ignore_eos=True)
    monkeypatch.setattr(decoder, "step", step)
    stats = llm.stats()
    assert stats["num_failed"] == 1 and stats["num_running"] == 0
    assert await llm.arun("Hello", max_tokens=5)


async def test_out_of_memory_in_the_fast_step_splits_the_batch_and_all_finish_exactly(llm, tiny_model, monkeypatch):
    decoder = llm.engine.runner.decoder  # type: ignore[attr-defined]
    step = decoder.step
    ooms = {"n": 0}

    def small_device(rows, chunks):
        if rows is not None and rows.input_ids.shape[0] > 2:
            ooms["n"] += 1
            raise torch.OutOfMemoryError("injected: KV cache does not fit")
        return step(rows, chunks)

    monkeypatch.setattr(decoder, "step", small_device)
    await _all_finish_exactly(llm, tiny_model, ooms, max_tokens=20)


async def _all_finish_exactly(llm, model, ooms: dict[str, int], max_tokens: int) -> None:
    """Every prompt of PROMPTS, admitted together, ends with generate's tokens although the injected
    out of memory struck (``ooms``) and split the batch (rows preempted)."""
    with anyio.fail_after(60):
        calls = [
            lambda p=p: llm.acomplete(p, chat_template=False, max_tokens=max_tokens, ignore_eos=True) for p in PROMPTS
        ]
        results = await admitted_together(llm, calls)  # one batch, whatever the machine's load
    assert ooms["n"] > 0 and llm.engine.scheduler.num_preempted > 0
    for result in results:
        expected = reference_ids(model, result.prompt_token_ids, max_tokens)
        assert result.token_ids[: len(expected)] == expected
    assert llm.stats()["num_failed"] == 0


async def test_the_fast_step_follows_the_model_to_its_device(llm):
    """set_device rebuilds the fast step over the moved weights (here the same device)."""
    before = llm.engine.runner
    expected = await llm.arun("Hello", max_tokens=8)
    await llm.aset_device("cpu")
    assert llm.engine.runner.name == "fast" and llm.engine.runner is not before
    assert await llm.arun("Hello", max_tokens=8) == expected


@pytest.mark.parametrize("name", sorted(FAST))
def test_fast_prefill_gives_the_transformers_prefill(name):
    """Prompts of different lengths packed into one fast prefill, one of them after a prefix its
    buffer already holds: each prompt's last logits and its keys and values equal a transformers
    forward of that prompt alone."""
    model = FAST[name]()
    decoder = fast_forward.FastDecoder(model)
    prompts = [tuple(range(3, 4)), tuple(range(5, 12)), tuple(range(20, 50))]
    buffers = [decoder.new_kv(len(p)) for p in prompts]
    with torch.inference_mode():
        first = decoder.prefill([fast_forward.Chunk(prompts[2][:13], buffers[2], logits=False)])
        assert first.shape[0] == 0  # no logits wanted
        logits = decoder.prefill(
            [
                fast_forward.Chunk(prompts[0], buffers[0]),
                fast_forward.Chunk(prompts[1], buffers[1]),
                fast_forward.Chunk(prompts[2][13:], buffers[2], start=13),
            ]
        )
        for i, prompt in enumerate(prompts):
            cache = transformers.DynamicCache()
            out = model(input_ids=torch.tensor([prompt]), use_cache=True, **{cache_kwarg(model): cache})
            expected = out.logits[0, -1]
            assert (logits[i] - expected).abs().max() <= 1e-5 * expected.abs().max()
            for j, layer in enumerate(cache.layers):
                assert torch.allclose(buffers[i][j, 0], layer.keys[0], atol=1e-5)
                assert torch.allclose(buffers[i][j, 1], layer.values[0], atol=1e-5)


async def test_a_fast_prefill_that_disagrees_keeps_the_transformers_steps(
    tiny_model, tiny_tokenizer, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="async_llm")
    prefill = fast_forward.FastDecoder.prefill

    def off_by_one(self, chunks):
        return prefill(self, chunks) + 1.0

    monkeypatch.setattr(fast_forward.FastDecoder, "prefill", off_by_one)
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, fast_path=True) as llm:
        assert llm.engine.runner.name != "fast"
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name.startswith("async_llm")]
    assert any("differ" in e.get("reason", "") for e in events if e["event"].startswith("fast runner off"))


async def test_out_of_memory_in_the_fast_prefill_splits_the_group_and_all_finish_exactly(llm, tiny_model, monkeypatch):
    decoder = llm.engine.runner.decoder  # type: ignore[attr-defined]
    step = decoder.step
    ooms = {"n": 0}

    def small_device(rows, chunks):
        if len(chunks) > 2:
            ooms["n"] += 1
            raise torch.OutOfMemoryError("injected: the packed prompts do not fit")
        return step(rows, chunks)

    monkeypatch.setattr(decoder, "step", small_device)
    await _all_finish_exactly(llm, tiny_model, ooms, max_tokens=12)


# Prompt chunks of one step: fresh prompts of similar lengths (grouped), a fresh prompt alone in its
# width, and one after a prefix (each attended on its own).
GROUPED_CHUNKS = [(0, 1), (0, 3), (0, 12), (0, 16), (0, 17), (0, 30), (5, 4), (0, 70)]


@pytest.mark.parametrize("shared", [False, True], ids=["buffers", "slots of one store"])
@pytest.mark.parametrize("rows", [0, 3])
def test_fresh_prompts_attended_as_groups_give_each_prompts_own_results(shared, rows, monkeypatch):
    """The Python layers (CUDA's) attend a step's fresh prompts of similar length as one padded
    causal call per layer: the same logits, and the same keys and values written into each prompt's
    columns (its own buffer, or its slot of a shared store in one write), as attending each prompt
    alone; nothing else in the buffers changes."""
    decoder = fast_forward.FastDecoder(FAST["llama"]())
    decoder.native = False
    generator = torch.Generator().manual_seed(rows)
    layers, d, hkv = len(decoder.layers), decoder.head_dim, decoder.kv_heads
    width, live, end = 80, 6, 9
    kv_rows = torch.randn(layers, 2, max(rows, 1), hkv, end + 2, d, generator=generator)
    mask = torch.ones(rows, live + 1, dtype=torch.long)
    row_ids = torch.randint(3, 300, (rows, 1), generator=generator)
    positions = mask.sum(1, keepdim=True) - 1
    store = torch.randn(layers, 2, len(GROUPED_CHUNKS) + 1, hkv, width, d, generator=generator)
    tokens = [torch.randint(3, 300, (n,), generator=generator).tolist() for _, n in GROUPED_CHUNKS]

    def step(grouped: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with monkeypatch.context() as patch:
            if not grouped:
                patch.setattr(fast_forward, "_prompt_groups", lambda *args: ([], set()))
            kv, batch = store.clone(), kv_rows.clone()
            chunks = [
                fast_forward.Chunk(
                    chunk,
                    kv[:, :, slot + 1, :, : start + len(chunk)],
                    start,
                    store=kv if shared else None,
                    slot=slot + 1,
                )
                for slot, ((start, _), chunk) in enumerate(zip(GROUPED_CHUNKS, tokens, strict=True))
            ]
            step_rows = fast_forward.Rows(row_ids, positions, mask, batch, end) if rows else None
            with torch.inference_mode():
                rows_logits, chunk_logits = decoder.step(step_rows, chunks)
            return torch.cat([rows_logits, chunk_logits]), kv, batch

    groups = []
    prompt_groups = fast_forward._prompt_groups
    monkeypatch.setattr(fast_forward, "_prompt_groups", lambda *a: groups.append(prompt_groups(*a)) or groups[-1])
    grouped_logits, grouped_store, grouped_rows = step(grouped=True)
    made, taken = groups[0]
    assert sorted(len(g.chunks) for g in made) == [2, 4] and taken == {0, 1, 2, 3, 4, 5}  # widths 32 and 16
    assert all((g.slots is not None) == shared for g in made)
    alone_logits, alone_store, alone_rows = step(grouped=False)
    assert torch.equal(grouped_logits.argmax(-1), alone_logits.argmax(-1))
    torch.testing.assert_close(grouped_logits, alone_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped_rows, alone_rows, rtol=1e-5, atol=1e-5)
    written = torch.zeros(store.shape, dtype=torch.bool)
    for slot, (start, n) in enumerate(GROUPED_CHUNKS):
        written[:, :, slot + 1, :, start : start + n] = True
    torch.testing.assert_close(grouped_store[written], alone_store[written], rtol=1e-5, atol=1e-5)
    assert torch.equal(grouped_store[~written], store[~written])  # prefixes read, nothing else written


def test_prompts_over_repeated_keys_and_values_give_the_grouped_results(monkeypatch):
    """Prompts on CUDA attend over keys and values repeated per query head where grouped heads
    would fall to the math kernel (see ``repeat_kv``): fresh prompts attended as a group and chunks
    after a prefix give the same logits and keys/values either way."""
    decoder = fast_forward.FastDecoder(FAST["llama"]())
    decoder.native = False
    assert decoder.heads != decoder.kv_heads  # grouped-query attention: the case that differs
    generator = torch.Generator().manual_seed(5)
    layers, d, hkv = len(decoder.layers), decoder.head_dim, decoder.kv_heads
    shapes = ((7, 3), (40, 20), (0, 9), (0, 12))  # (start, tokens): two after a prefix, two fresh
    buffers = [torch.randn(layers, 2, hkv, start + n, d, generator=generator) for start, n in shapes]
    tokens = [torch.randint(3, 300, (n,), generator=generator).tolist() for _, n in shapes]
    results, asked = [], []
    for repeat in (False, True):

        def rule(x, heads, kv_heads, head_dim, masked, repeat=repeat):
            asked.append(masked)
            return repeat

        monkeypatch.setattr(fast_forward, "repeat_kv", rule)
        kvs = [b.clone() for b in buffers]
        chunks = [fast_forward.Chunk(t, kv, kv.shape[3] - len(t)) for t, kv in zip(tokens, kvs, strict=True)]
        with torch.inference_mode():
            results.append((decoder.step(None, chunks)[1], kvs))
    assert set(asked) == {True, False}  # both the masked chunks and the group asked
    (grouped, grouped_kv), (repeated, repeated_kv) = results
    assert torch.equal(grouped.argmax(-1), repeated.argmax(-1))
    torch.testing.assert_close(repeated, grouped, rtol=1e-5, atol=1e-5)
    for a, b in zip(repeated_kv, grouped_kv, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_keys_and_values_are_repeated_where_cuda_would_run_the_math_kernel():
    from types import SimpleNamespace

    def on(device: str, dtype: torch.dtype) -> SimpleNamespace:
        return SimpleNamespace(device=torch.device(device), dtype=dtype)

    rule = fast_forward.repeat_kv
    assert not rule(on("cuda", torch.bfloat16), 32, 8, 64, masked=False)  # flash takes grouped heads
    assert rule(on("cuda", torch.bfloat16), 32, 8, 64, masked=True)  # ...but no mask
    assert rule(on("cuda", torch.float32), 32, 8, 64, masked=False)  # ...nor float32
    assert rule(on("cuda", torch.float16), 32, 8, 512, masked=False)  # ...nor heads over 256
    assert not rule(on("cuda", torch.float32), 32, 32, 64, masked=True)  # nothing grouped
    assert not rule(on("cpu", torch.float32), 32, 8, 64, masked=True)  # a CPU runs grouped heads
