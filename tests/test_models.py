"""Checkpoints, switching models and devices, quantization and accelerate loading."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from conftest import reference_ids
from transformers import BitsAndBytesConfig

from async_llm import HuggingFaceLLM
from async_llm.llm.checkpoint import CheckpointError
from async_llm.loading.loading import UnsupportedConfigurationError


async def test_checkpoint_round_trip_restores_behaviour(llm, tmp_path):
    llm.set_temperature(0.8)
    llm.set_seed(5)
    llm.set_stop_token(["###"])
    llm.system_prompt = "Be brief."
    await llm.achat("Hello", max_tokens=3)
    expected = await llm.arun("Hello", max_tokens=10)
    path = await llm.asave_checkpoint(tmp_path / "ckpt")
    data = json.loads(path.read_text())
    assert data["format"] == "async_llm.checkpoint" and data["settings"]["sampling"]["seed"] == 5
    assert not list((tmp_path / "ckpt").glob(".checkpoint-*"))  # no temp file left

    llm.set_temperature(0.0)
    llm.set_seed(None)
    llm.system_prompt = None
    llm.clear_history()
    await llm.aload_checkpoint(tmp_path / "ckpt")
    assert llm.temperature == 0.8 and llm.seed == 5 and llm.stop == ("###",) and llm.system_prompt == "Be brief."
    assert len(llm.history) == 2 and llm.metrics()["requests"] == 2
    assert await llm.arun("Hello", max_tokens=10) == expected


async def test_corrupt_or_missing_checkpoint_changes_nothing(llm, tmp_path):
    await llm.asave_checkpoint(tmp_path)
    before = (llm.sampling_defaults, list(llm.history), llm.system_prompt)
    with pytest.raises(FileNotFoundError):
        await llm.aload_checkpoint(tmp_path / "nope")
    file = tmp_path / "checkpoint.json"
    data = json.loads(file.read_text())
    for corrupt in (
        "{not json",
        json.dumps({**data, "version": 99}),
        json.dumps(
            {**data, "settings": {**data["settings"], "sampling": {**data["settings"]["sampling"], "top_p": 7}}}
        ),
        json.dumps({**data, "history": [{"role": "user"}]}),
        json.dumps({**data, "settings": {**data["settings"], "role": "wizard"}}),
    ):
        file.write_text(corrupt)
        with pytest.raises(CheckpointError):
            await llm.aload_checkpoint(tmp_path)
        assert (llm.sampling_defaults, list(llm.history), llm.system_prompt) == before


def test_checkpoint_with_weights_reloads_the_model(tiny_model, tiny_tokenizer, tmp_path):
    with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, max_tokens=6) as llm:
        expected = llm.run("Hello")
        llm.save_checkpoint(tmp_path, save_weights=True)
    assert (tmp_path / "model" / "config.json").is_file()
    from conftest import build_model

    other = build_model(len(tiny_tokenizer), seed=1)
    with HuggingFaceLLM(model=other, tokenizer=tiny_tokenizer, max_tokens=6) as llm:
        assert llm.run("Hello") != expected
        llm.load_checkpoint(tmp_path)
        assert llm.model_name == str(tmp_path / "model")
        assert llm.run("Hello") == expected


async def test_set_model_name_switches_and_retires_the_old_engine(tiny_model_dir, tiny_tokenizer):
    from conftest import build_model

    other = build_model(len(tiny_tokenizer), seed=2)
    async with HuggingFaceLLM(model=other, tokenizer=tiny_tokenizer, max_tokens=40, chat_template=False) as llm:
        old_engine = llm.engine
        in_flight = asyncio.ensure_future(llm.acomplete("Hello", ignore_eos=True))
        while llm.stats()["num_running"] == 0:
            await asyncio.sleep(0.005)
        await asyncio.to_thread(llm.set_model_name, str(tiny_model_dir))
        finished = await in_flight  # completes on the old model
        assert finished.token_ids == reference_ids(other, finished.prompt_token_ids, 40)
        assert llm.model_name == str(tiny_model_dir) and llm.engine is not old_engine
        result = await llm.acomplete("Hello", max_tokens=8)
        assert result.token_ids == reference_ids(llm.model, result.prompt_token_ids, 8)
        for _ in range(200):
            if old_engine.closed:
                break
            await asyncio.sleep(0.01)
        assert old_engine.closed


async def test_set_device_and_another_model_clear_the_prefix_cache(llm, tiny_model_dir):
    prompt = "The quick brown fox jumps over the lazy dog. " * 6
    await llm.acomplete(prompt, chat_template=False, max_tokens=4)
    assert llm.stats()["prefix_cache_bytes"] > 0
    await llm.aset_device("cpu")
    assert llm.stats()["prefix_cache_bytes"] == 0
    await llm.acomplete(prompt, chat_template=False, max_tokens=4)
    assert llm.stats()["prefix_cache_bytes"] > 0
    await asyncio.to_thread(llm.set_model_name, str(tiny_model_dir))
    assert llm.stats()["prefix_cache_bytes"] == 0


async def test_set_device_waits_for_in_flight_requests(llm, tiny_model):
    in_flight = asyncio.ensure_future(llm.acomplete("Hello", max_tokens=30, ignore_eos=True, chat_template=False))
    while llm.stats()["num_running"] == 0:
        await asyncio.sleep(0.005)
    await llm.aset_device("cpu")
    assert llm.stats()["num_finished"] == 1  # the move waited for the running row to finish
    result = await in_flight
    assert result.token_ids == reference_ids(tiny_model, result.prompt_token_ids, 30)
    assert str(llm.device) == "cpu" and await llm.arun("Hello", max_tokens=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_set_device_to_cuda_without_cuda_says_so(llm):
    with pytest.raises(UnsupportedConfigurationError, match="CUDA is not available"):
        llm.set_device("cuda")


def test_bad_quantization_or_device_fails_before_loading(tmp_path):
    missing = str(tmp_path / "no-such-model")  # would fail on load: the checks must come first
    with pytest.raises(UnsupportedConfigurationError, match="load_in_8bit or load_in_4bit"):
        HuggingFaceLLM(missing, device="cpu", quantization_config={})
    with pytest.raises(TypeError, match="unknown quantization_config keys \\['load_in_9bit'\\]"):
        HuggingFaceLLM(missing, device="cpu", quantization_config={"load_in_9bit": True})
    with pytest.raises(TypeError, match="BitsAndBytesConfig or a dict"):
        HuggingFaceLLM(missing, device="cpu", quantization_config="8bit")
    with pytest.raises(UnsupportedConfigurationError, match="does not run on 'meta'"):
        HuggingFaceLLM(missing, device="meta", quantization_config={"load_in_8bit": True})


@pytest.mark.parametrize(
    "config",
    [
        {"load_in_8bit": True},
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
        {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    ],
    ids=["8bit", "4bit-fp4", "4bit-nf4"],
)
def test_bitsandbytes_quantization_runs_on_cpu(tiny_model_dir, config):
    pytest.importorskip("bitsandbytes")
    with HuggingFaceLLM(tiny_model_dir, device="cpu", quantization_config=config, max_tokens=6) as llm:
        assert getattr(llm.model, "is_quantized", False)
        assert len(llm.run("Hello", ignore_eos=True, chat_template=False)) > 0
        assert llm.stats()["tokens_generated"] == 6


def test_device_map_goes_through_accelerate(tiny_model_dir):
    # On a CPU-only machine accelerate has one device to place on; with GPUs it spreads the layers.
    with HuggingFaceLLM(tiny_model_dir, device_map="auto", max_tokens=4) as llm:
        assert str(llm.device) == "cpu"
        with pytest.raises(UnsupportedConfigurationError, match="cannot be moved"):
            llm.set_device("cpu")
        result = llm._call_sync(llm.acomplete, "Hello", chat_template=False)
        assert result.token_ids == reference_ids(llm.model, result.prompt_token_ids, 4)


def test_model_name_alias(tiny_model_dir):
    with HuggingFaceLLM(model_name=str(tiny_model_dir), max_tokens=2) as llm:
        assert llm.model_id == llm.model_name == str(tiny_model_dir)
    with pytest.raises(TypeError, match="not both"):
        HuggingFaceLLM(str(tiny_model_dir), model_name="other")


def test_torch_dtype_is_an_alias_of_dtype(tiny_model_dir):
    """transformers users type torch_dtype=; it loads the weights in that dtype, as dtype= does."""
    with HuggingFaceLLM(str(tiny_model_dir), device="cpu", torch_dtype=torch.bfloat16, max_tokens=2) as llm:
        assert next(llm.model.parameters()).dtype == torch.bfloat16
        assert isinstance(llm.run("Hello"), str)
    with pytest.raises(TypeError, match="dtype=.* and torch_dtype=.*differ"):
        HuggingFaceLLM(str(tiny_model_dir), dtype=torch.float32, torch_dtype=torch.bfloat16)
