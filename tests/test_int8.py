"""``quantize="int8"``: int8 products on the fast runner (exact integer arithmetic, close logits on
every architecture the fast runner takes), the calibration kept with the start-up checks, the plain
path with one log line where int8 cannot run, and typed errors for what cannot work."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import torch
import torch.nn.functional as F
import transformers

from async_llm import HuggingFaceLLM
from async_llm.engine.config import EngineConfig, check_quantize
from async_llm.engine.core import Engine
from async_llm.engine.runners import fast_forward, int8
from async_llm.engine.runners.fast_linear import Int8Linear, onednn_int8, quantize_rows
from async_llm.errors import InvalidParameterError, ParameterTypeError
from async_llm.loading.check_cache import CheckCache
from tests.conftest import PROMPTS
from tests.test_fast_decode import PLAIN, _model

#: The fast runner's architectures with weights of a trained model's spread (the suite's usual 0.3
#: makes logits of a 2-layer model hang on a few large products, which no int8 scheme follows).
FAST = {
    "llama": lambda: _model(transformers.LlamaConfig, attention_bias=True, initializer_range=0.02),
    "mistral": lambda: _model(transformers.MistralConfig, sliding_window=None, initializer_range=0.02),
    "qwen2": lambda: _model(transformers.Qwen2Config, use_sliding_window=False, initializer_range=0.02),
    "qwen3": lambda: _model(transformers.Qwen3Config, head_dim=16, use_sliding_window=False, initializer_range=0.02),
}

pytestmark = pytest.mark.skipif(not onednn_int8(), reason="this torch build has no oneDNN int8 linear")


def _events(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name.startswith("async_llm")]


def test_int8_product_is_exact_on_values_int8_holds():
    """Weights that are whole multiples of their row's scale, inputs of their row's: the integer
    product, both scales and the bias give the float product exactly."""
    generator = torch.Generator().manual_seed(0)
    w_ints = torch.randint(-127, 128, (48, 32), generator=generator).float()
    w_ints[:, 0] = 127  # every row's largest magnitude is 127: its scale is exactly w_scale
    w_scale = 2.0 ** torch.randint(-6, 2, (48, 1), generator=generator).float()
    x_ints = torch.randint(-127, 128, (5, 32), generator=generator).float()
    x_ints[:, 1] = -127
    x_scale = 2.0 ** torch.randint(-4, 4, (5, 1), generator=generator).float()
    bias = torch.randn(48, generator=generator)
    linear = Int8Linear(w_ints * w_scale, bias, batch_hint=5)
    x = x_ints * x_scale
    assert torch.equal(linear(x), F.linear(x, w_ints * w_scale, bias))


def test_smoothing_leaves_the_product_and_moves_the_range():
    """A smoothing vector changes only the rounding: with a large outlier channel, dividing it out
    of the input brings the int8 product closer to the float one than without."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 128, generator=generator) * 0.05
    x = torch.randn(8, 128, generator=generator)
    x[:, 3] *= 80  # an outlier channel, as LLM activations have
    exact = F.linear(x, weight)
    plain = Int8Linear(weight, None, 8)(x)
    s = x.abs().amax(0).sqrt() / weight.abs().amax(0).sqrt()  # alpha 0.5
    smoothed = Int8Linear(weight, None, 8, smoothing=s)(x)
    error = lambda out: float((out - exact).norm() / exact.norm())  # noqa: E731
    assert error(smoothed) < 0.5 * error(plain)
    assert error(smoothed) < 0.02


def test_quantize_rows_is_per_row_and_zero_safe():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [100.0, 50.0, -25.0]])
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 1)
    assert torch.equal(q[0], torch.zeros(3, dtype=torch.int8)) and bool(torch.isfinite(scale).all())
    assert q[1].tolist() == [64, -127, 32] and q[2].tolist() == [127, 64, -32]  # each row its own scale
    before = x.clone()
    quantize_rows(x)
    assert torch.equal(x, before)  # the caller's float32 tensor is not written to


def test_smoothing_vectors_round_trip_and_refuse_what_does_not_fit():
    vectors = [torch.rand(64), torch.rand(128)]
    text = int8.encode(vectors)
    assert all(torch.equal(a, b) for a, b in zip(int8.decode(text), vectors, strict=True))
    broken = json.loads(text)
    broken["sizes"] = [64, 64]
    with pytest.raises(ValueError):
        int8.decode(json.dumps(broken))


@pytest.mark.parametrize("name", sorted(FAST))
def test_int8_logits_stay_close_to_float_on_every_fast_architecture(name):
    """The int8 step against the float one over a prompt, every position: logits within a few
    percent of the largest, and most next tokens the same."""
    model = FAST[name]()
    ids = list(range(3, 60))
    with torch.inference_mode():
        reference = fast_forward.FastDecoder(model).sequence_logits(ids)
        smoothing = int8.calibrate(model, fast_forward.FastDecoder(model), int8.drawn_ids(400))
        decoder = fast_forward.FastDecoder(model, quantize="int8", smoothing=smoothing)
        candidate = decoder.sequence_logits(ids)
    assert all(
        isinstance(p, Int8Linear) for layer in decoder.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)
    )
    relative = float((candidate - reference).abs().max() / reference.abs().max())
    assert relative < 0.03, f"{name}: int8 logits differ by {relative:.3f} of the largest"
    agree = float((candidate.argmax(-1) == reference.argmax(-1)).float().mean())
    assert agree >= 0.9, f"{name}: {agree:.0%} of greedy tokens agree"


async def test_int8_serves_concurrent_requests_and_frees_rows(tiny_model, tiny_tokenizer):
    async with HuggingFaceLLM(
        model=tiny_model, tokenizer=tiny_tokenizer, device="cpu", quantize="int8", pad_token_id=0
    ) as llm:
        results = await asyncio.gather(
            *(llm.acomplete(p, chat_template=False, max_tokens=12, ignore_eos=True) for p in PROMPTS)
        )
        assert llm.engine.runner.name == "fast"
        assert isinstance(llm.engine.runner.decoder.layers[0].qkv, Int8Linear)  # type: ignore[attr-defined]
        assert all(len(r.token_ids) == 12 for r in results)

        stream = llm.astream("cancel me", max_tokens=400, ignore_eos=True)
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(200):
            if llm.engine.batch.size == 0 and not llm.engine.scheduler.has_work:
                break
            await asyncio.sleep(0.01)
        assert llm.engine.batch.size == 0


def test_calibration_is_kept_for_the_model_files(tiny_model, tmp_path, monkeypatch):
    """The second engine over the same files reads the smoothing vectors the first calibrated."""
    calls = []
    calibrate = int8.calibrate

    def counted(*args, **kwargs):
        calls.append(1)
        return calibrate(*args, **kwargs)

    monkeypatch.setattr(int8, "calibrate", counted)
    config = EngineConfig(quantize="int8", max_batch_size=2)
    decoders = []
    for _ in range(2):
        engine = Engine(tiny_model, 0, config, checks=CheckCache({"files": "tiny"}, root=tmp_path))
        try:
            engine.start()
            engine.ready.wait()
            decoders.append(engine.runner.decoder)  # type: ignore[attr-defined]
        finally:
            engine.close()
    assert calls == [1]
    first, second = (d.layers[1].down for d in decoders)
    assert torch.equal(first.inverse_smoothing, second.inverse_smoothing)


@pytest.mark.parametrize("name", sorted(PLAIN))
async def test_a_model_the_fast_runner_cannot_take_runs_unquantized_and_says_so(name, tiny_tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="async_llm")
    async with HuggingFaceLLM(model=PLAIN[name](), tokenizer=tiny_tokenizer, device="cpu", quantize="int8") as llm:
        result = await llm.acomplete("hello", chat_template=False, max_tokens=4, ignore_eos=True)
        assert llm.engine.runner.name == "transformers" and len(result.token_ids) == 4
    off = [e for e in _events(caplog) if e["event"].startswith("fast runner off")]
    assert len(off) == 1 and off[0]["quantize"].startswith("int8 off")


def test_int8_off_a_cpu_falls_back_with_one_log_line(monkeypatch, caplog):
    """Where the int8 kernel does not work, the float fast step serves, and one line says why."""
    caplog.set_level(logging.INFO, logger="async_llm")
    monkeypatch.setattr(int8, "onednn_int8", lambda: False)
    model = FAST["llama"]()
    engine = Engine(model, 0, EngineConfig(quantize="int8", max_batch_size=2))
    try:
        engine.start()
        engine.ready.wait()
        assert engine.runner.name == "fast"
        assert not isinstance(engine.runner.decoder.layers[0].qkv, Int8Linear)  # type: ignore[attr-defined]
    finally:
        engine.close()
    off = [e for e in _events(caplog) if e["event"].startswith("int8 off")]
    assert len(off) == 1 and "oneDNN" in off[0]["reason"]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"quantize": "int4"}, InvalidParameterError),
        ({"quantize": 8}, ParameterTypeError),
        ({"quantize": "int8", "fast_path": False}, InvalidParameterError),
        ({"quantize": "int8", "runner": "transformers"}, InvalidParameterError),
        ({"quantize": "int8", "quantization_config": {"load_in_8bit": True}}, InvalidParameterError),
    ],
)
def test_bad_quantize_is_refused_before_anything_loads(kwargs, error, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("nothing loads")

    monkeypatch.setattr("async_llm.llm.huggingface.model_to_serve", never)
    with pytest.raises(error) as caught:
        HuggingFaceLLM("no/such-model", device="cpu", **kwargs)
    assert caught.value.param == "quantize"


def test_int8_off_a_cpu_is_refused():
    with pytest.raises(InvalidParameterError) as caught:
        check_quantize("int8", torch.device("meta"))
    assert caught.value.param == "quantize" and "CPU" in str(caught.value)
    check_quantize(None, torch.device("meta"))  # nothing asked: nothing refused
