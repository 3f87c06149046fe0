"""Shared fixtures: a tiny random-weight Llama with a byte-level BPE tokenizer, built locally.

The tiny model makes engine tests fast and deterministic on 2 CPU cores: greedy outputs are compared
with ``model.generate`` on the same weights, so random weights are as good as trained ones. Weights are
drawn with a larger spread than usual so logits are well separated (no near-ties for argmax to flip
on float noise between batched and solo runs).
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from async_llm import HuggingFaceLLM

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Continuous batching lets many requests share one forward pass.",
    "Über café naïve résumé — 日本語のテキスト 🎉 emoji and ünïcödé.",
    "def hello(name): return f'hello {name}'",
] * 20


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.3,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=1,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``cuda`` where there is no CUDA device (they run where there is one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _frozen_heap() -> None:
    """Move what exists at the start of the session (torch's, transformers' and the suite's imports:
    about half a million objects) out of the garbage collector's reach, as long-running servers do
    after start-up. A full collection then scans only what the tests create, instead of pausing the
    thread that triggers it for a quarter of a second; the tests that bound the event loop's pauses
    measure the library, not the size of the suite's heap."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session", autouse=True)
def _native_step() -> None:
    """The native decode step loaded (built first where this machine has none) before any test, so
    no test that bounds its own time pays for the build. Without a compiler the Python layers serve
    throughout."""
    from async_llm.engine.runners import native

    native.load()


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return build_model(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model, tiny_tokenizer) -> Path:
    """A saved folder (model + tokenizer) loadable by ``HuggingFaceLLM(model_id=folder)``."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
async def llm(tiny_model, tiny_tokenizer) -> AsyncIterator[HuggingFaceLLM]:
    """A fresh engine over the shared tiny model (greedy, short outputs by default), decoding with
    the fast step (the default where it applies, as for this Llama)."""
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, device="cpu", max_tokens=24) as instance:
        assert instance.engine.runner.name == "fast"
        yield instance


@pytest.fixture
async def plain_llm(tiny_model, tiny_tokenizer) -> AsyncIterator[HuggingFaceLLM]:
    """As ``llm``, decoding with the transformers forward (``fast_path=False``): for tests that watch
    or break decode steps through ``model.forward``."""
    async with HuggingFaceLLM(
        model=tiny_model, tokenizer=tiny_tokenizer, device="cpu", max_tokens=24, fast_path=False
    ) as instance:
        assert instance.engine.runner.name == "transformers"
        yield instance


def reference_ids(model: LlamaForCausalLM, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of ``prompt_ids`` by plain ``model.generate`` (eos included if reached)."""
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=model.config.eos_token_id,
            pad_token_id=model.config.pad_token_id,
        )
    return out[0, len(prompt_ids) :].tolist()


PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Tell me about it at some length, please, with details.",
    "日本語 🎉",
    "def hello(name):",
]


async def admitted_together(llm: HuggingFaceLLM, calls: Sequence[Callable[[], Awaitable[object]]]) -> list:
    """Run the ``calls`` (coroutine factories, one request each) so that the engine admits them in
    one step: it is held until every request waits in its queue. Returns their results. (The
    bounds only stop a hang: nothing here depends on how fast the machine is.)"""
    gate, holding = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        gate.wait()

    llm.engine.call_when_idle(hold)
    before = llm.stats()["num_waiting"]
    tasks: list[asyncio.Future[object]] = []
    try:
        with anyio.fail_after(60):
            # Submit only once the engine is held: a step that took part of them from its inbox
            # before holding would admit that part alone (a busy machine wakes the engine late).
            while not holding.is_set():
                await asyncio.sleep(0.005)
            tasks = [asyncio.ensure_future(call()) for call in calls]
            while llm.stats()["num_waiting"] < before + len(calls):
                await asyncio.sleep(0.005)
    finally:
        gate.set()
    with anyio.fail_after(120):
        return await asyncio.gather(*tasks)


#: The model name the test server (``url``, ``client``) answers to.
SERVED_MODEL = "tiny"


@pytest.fixture
async def url(llm: HuggingFaceLLM) -> AsyncIterator[str]:
    """The base URL of an OpenAI-compatible server over ``llm`` (uvicorn on a free local port)."""
    from async_llm.serve import create_app
    from async_llm.serve.server import running_server

    async with running_server(create_app(llm, model_name=SERVED_MODEL)) as base:
        yield base


@pytest.fixture
async def client(url: str) -> AsyncIterator[Any]:
    """The official ``openai`` client of that server (imported here: the CUDA tests run where the
    package may not be installed)."""
    import openai

    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def record_prefills(llm: HuggingFaceLLM, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Shapes of the prefill forwards the engine thread runs from now on ([1, T] for packed prompts)."""
    shapes: list[tuple[int, int]] = []
    forward = llm.model.forward

    def recording(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1 and threading.current_thread().name.startswith("async-llm-engine"):
            shapes.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(llm.model, "forward", recording)
    runner = llm.engine.runner
    if runner.name == "fast":  # the fast prefill packs its prompts along one axis: record it as [1, T]
        step = runner.decoder.step

        def recording_fast(rows, chunks):
            if chunks:
                shapes.append((1, sum(len(c.ids) for c in chunks)))
            return step(rows, chunks)

        monkeypatch.setattr(runner.decoder, "step", recording_fast)
    return shapes


def limit_device_rows(llm: HuggingFaceLLM, monkeypatch: pytest.MonkeyPatch, rows: int = 2) -> dict[str, int]:
    """Make the engine's runner run out of memory on any forward of more than ``rows`` prompts or
    decode rows (a device too small for the burst); returns the count of injected errors (``"n"``)."""
    run = llm.engine.runner.run
    ooms = {"n": 0}

    def small_device(forward: Any, batch: Any) -> Any:
        if len(forward.items) > rows or (forward.decode and batch.size > rows):
            ooms["n"] += 1
            raise torch.OutOfMemoryError("injected: KV cache does not fit")
        return run(forward, batch)

    monkeypatch.setattr(llm.engine.runner, "run", small_device)
    return ooms
