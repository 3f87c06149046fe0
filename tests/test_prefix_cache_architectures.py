"""Which architectures keep the prefix cache (and chunked prefill): every one that works today was
tried; greedy tokens are identical with the cache on and off, and only sliding-window models turn it
off (a cached prefix may cross their window)."""

from __future__ import annotations

import pytest
import torch
import transformers

from async_llm import HuggingFaceLLM

BASE = "The quick brown fox jumps over the lazy dog. " * 6  # ~80 tokens: two full blocks and more
FOLLOW_UPS = [
    BASE,  # all of it cached (the last token still runs)
    BASE[: len(BASE) // 2] + "What is the capital of France?",  # about half
    "Continuous batching lets many requests share one forward pass. " * 3,  # nothing in common
]

V = 400
COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=1024,
    eos_token_id=2,
    bos_token_id=1,
    pad_token_id=0,
    vocab_size=V,
)
IDS = dict(vocab_size=V, eos_token_id=2, bos_token_id=1)
T = transformers
CONFIGS = {
    "llama": lambda: T.LlamaConfig(num_key_value_heads=2, **COMMON),
    "mistral": lambda: T.MistralConfig(sliding_window=None, num_key_value_heads=2, **COMMON),
    "mixtral": lambda: T.MixtralConfig(
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=None, **COMMON
    ),
    "qwen2": lambda: T.Qwen2Config(num_key_value_heads=2, use_sliding_window=False, **COMMON),
    "qwen3": lambda: T.Qwen3Config(num_key_value_heads=2, head_dim=16, use_sliding_window=False, **COMMON),
    "gemma": lambda: T.GemmaConfig(num_key_value_heads=2, head_dim=16, **COMMON),
    "phi": lambda: T.PhiConfig(**COMMON),
    "phi3": lambda: T.Phi3Config(num_key_value_heads=2, **COMMON),
    "gpt_neox": lambda: T.GPTNeoXConfig(**COMMON),
    "stablelm": lambda: T.StableLmConfig(num_key_value_heads=2, **COMMON),
    "starcoder2": lambda: T.Starcoder2Config(num_key_value_heads=2, sliding_window=None, **COMMON),
    "olmo": lambda: T.OlmoConfig(num_key_value_heads=2, **COMMON),
    "gpt2": lambda: T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=1024, **IDS),
    "gptj": lambda: T.GPTJConfig(n_embd=64, n_layer=2, n_head=4, n_positions=1024, rotary_dim=8, **IDS),
    "opt": lambda: T.OPTConfig(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=1024,
        word_embed_proj_dim=64,
        pad_token_id=0,
        **IDS,
    ),  # fmt: skip
    "bloom": lambda: T.BloomConfig(hidden_size=64, n_layer=2, n_head=4, pad_token_id=0, **IDS),  # ALiBi
    "falcon": lambda: T.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0, **IDS),
    "gemma2 (sliding window)": lambda: T.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=16, **COMMON),
}
OFF = {"gemma2 (sliding window)"}


async def _run(model: torch.nn.Module, tokenizer, cached: bool) -> tuple[list[list[int]], bool, int]:
    async with HuggingFaceLLM(model=model, tokenizer=tokenizer, prefix_cache=cached, pad_token_id=0) as llm:
        ids = []
        for prompt in [BASE, *FOLLOW_UPS]:
            result = await llm.acomplete(prompt, chat_template=False, max_tokens=10, ignore_eos=True)
            ids.append(result.token_ids)
        return ids, llm.engine.prefix_cache is not None, llm.stats()["prefix_cache_hit_tokens"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
async def test_the_cache_is_exact_where_kept_and_off_only_with_a_sliding_window(name, tiny_tokenizer):
    torch.manual_seed(0)
    config = CONFIGS[name]()
    config.initializer_range = 0.3
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    on, kept, hits = await _run(model, tiny_tokenizer, cached=True)
    off, _, _ = await _run(model, tiny_tokenizer, cached=False)
    assert on == off
    assert kept is (name not in OFF)
    assert (hits >= 64 + 32) is kept  # BASE again, half of it
