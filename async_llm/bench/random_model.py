"""Random-weight models for the benchmark: ``--model random:llama-1b`` (Llama-3.2-1B's geometry) or
``random:tiny``, built from a config (nothing is downloaded) with a tokenizer made in code that every
system shares: one token per character of the workloads' text, so prompts keep their own tokens (no
two share a prefix by accident), and the rest of the vocabulary as the words ``w<id>``.

The model is written once as a regular transformers folder (safetensors, config, tokenizer) under
the library's cache (``<cache_root>/random/<name>-<dtype>``), so every system of a run, in its own
process, loads the same weights the way it loads any folder. Weights are seeded: the same name and
dtype give the same model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from async_llm.loading.gguf import cache_root

PREFIX = "random:"

#: Geometries by name. ``llama-1b`` is Llama-3.2-1B's (the GPU targets are stated for it).
GEOMETRIES: dict[str, dict[str, Any]] = {
    "llama-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
}
#: The tokenizer's special tokens (ids 0-3), then one token per printable character, then the words.
SPECIAL = ("<pad>", "</s>", "<s>", "<unk>")
CHARACTERS = "".join(chr(c) for c in range(33, 127))  # printable ASCII but the space


def is_random(model: str | None) -> bool:
    return model is not None and model.startswith(PREFIX)


def tokenizer(vocab_size: int) -> Any:
    """Text split on spaces, then into characters (one id each; others are ``<unk>``); the ids past
    the characters decode as the words ``w<id>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIAL, *CHARACTERS))}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    core = Tokenizer(models.BPE(vocab, merges=[], unk_token="<unk>"))  # no merges: one token per character
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )
    fast.padding_side = "left"
    return fast


def build(name: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """The seeded random-weight model (on the CPU, eval mode) and its tokenizer.

    Raises:
        ValueError: ``name`` is not one of :data:`GEOMETRIES`.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in GEOMETRIES:
        raise ValueError(f"unknown random model {name!r}: one of {sorted(GEOMETRIES)}")
    geometry = GEOMETRIES[name]
    config = LlamaConfig(**geometry, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(config)
    model = model.to(dtype=dtype).eval()
    return model, tokenizer(int(geometry["vocab_size"]))


def folder(spec: str, dtype: str = "bfloat16") -> Path:
    """The folder of the random model ``spec`` (``random:<name>``), written on first use.

    Raises:
        ValueError: ``spec`` names no known geometry.
    """
    name = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    if name not in GEOMETRIES:
        raise ValueError(f"unknown random model {spec!r}: one of {[PREFIX + n for n in sorted(GEOMETRIES)]}")
    target = cache_root() / "random" / f"{name}-{dtype}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    model, tok = build(name, getattr(torch, dtype))
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(work)
        tok.save_pretrained(work)
        try:
            os.replace(work, target)  # whole or not at all: a folder with a config is complete
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
