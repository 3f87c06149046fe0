"""The static runner's options and its KV budget arithmetic (async_llm.engine.kv_budget): real
numbers of a Llama-3.2-1B geometry, every error typed and naming its parameter; no model loads."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import LlamaConfig

from async_llm import HuggingFaceLLM
from async_llm.engine.config import EngineConfig
from async_llm.engine.kv_budget import (
    MAX_DEFAULT_MODEL_LEN,
    SlotPlan,
    check_cuda_graphs,
    default_max_model_len,
    format_bytes,
    kv_budget_bytes,
    kv_bytes_per_token,
    plan_slots,
)
from async_llm.errors import InvalidParameterError, ParameterTypeError

GiB, MiB = 1 << 30, 1 << 20
CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a torch.device("cuda") needs no GPU to exist


def llama_1b(**overrides: Any) -> LlamaConfig:
    """Llama-3.2-1B's geometry: 16 layers, 32 heads of 64, 8 KV heads, a 128k context."""
    fields: dict[str, Any] = {
        "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "max_position_embeddings": 131072, "vocab_size": 128, "intermediate_size": 64,
    }  # fmt: skip
    return LlamaConfig(**{**fields, **overrides})


# ---------------------------------------------------------------------------------------------
# Bytes per token and the longest row.


def test_kv_bytes_per_token_of_a_llama_1b() -> None:
    # 16 layers x (keys, values) x 8 KV heads x 64 x 2 bytes
    assert kv_bytes_per_token(llama_1b(), torch.bfloat16) == 16 * 2 * 8 * 64 * 2 == 32768
    assert kv_bytes_per_token(llama_1b(), torch.float32) == 65536


def test_kv_bytes_per_token_falls_back_on_hidden_size_and_attention_heads() -> None:
    # No head_dim: hidden_size // heads; no num_key_value_heads: every head has its own keys (MHA).
    config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=64)
    assert kv_bytes_per_token(config, torch.float32) == 2 * 2 * 4 * 16 * 4
    config.head_dim, config.num_key_value_heads = None, None  # present but unset, as some configs leave them
    assert kv_bytes_per_token(config, torch.float32) == 2 * 2 * 4 * 16 * 4


def test_kv_bytes_per_token_reads_the_text_config_of_a_multimodal_one() -> None:
    outer = SimpleNamespace(get_text_config=llama_1b)  # the vision tower's fields are not the LM's
    assert kv_bytes_per_token(outer, torch.bfloat16) == 32768
    assert default_max_model_len(outer, None) == MAX_DEFAULT_MODEL_LEN


def test_default_max_model_len() -> None:
    assert default_max_model_len(llama_1b(), None) == 8192  # 128k capped: a slot costs every column
    assert default_max_model_len(llama_1b(max_position_embeddings=2048), None) == 2048
    assert default_max_model_len(llama_1b(), 131072) == 131072  # an explicit value wins, up to the context
    assert default_max_model_len(llama_1b(), 100) == 100
    assert default_max_model_len(SimpleNamespace(), None) == 8192  # no context in the config: the cap


def test_max_model_len_past_the_models_context_raises() -> None:
    with pytest.raises(InvalidParameterError, match="max_position_embeddings=2048") as info:
        default_max_model_len(llama_1b(max_position_embeddings=2048), 4096)
    assert info.value.param == "max_model_len"


# ---------------------------------------------------------------------------------------------
# The budget.


def test_budget_is_the_share_of_the_device_left_after_what_is_used() -> None:
    total, used = 80 * GiB, 10 * GiB  # an H100 with 10 GiB of weights
    assert kv_budget_bytes(CUDA, None, None, total_bytes=total, used_bytes=used) == int(0.9 * total) - used
    assert kv_budget_bytes(CUDA, 0.5, None, total_bytes=total, used_bytes=used) == 30 * GiB
    assert kv_budget_bytes(CUDA, 1, None, total_bytes=total, used_bytes=used, activation_bytes=GiB) == 69 * GiB
    # On a CPU the default share is half of the system's memory.
    assert kv_budget_bytes(CPU, None, None, total_bytes=16 * GiB, used_bytes=4 * GiB) == 4 * GiB


def test_an_explicit_kv_cache_bytes_is_the_budget() -> None:
    assert kv_budget_bytes(CUDA, None, 4 * GiB, total_bytes=80 * GiB, used_bytes=79 * GiB) == 4 * GiB
    with pytest.raises(InvalidParameterError, match="81.00 GiB.*80.00 GiB") as info:
        kv_budget_bytes(CUDA, None, 81 * GiB, total_bytes=80 * GiB, used_bytes=0)
    assert info.value.param == "kv_cache_bytes"


def test_budget_with_nothing_left_raises_saying_what_is_used() -> None:
    with pytest.raises(InvalidParameterError) as info:
        kv_budget_bytes(CUDA, 0.5, None, total_bytes=80 * GiB, used_bytes=50 * GiB)
    assert info.value.param == "gpu_memory_utilization"
    message = str(info.value)
    assert "allows 40.00 GiB of the 80.00 GiB" in message and "50.00 GiB is already in use" in message
    assert "would be -10.00 GiB" in message
    with pytest.raises(InvalidParameterError) as info:  # exactly nothing left is no budget either
        kv_budget_bytes(CUDA, 0.5, None, total_bytes=80 * GiB, used_bytes=39 * GiB, activation_bytes=GiB)
    assert info.value.param == "gpu_memory_utilization"


def test_budget_on_this_machines_cpu() -> None:
    # The system's own figures (psutil): all of the memory less what is used is what is available.
    assert kv_budget_bytes(CPU, 1.0, None) > 0
    assert kv_budget_bytes(CPU, None, MiB) == MiB


@pytest.mark.cuda
def test_budget_on_this_machines_cuda_device() -> None:
    free, total = torch.cuda.mem_get_info(CUDA)
    assert abs(kv_budget_bytes(CUDA, 1.0, None) - free) < 64 * MiB  # all of it: what is free (give or take)
    with pytest.raises(InvalidParameterError) as info:
        kv_budget_bytes(CUDA, None, total + 1)
    assert info.value.param == "kv_cache_bytes"
    check_cuda_graphs(True, CUDA)


# ---------------------------------------------------------------------------------------------
# Slots.


def test_slots_of_a_llama_1b() -> None:
    per_token = kv_bytes_per_token(llama_1b(), torch.bfloat16)  # 32 KiB: a row of 8192 tokens is 256 MiB
    assert plan_slots(per_token, 8 * GiB, 8192, None) == SlotPlan(rows=32, columns=8192, bytes=8 * GiB)
    assert plan_slots(per_token, 8 * GiB + MiB, 8192, 16) == SlotPlan(rows=16, columns=8192, bytes=4 * GiB)
    assert plan_slots(per_token, 8 * GiB, 8192, 32) == SlotPlan(rows=32, columns=8192, bytes=8 * GiB)
    # 64 GiB of 2048-token rows (64 MiB each) holds 1024 rows: the default stops at 256.
    assert plan_slots(per_token, 64 * GiB, 2048, None) == SlotPlan(rows=256, columns=2048, bytes=16 * GiB)
    assert plan_slots(per_token, 64 * GiB, 2048, None, default_rows=8).rows == 8
    assert plan_slots(per_token, 64 * GiB, 2048, 1000).rows == 1000  # an explicit size past the default


def test_a_budget_short_of_one_row_raises_naming_max_model_len() -> None:
    with pytest.raises(InvalidParameterError) as info:
        plan_slots(32768, 100 * MiB, 8192, None)
    assert info.value.param == "max_model_len"
    message = str(info.value)
    assert "100.0 MiB holds 3200 tokens" in message and "max_model_len=8192" in message
    assert "lower max_model_len or raise gpu_memory_utilization / kv_cache_bytes" in message


def test_more_rows_than_the_budget_holds_raises_naming_max_batch_size() -> None:
    with pytest.raises(InvalidParameterError, match="holds only 32 rows of 8192 tokens") as info:
        plan_slots(32768, 8 * GiB, 8192, 33)
    assert info.value.param == "max_batch_size"


def test_cuda_graphs_need_a_cuda_device() -> None:
    for value in (None, False):
        check_cuda_graphs(value, CPU)
    check_cuda_graphs(True, CUDA)
    with pytest.raises(InvalidParameterError, match="needs a CUDA device") as info:
        check_cuda_graphs(True, CPU)
    assert info.value.param == "cuda_graphs"


def test_format_bytes() -> None:
    assert [format_bytes(n) for n in (512, 3 * 1024, 24 * MiB, 3 * GiB // 2, -10 * GiB)] == [
        "512 B", "3.0 KiB", "24.0 MiB", "1.50 GiB", "-10.00 GiB",
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# EngineConfig: the new options, checked once.


def test_engine_config_defaults_leave_every_choice_to_the_engine() -> None:
    config = EngineConfig()
    assert config.max_batch_size is None and config.runner is None and config.max_model_len is None
    assert config.gpu_memory_utilization is None and config.kv_cache_bytes is None and config.cuda_graphs is None
    assert config.requested_runner is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.runner = "static"  # type: ignore[misc]


@pytest.mark.parametrize(
    "options",
    [
        {"max_batch_size": 1}, {"max_batch_size": 512}, {"runner": "static"}, {"runner": "fast"},
        {"runner": "transformers"}, {"runner": "transformers", "fast_path": False}, {"max_model_len": 1},
        {"gpu_memory_utilization": 1}, {"gpu_memory_utilization": 0.05}, {"kv_cache_bytes": 1},
        {"cuda_graphs": True}, {"cuda_graphs": False},
    ],
)  # fmt: skip
def test_engine_config_accepts(options: dict[str, Any]) -> None:
    config = EngineConfig(**options)
    assert all(getattr(config, name) == value for name, value in options.items())


@pytest.mark.parametrize(
    ("options", "error", "param"),
    [
        ({"max_batch_size": 0}, InvalidParameterError, "max_batch_size"),
        ({"max_batch_size": "8"}, ParameterTypeError, "max_batch_size"),
        ({"max_batch_size": True}, ParameterTypeError, "max_batch_size"),
        ({"runner": "cuda"}, InvalidParameterError, "runner"),
        ({"runner": "Static"}, InvalidParameterError, "runner"),
        ({"runner": 1}, ParameterTypeError, "runner"),
        ({"runner": "static", "fast_path": False}, InvalidParameterError, "runner"),
        ({"runner": "fast", "fast_path": False}, InvalidParameterError, "runner"),
        ({"max_model_len": 0}, InvalidParameterError, "max_model_len"),
        ({"max_model_len": 4096.0}, ParameterTypeError, "max_model_len"),
        ({"gpu_memory_utilization": 0}, InvalidParameterError, "gpu_memory_utilization"),
        ({"gpu_memory_utilization": -0.5}, InvalidParameterError, "gpu_memory_utilization"),
        ({"gpu_memory_utilization": 1.01}, InvalidParameterError, "gpu_memory_utilization"),
        ({"gpu_memory_utilization": math.nan}, InvalidParameterError, "gpu_memory_utilization"),
        ({"gpu_memory_utilization": "0.9"}, ParameterTypeError, "gpu_memory_utilization"),
        ({"gpu_memory_utilization": True}, ParameterTypeError, "gpu_memory_utilization"),
        ({"kv_cache_bytes": 0}, InvalidParameterError, "kv_cache_bytes"),
        ({"kv_cache_bytes": 1e9}, ParameterTypeError, "kv_cache_bytes"),
        ({"kv_cache_bytes": GiB, "gpu_memory_utilization": 0.9}, InvalidParameterError, "kv_cache_bytes"),
        ({"cuda_graphs": "yes"}, ParameterTypeError, "cuda_graphs"),
        ({"cuda_graphs": 1}, ParameterTypeError, "cuda_graphs"),
    ],
)
def test_engine_config_refuses(options: dict[str, Any], error: type[Exception], param: str) -> None:
    with pytest.raises(error) as info:
        EngineConfig(**options)
    assert type(info.value) is error and info.value.param == param  # type: ignore[attr-defined]
    assert param in str(info.value)


def test_fast_path_false_asks_for_the_transformers_runner() -> None:
    assert EngineConfig(fast_path=False).requested_runner == "transformers"
    assert EngineConfig(runner="static").requested_runner == "static"


# ---------------------------------------------------------------------------------------------
# HuggingFaceLLM: the options are checked before the model loads.


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"cuda_graphs": True}, "cuda_graphs"),
        ({"runner": "bogus"}, "runner"),
        ({"gpu_memory_utilization": 0.5, "kv_cache_bytes": GiB}, "kv_cache_bytes"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"gpu_memory_utilization": 2.0}, "gpu_memory_utilization"),
    ],
)
def test_llm_refuses_engine_options_before_loading(tmp_path: Path, options: dict[str, Any], param: str) -> None:
    missing = str(tmp_path / "no-model-here")  # loading it would raise ModelNotFoundError (param model_id)
    with pytest.raises(InvalidParameterError) as info:
        HuggingFaceLLM(missing, device="cpu", **options)
    assert info.value.param == param
    with pytest.raises(InvalidParameterError) as info:
        HuggingFaceLLM(missing, device="cpu")
    assert info.value.param != param  # the load fails differently: the options were refused first


def test_llm_refuses_cuda_graphs_for_a_model_passed_in_on_the_cpu(tiny_model: Any, tiny_tokenizer: Any) -> None:
    """Without ``device`` a model passed in stays where it is: its device is the one checked."""
    with pytest.raises(InvalidParameterError) as info:
        HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, cuda_graphs=True)
    assert info.value.param == "cuda_graphs"
