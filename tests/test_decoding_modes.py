"""n sequences per prompt, beam search groups, and transformers streamers fed by the engine."""

from __future__ import annotations

import asyncio
import threading

import anyio
import pytest
import torch
from conftest import PROMPTS, reference_ids
from transformers import AsyncTextIteratorStreamer, TextIteratorStreamer, TextStreamer


async def test_n_sequences_share_one_prefill(plain_llm, monkeypatch):
    batch_sizes: list[tuple[int, int]] = []
    forward = plain_llm.model.forward

    def spy(*args, **kwargs):
        batch_sizes.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(plain_llm.model, "forward", spy)
    texts = await plain_llm.arun("Hello", n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    assert isinstance(texts, list) and len(texts) == 3 and len(set(texts)) == 3
    prefill = [s for s in batch_sizes if s[1] > 1]
    assert prefill == [(1, prefill[0][1])]  # one prompt row prefilled for the three sequences
    assert max(s[0] for s in batch_sizes) == 3  # then decoded as three rows
    monkeypatch.setattr(plain_llm.model, "forward", forward)
    # Reproducible: row i is seeded with seed + i.
    assert await plain_llm.arun("Hello", n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True) == texts
    assert texts[1] == await plain_llm.arun("Hello", temperature=1.0, seed=8, max_tokens=12, ignore_eos=True)


async def test_greedy_n_gives_n_copies_and_astream_refuses_n(llm):
    single = await llm.arun("Hello", max_tokens=8)
    assert await llm.arun("Hello", n=2, max_tokens=8) == [single, single]
    with pytest.raises(ValueError, match="n > 1"):
        llm.astream("Hello", n=2)


def _generate_beams(model, prompt_ids, **kwargs):
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kwargs)
    return [row[len(prompt_ids) :].tolist() for row in out]


async def test_beam_search_matches_generate(llm, tiny_model):
    result = await llm.acomplete(
        PROMPTS[1], num_beams=3, max_tokens=10, length_penalty=0.7, early_stopping=True, chat_template=False
    )
    (expected,) = _generate_beams(
        tiny_model,
        result.prompt_token_ids,
        num_beams=3,
        max_new_tokens=10,
        length_penalty=0.7,
        early_stopping=True,
        eos_token_id=tiny_model.config.eos_token_id,
        do_sample=False,
    )
    eos = tiny_model.config.eos_token_id
    if eos in expected:
        expected = expected[: expected.index(eos) + 1]
    assert result.token_ids == expected


async def test_beam_requests_arriving_together_share_one_generate(llm, monkeypatch):
    calls: list[int] = []
    generate = llm.model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    monkeypatch.setattr(llm.model, "generate", spy)
    runner = llm._backend.beams
    block, holding = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        block.wait()

    runner.call_when_idle(hold)  # hold the beam thread so both requests queue up together
    with anyio.fail_after(60):  # submit once it is held (not while it takes its inbox)
        while not holding.is_set():
            await asyncio.sleep(0.01)
    tasks = [
        asyncio.ensure_future(llm.arun(p, beam_width=2, max_tokens=6, ignore_eos=True))
        for p in ("Hello", "The quick brown fox")
    ]
    with anyio.fail_after(60):
        while runner.stats()["num_waiting"] < 2:
            await asyncio.sleep(0.01)
    block.set()
    with anyio.fail_after(60):
        grouped = await asyncio.gather(*tasks)
    assert calls == [2]
    assert all(isinstance(t, str) for t in grouped)


async def test_beam_n_returns_n_best_and_beams_run_beside_the_batch(llm, tiny_model):
    streaming = asyncio.ensure_future(llm.acomplete("Hello", max_tokens=30, ignore_eos=True, chat_template=False))
    results = await llm.acomplete("Hello", num_beams=3, n=2, max_tokens=8, ignore_eos=True, chat_template=False)
    expected = _generate_beams(
        tiny_model,
        results[0].prompt_token_ids,
        num_beams=3,
        num_return_sequences=2,
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=False,
    )
    assert [r.token_ids for r in results] == expected
    plain = await streaming
    assert plain.token_ids == reference_ids(tiny_model, plain.prompt_token_ids, 30)
    stats = llm.stats()
    assert stats["num_finished"] == 3 and stats["num_running"] == 0


async def test_beam_validation(llm):
    with pytest.raises(ValueError, match="n \\(num_return_sequences\\) must be <= num_beams"):
        await llm.arun("Hello", num_beams=2, n=3)
    with pytest.raises(ValueError, match="beam search"):
        await llm.arun("Hello", num_beams=2, frequency_penalty=0.5)


async def test_text_iterator_streamers_with_concurrent_requests(llm, tiny_tokenizer):
    prompts = PROMPTS[:3]
    streamers = [TextIteratorStreamer(tiny_tokenizer, skip_prompt=True, skip_special_tokens=True) for _ in prompts]
    collected = [[] for _ in prompts]

    def drain(i: int) -> None:
        for text in streamers[i]:
            collected[i].append(text)

    readers = [threading.Thread(target=drain, args=(i,)) for i in range(len(prompts))]
    for r in readers:
        r.start()
    results = await asyncio.gather(
        *(llm.acomplete(p, streamer=s, max_tokens=20, ignore_eos=True) for p, s in zip(prompts, streamers))
    )
    for r in readers:
        r.join(10)
    assert llm.stats()["peak_batch_size"] == 3
    for result, parts in zip(results, collected):
        assert "".join(parts) == tiny_tokenizer.decode(result.token_ids, skip_special_tokens=True)


async def test_async_text_iterator_streamers_with_concurrent_requests(llm, tiny_tokenizer):
    prompts = PROMPTS[:3]
    streamers = [AsyncTextIteratorStreamer(tiny_tokenizer, skip_prompt=True, skip_special_tokens=True) for _ in prompts]

    async def read(streamer) -> str:
        return "".join([t async for t in streamer])

    readers = [asyncio.ensure_future(read(s)) for s in streamers]
    texts = await asyncio.gather(
        *(llm.arun(p, streamer=s, max_tokens=20, ignore_eos=True) for p, s in zip(prompts, streamers))
    )
    with anyio.fail_after(10):
        streamed = await asyncio.gather(*readers)
    assert streamed == texts
    assert llm.stats()["peak_batch_size"] == 3


async def test_text_streamer_prints_each_request(llm, capsys):
    prompts = PROMPTS[:2]
    streamers = [TextStreamer(llm.tokenizer, skip_prompt=True) for _ in prompts]
    texts = await asyncio.gather(
        *(llm.arun(p, streamer=s, max_tokens=16, ignore_eos=True) for p, s in zip(prompts, streamers))
    )
    printed = capsys.readouterr().out
    for text in texts:
        for word in text.split():
            assert word in printed
