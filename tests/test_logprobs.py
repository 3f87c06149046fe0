"""Logprobs of generated tokens and of prompts, compared with one plain forward of the tiny model.

The library documents its logprobs as the model's raw distribution (log_softmax of the logits,
before temperature, penalties, biases and masks): each test recomputes them with
``torch.log_softmax(tiny_model(prompt + output).logits)`` and checks the reported values, so the
"raw" claim is tested under sampling parameters and controls that change the chosen tokens.
"""

from __future__ import annotations

import asyncio
import functools

import anyio
import pytest
import torch
from conftest import PROMPTS, admitted_together, reference_ids

from async_llm.outputs import Logprob

ATOL = 1e-4


def reference_logprobs(model, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """``[L, V]`` log-probabilities of the token after each position of ``prompt + output``."""
    ids = torch.tensor([prompt_ids + output_ids])
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)


def assert_matches(entry: Logprob, row: torch.Tensor, token_id: int, k: int, tokenizer) -> None:
    """``entry`` is ``token_id`` with its logprob from ``row`` [V], and the ``k`` most likely tokens
    of ``row`` (ids compared through their values, so exact ties can't make it flaky)."""
    assert entry.token_id == token_id
    assert entry.logprob == pytest.approx(row[token_id].item(), abs=ATOL)
    assert entry.token == tokenizer.decode([token_id])
    assert len(entry.top_logprobs) == k
    top = row.topk(k) if k else None
    for j, alt in enumerate(entry.top_logprobs):
        assert top is not None
        assert alt.logprob == pytest.approx(top.values[j].item(), abs=ATOL)  # the j-th largest value...
        assert alt.logprob == pytest.approx(row[alt.token_id].item(), abs=ATOL)  # ...carried by its own id
        assert alt.token == tokenizer.decode([alt.token_id])
    assert len({alt.token_id for alt in entry.top_logprobs}) == k


def assert_raw(completion, model, tokenizer, k: int) -> None:
    """Every generated token's logprob entry equals the reference forward's."""
    prompt, output = completion.prompt_token_ids, completion.token_ids
    ref = reference_logprobs(model, prompt, output)
    assert completion.logprobs is not None and len(completion.logprobs) == len(output)
    for j, (entry, token) in enumerate(zip(completion.logprobs, output, strict=True)):
        assert_matches(entry, ref[len(prompt) + j - 1], token, k, tokenizer)


async def complete(llm, prompt: str, **kw):
    with anyio.fail_after(30):
        return await llm.acomplete(prompt, **kw)


# -- generated tokens ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS[:3] + PROMPTS[4:])
async def test_logprobs_equal_the_models_log_softmax(llm, tiny_model, tiny_tokenizer, prompt):
    done = await complete(llm, prompt, max_tokens=12, ignore_eos=True, logprobs=True, top_logprobs=5)
    assert done.token_ids == reference_ids(tiny_model, done.prompt_token_ids, 12)  # logprobs change no token
    assert_raw(done, tiny_model, tiny_tokenizer, 5)
    # Greedy: the chosen token is the most likely one.
    assert all(e.top_logprobs[0].token_id == e.token_id for e in done.logprobs)


async def test_logprobs_without_alternatives_and_with_twenty(llm, tiny_model, tiny_tokenizer):
    bare = await complete(llm, "Hello", max_tokens=6, ignore_eos=True, logprobs=True)
    assert_raw(bare, tiny_model, tiny_tokenizer, 0)
    wide = await complete(llm, "Hello", max_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=20)
    assert_raw(wide, tiny_model, tiny_tokenizer, 20)
    assert [e.logprob for e in bare.logprobs] == [e.logprob for e in wide.logprobs]


@pytest.mark.parametrize(
    "controls",
    [
        {"temperature": 0.7, "seed": 1},
        {"temperature": 1.5, "top_k": 20, "seed": 2},
        {"repetition_penalty": 1.5},
        {"frequency_penalty": 1.5, "presence_penalty": 1.0},
        {"logit_bias": {67: 100}},
        {"logit_bias": {67: 6.0, 18: -3.0}},
        {"allowed_token_ids": [18, 67, 264]},
        {"bad_words": ["ca"], "min_tokens": 4},
    ],
    ids=repr,
)
async def test_logprobs_are_raw_whatever_changes_the_choice(llm, tiny_model, tiny_tokenizer, controls):
    done = await complete(
        llm, "def hello(name):", max_tokens=10, ignore_eos=True, logprobs=True, top_logprobs=3, **controls
    )
    assert_raw(done, tiny_model, tiny_tokenizer, 3)


async def test_forced_token_keeps_its_raw_logprob(llm, tiny_model):
    """A +100 bias makes token 67 certain to be chosen, but its reported logprob is the model's own."""
    done = await complete(llm, "Hello", max_tokens=4, logprobs=True, top_logprobs=1, logit_bias={67: 100})
    assert done.token_ids == [67] * 4
    assert all(e.logprob < -1.0 for e in done.logprobs)  # nowhere near log(1) = 0
    assert all(e.top_logprobs[0].token_id != 67 for e in done.logprobs)


async def test_entries_for_stop_token_eos_and_stop_string(llm, tiny_model, tiny_tokenizer):
    on_token = await complete(
        llm, "def hello(name):", chat_template=False, logprobs=True, top_logprobs=2, stop_token_ids=[264]
    )
    assert on_token.token_ids[-1] == 264 and on_token.finish_reason == "stop"
    assert_raw(on_token, tiny_model, tiny_tokenizer, 2)
    on_eos = await complete(llm, "Hello", logprobs=True, min_tokens=2, logit_bias={2: 100})
    assert on_eos.token_ids[-1] == 2 and len(on_eos.token_ids) == 3
    assert_raw(on_eos, tiny_model, tiny_tokenizer, 0)
    on_string = await complete(llm, "def hello(name):", chat_template=False, logprobs=True, stop="kca")
    assert on_string.text == "J bic" and len(on_string.token_ids) == 4
    assert_raw(on_string, tiny_model, tiny_tokenizer, 0)


async def test_requests_without_logprobs_get_none(llm):
    done = await complete(llm, "Hello", max_tokens=4)
    assert done.logprobs is None and done.prompt_logprobs is None
    async with await llm.submit("Hello", max_tokens=4) as stream:
        with anyio.fail_after(30):
            deltas = [d async for d in stream.deltas()]
    assert deltas and all(d.logprobs is None for d in deltas)
    assert stream.logprobs is None and stream.prompt_logprobs is None


async def test_n_sequences_each_carry_logprobs(llm, tiny_model, tiny_tokenizer):
    pair = await complete(llm, "Hello", max_tokens=6, ignore_eos=True, n=2, logprobs=True, top_logprobs=2)
    assert len(pair) == 2
    for done in pair:
        assert_raw(done, tiny_model, tiny_tokenizer, 2)
    assert pair[0].logprobs == pair[1].logprobs  # greedy: the same tokens


# -- streaming -----------------------------------------------------------------------------------------------


async def test_stream_deltas_carry_the_logprobs_of_their_tokens(llm, tiny_model, tiny_tokenizer):
    prompt = PROMPTS[2]
    whole = await complete(llm, prompt, max_tokens=16, ignore_eos=True, logprobs=True, top_logprobs=2)
    async with await llm.submit(prompt, max_tokens=16, ignore_eos=True, logprobs=True, top_logprobs=2) as stream:
        with anyio.fail_after(30):
            deltas = [d async for d in stream.deltas()]
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids == stream.token_ids
    assert all(d.logprobs is not None and len(d.logprobs) == len(d.token_ids) for d in deltas)
    streamed = [e for d in deltas for e in d.logprobs]
    assert [e.token_id for e in streamed] == whole.token_ids
    assert streamed == stream.logprobs
    for a, b in zip(streamed, whole.logprobs, strict=True):  # same values as acomplete's, up to fp noise
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=ATOL)
        assert [t.logprob for t in a.top_logprobs] == pytest.approx([t.logprob for t in b.top_logprobs], abs=ATOL)
    assert "".join(d.text for d in deltas) == whole.text
    assert_raw(whole, tiny_model, tiny_tokenizer, 2)


# -- batching ------------------------------------------------------------------------------------------------


async def _admitted_together(llm, calls: list[dict]) -> list:
    """One request per kwargs dict, admitted by the engine in one step (so they share the batch)."""
    results = await admitted_together(llm, [functools.partial(complete, llm, **kw) for kw in calls])
    assert llm.stats()["peak_batch_size"] == len(calls)
    return results


async def test_logprob_rows_leave_plain_rows_in_the_batch_alone(llm, tiny_model, tiny_tokenizer):
    calls = [
        {"prompt": p, "max_tokens": 12, "ignore_eos": True, **({"logprobs": True, "top_logprobs": 3} if i % 2 else {})}
        for i, p in enumerate(PROMPTS)
    ]
    results = await _admitted_together(llm, calls)
    for i, done in enumerate(results):
        assert done.token_ids == reference_ids(tiny_model, done.prompt_token_ids, 12)
        if i % 2:
            assert_raw(done, tiny_model, tiny_tokenizer, 3)
        else:
            assert done.logprobs is None


async def test_each_row_gets_its_own_number_of_alternatives(llm, tiny_model, tiny_tokenizer):
    ks = [0, 1, 7, 2]
    calls = [
        {"prompt": p, "max_tokens": 8, "ignore_eos": True, "logprobs": True, "top_logprobs": k}
        for p, k in zip(PROMPTS, ks, strict=False)
    ]
    results = await _admitted_together(llm, calls)
    for done, k in zip(results, ks, strict=True):
        assert_raw(done, tiny_model, tiny_tokenizer, k)


# -- prompt logprobs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 3])
async def test_prompt_logprobs_equal_the_models_log_softmax(llm, tiny_model, tiny_tokenizer, k):
    done = await complete(llm, PROMPTS[2], max_tokens=3, prompt_logprobs=k)
    prompt = done.prompt_token_ids
    ref = reference_logprobs(tiny_model, prompt, [])
    assert done.prompt_logprobs is not None and len(done.prompt_logprobs) == len(prompt)
    assert done.prompt_logprobs[0] is None
    for j in range(1, len(prompt)):
        assert_matches(done.prompt_logprobs[j], ref[j - 1], prompt[j], k, tiny_tokenizer)
    assert done.logprobs is None  # prompt logprobs do not ask for the output's


async def test_prompt_logprobs_of_a_one_token_prompt(llm):
    done = await complete(llm, "a", chat_template=False, max_tokens=2, prompt_logprobs=2)
    assert done.prompt_token_ids == [67] and done.prompt_logprobs == [None]


async def test_prompt_logprobs_with_a_prefix_cache_hit_and_output_logprobs(llm, tiny_model, tiny_tokenizer):
    kw = {"max_tokens": 6, "ignore_eos": True, "prompt_logprobs": 2, "logprobs": True, "top_logprobs": 2}
    first = await complete(llm, PROMPTS[2], **kw)
    second = await complete(llm, PROMPTS[2], **kw)  # the prompt is now in the prefix cache
    assert llm.stats()["prefix_cache_hit_tokens"] > 0
    assert second.token_ids == first.token_ids
    ref = reference_logprobs(tiny_model, second.prompt_token_ids, [])
    for j in range(1, len(second.prompt_token_ids)):
        assert_matches(second.prompt_logprobs[j], ref[j - 1], second.prompt_token_ids[j], 2, tiny_tokenizer)
    assert_raw(second, tiny_model, tiny_tokenizer, 2)


async def test_streamed_prompt_logprobs(llm, tiny_model):
    async with await llm.submit(PROMPTS[1], max_tokens=3, prompt_logprobs=1) as stream:
        with anyio.fail_after(30):
            deltas = [d async for d in stream.deltas()]
    assert deltas and all(d.logprobs is None for d in deltas)
    prompt = stream.prompt_token_ids
    ref = reference_logprobs(tiny_model, prompt, [])
    assert stream.prompt_logprobs[0] is None and len(stream.prompt_logprobs) == len(prompt)
    got = torch.tensor([e.logprob for e in stream.prompt_logprobs[1:]])
    assert torch.allclose(got, ref[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1), atol=ATOL)


# -- bytes ---------------------------------------------------------------------------------------------------


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE map back from its printable characters to the bytes they stand for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return {ch: b for b, ch in chars.items()}


_BYTE_OF = _byte_level_alphabet()


def token_bytes(tokenizer, token_id: int) -> list[int]:
    """The raw UTF-8 bytes a byte-level BPE token stands for (part of a character, possibly)."""
    return [_BYTE_OF[ch] for ch in tokenizer.convert_ids_to_tokens(token_id)]


async def test_bytes_of_whole_characters(llm, tiny_tokenizer):
    done = await complete(llm, "The quick brown fox", chat_template=False, max_tokens=2, prompt_logprobs=1)
    for entry in done.prompt_logprobs[1:]:
        assert entry.bytes == list(entry.token.encode()) == token_bytes(tiny_tokenizer, entry.token_id)


async def test_bytes_of_tokens_that_split_a_character(llm, tiny_tokenizer):
    prompt = "日本語 🎉"
    done = await complete(llm, prompt, chat_template=False, max_tokens=2, prompt_logprobs=1)
    entries = done.prompt_logprobs[1:]
    assert [e.bytes for e in entries] == [token_bytes(tiny_tokenizer, e.token_id) for e in entries]
    first = token_bytes(tiny_tokenizer, done.prompt_token_ids[0])
    assert bytes(first + [b for e in entries for b in e.bytes]).decode() == prompt


async def test_an_output_that_cannot_be_delivered_fails_its_request_only(llm, monkeypatch):
    """A request whose output cannot be converted on the event loop (here its logprobs' token
    text raises) fails with GenerationError instead of waiting forever; its row is freed and a
    request beside it completes as usual."""
    import gc

    from async_llm import GenerationError, outputs

    real = outputs.to_logprob

    def broken(entry, token_text):
        raise RuntimeError("no token text")

    monkeypatch.setattr(outputs, "to_logprob", broken)
    failing = llm.acomplete("Hello", logprobs=True, max_tokens=8, ignore_eos=True, chat_template=False)
    plain = llm.acomplete("Hello", max_tokens=8, ignore_eos=True, chat_template=False)
    with anyio.fail_after(60):
        failed, done = await asyncio.gather(failing, plain, return_exceptions=True)
    assert isinstance(failed, GenerationError) and isinstance(failed.__cause__, RuntimeError)
    assert len(done.token_ids) == 8
    monkeypatch.setattr(outputs, "to_logprob", real)
    with anyio.fail_after(60):
        while llm.stats()["num_running"]:
            await asyncio.sleep(0.01)
    gc.collect()
    assert not llm.engine.batch.holds_rows()
