"""Embeddings from the served causal LM: ``aembed`` against a plain transformers forward with the
same pooling, padding that changes nothing, ``dimensions``, the pooling a model folder declares,
bad input naming its index, and ``/v1/embeddings`` through the official client (float and base64)."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import anyio
import openai
import pytest
import torch
import torch.nn.functional as F

from async_llm import InvalidParameterError, ParameterTypeError
from async_llm.llm.embeddings import folder_pooling

MODEL = "tiny"
TEXTS = ["The quick brown fox", "jumps over the lazy dog and keeps running far away", "Hi"]


def reference(model, tokenizer, text: str, pooling: str) -> torch.Tensor:
    """One input alone through the model's body, pooled and normalised: what an embedder computes."""
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0].float()
    pooled = hidden[-1] if pooling == "last" else hidden.mean(dim=0)
    return F.normalize(pooled, dim=-1)


@pytest.mark.parametrize("pooling", ["last", "mean"])
async def test_embeddings_equal_a_plain_forward_with_the_same_pooling(llm, tiny_model, tiny_tokenizer, pooling):
    with anyio.fail_after(30):
        vectors = await llm.aembed(TEXTS, pooling=pooling)  # one padded batch of three lengths
    assert len(vectors) == 3 and all(len(v) == tiny_model.config.hidden_size for v in vectors)
    for text, vector in zip(TEXTS, vectors, strict=True):
        expected = reference(tiny_model, tiny_tokenizer, text, pooling)
        torch.testing.assert_close(torch.tensor(vector), expected, rtol=1e-5, atol=1e-5)
        assert math.isclose(sum(x * x for x in vector), 1.0, rel_tol=1e-5)
    # The default pooling of a folder that declares none is the last token's.
    alone = torch.tensor(await llm.aembed(TEXTS[0]))
    if pooling == "last":
        torch.testing.assert_close(alone[0], torch.tensor(vectors[0]), rtol=1e-5, atol=1e-5)


async def test_dimensions_keep_the_first_values_and_token_ids_are_taken(llm, tiny_model, tiny_tokenizer):
    full = (await llm.aembed(TEXTS[1], normalize=False))[0]
    cut = (await llm.aembed(TEXTS[1], dimensions=8))[0]
    expected = F.normalize(torch.tensor(full[:8]), dim=-1)
    torch.testing.assert_close(torch.tensor(cut), expected, rtol=1e-5, atol=1e-6)
    ids = tiny_tokenizer(TEXTS[1]).input_ids
    assert await llm.aembed(ids) == await llm.aembed([TEXTS[1]])  # one input as token ids
    assert await llm.aembed([ids, ids]) == (await llm.aembed([TEXTS[1]])) * 2  # same lengths: no padding
    assert llm.embed(TEXTS[1]) == await llm.aembed(TEXTS[1])  # the sync form, inside a running loop


@pytest.mark.parametrize(
    ("inputs", "options", "error", "param"),
    [
        (["fine", ""], {}, InvalidParameterError, "input[1]"),
        (["fine", "word " * 2000], {}, InvalidParameterError, "input[1]"),
        ([[1, 2], [10**9]], {}, InvalidParameterError, "input[1]"),
        ([], {}, InvalidParameterError, "input"),
        ([1.5], {}, ParameterTypeError, "input[0]"),
        ("x", {"dimensions": 0}, InvalidParameterError, "dimensions"),
        ("x", {"dimensions": 10**6}, InvalidParameterError, "dimensions"),
        ("x", {"pooling": "max"}, InvalidParameterError, "pooling"),
    ],
)
async def test_bad_input_names_what_is_wrong_before_anything_runs(llm, inputs, options, error, param):
    with pytest.raises(error) as raised:
        await llm.aembed(inputs, **options)
    assert raised.value.param == param


def test_a_sentence_transformers_folder_declares_its_pooling(tmp_path: Path):
    assert folder_pooling(str(tmp_path)) is None and folder_pooling(None) is None
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))  # fmt: skip
    (tmp_path / "1_Pooling").mkdir()
    config = tmp_path / "1_Pooling" / "config.json"
    config.write_text(json.dumps({"pooling_mode_mean_tokens": True, "pooling_mode_lasttoken": False}))
    assert folder_pooling(str(tmp_path)) == "mean"
    config.write_text(json.dumps({"pooling_mode_mean_tokens": False, "pooling_mode_lasttoken": True}))
    assert folder_pooling(str(tmp_path)) == "last"


async def test_generation_beside_embeddings_is_unchanged(llm):
    alone = await llm.arun("Hello there", chat_template=False, max_tokens=24, ignore_eos=True)
    together, _ = await asyncio.gather(
        llm.arun("Hello there", chat_template=False, max_tokens=24, ignore_eos=True),
        llm.aembed(TEXTS * 8),
    )
    assert together == alone


async def test_the_official_client_gets_embeddings_as_floats_and_base64(client, llm, tiny_tokenizer):
    with anyio.fail_after(30):
        expected = await llm.aembed(TEXTS)
        as_floats = await client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
        as_base64 = await client.embeddings.create(model=MODEL, input=TEXTS)  # the SDK asks for base64
        cut = await client.embeddings.create(model=MODEL, input=TEXTS[0], dimensions=8)
        with pytest.raises(openai.BadRequestError) as too_long:
            await client.embeddings.create(model=MODEL, input=["ok", "word " * 2000])
        with pytest.raises(openai.NotFoundError):
            await client.embeddings.create(model="other", input="x")
    assert [d.index for d in as_floats.data] == [0, 1, 2]
    for data, vector in zip(as_floats.data, expected, strict=True):
        torch.testing.assert_close(torch.tensor(data.embedding), torch.tensor(vector))
    for data, vector in zip(as_base64.data, expected, strict=True):  # float32 on the wire
        torch.testing.assert_close(torch.tensor(data.embedding), torch.tensor(vector), rtol=1e-6, atol=1e-7)
    assert as_floats.usage.prompt_tokens == sum(len(tiny_tokenizer(t).input_ids) for t in TEXTS)
    assert len(cut.data[0].embedding) == 8
    assert too_long.value.body["param"] == "input[1]" and "input[1]" in too_long.value.message


async def test_calls_made_together_share_forwards_and_keep_their_own_options(llm, monkeypatch):
    import async_llm.llm.embeddings as embeddings

    alone = [
        (await llm.aembed(TEXTS[0], pooling="last"))[0],
        (await llm.aembed(TEXTS[1], pooling="mean"))[0],
        (await llm.aembed(TEXTS[2], dimensions=8))[0],
    ]
    forwards: list[int] = []
    real = embeddings.embed_rows

    def counted(model, rows, *args, **kwargs):
        forwards.append(len(rows))
        return real(model, rows, *args, **kwargs)

    monkeypatch.setattr(embeddings, "embed_rows", counted)
    together = await asyncio.gather(
        llm.aembed(TEXTS[0], pooling="last"), llm.aembed(TEXTS[1], pooling="mean"), llm.aembed(TEXTS[2], dimensions=8)
    )
    assert forwards == [3]  # one forward for the three calls
    for (vector,), expected in zip(together, alone, strict=True):
        torch.testing.assert_close(torch.tensor(vector), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    # A call cancelled while it waits is dropped; the others are answered.
    waiting = [asyncio.ensure_future(llm.aembed(t)) for t in TEXTS]
    waiting[1].cancel()
    done = await asyncio.gather(*waiting, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError) and len(done[0]) == len(done[2]) == 1


@pytest.mark.parametrize("pooling", ["last", "mean"])
async def test_embedding_forwards_keep_no_kv_cache(llm, tiny_model, pooling):
    """The embedding forward runs without a KV cache (a causal model's config asks for one, which
    would hold every layer's keys and values of the batch until the pooling is done)."""
    from transformers.cache_utils import Cache

    caches = []
    handle = tiny_model.model.register_forward_hook(
        lambda module, args, output: caches.append(getattr(output, "past_key_values", None))
    )
    try:
        with anyio.fail_after(60):
            vectors = await llm.aembed(TEXTS, pooling=pooling)
    finally:
        handle.remove()
    assert len(vectors) == len(TEXTS) and caches
    assert not any(isinstance(cache, Cache) for cache in caches)
