"""The native decode step (``async_llm.engine.runners.native``): the Python layers' results up to
float32 reassociation on every fast architecture, in float32, bfloat16 and int8, at one row and over
a padded batch with masked columns; the engine runs it and still generates ``model.generate``'s greedy
tokens; it is built once and kept; without a compiler that works, or with ``ASYNC_LLM_NATIVE=0``, the
Python layers serve with one log line."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable

import pytest
import torch
import transformers

from async_llm import HuggingFaceLLM
from async_llm.engine.runners import fast_check, fast_forward, fast_linear, int8, native
from async_llm.engine.runners.fast_linear import (
    Int8Linear,
    NarrowLinear,
    PackedLinear,
    PlainLinear,
    onednn_bf16,
    onednn_int8,
)
from tests.conftest import PROMPTS, reference_ids
from tests.test_fast_decode import FAST, _model
from tests.test_int8 import FAST as FAST_INT8

pytestmark = pytest.mark.skipif(
    native.disabled_reason() is not None, reason=f"native step not tried here: {native.disabled_reason()}"
)


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    """The native step loaded (built first where this machine has none): a compiler that is there
    but fails is a failure, not a skip."""
    assert native.load(), "the native decode step did not build or load"


def _tolerance(dtype: torch.dtype, quantized: bool) -> float:
    """The largest difference accepted, relative to the largest value: float32 reassociation (sums in
    another order, an exp within 2 ulp); in bfloat16 the start-up check's, since a value that lands
    on a rounding boundary rounds the other way; with int8 rows also one quantization step of a
    value that lands on a boundary."""
    if dtype != torch.float32:
        return fast_check.LOW_PRECISION_EPS * torch.finfo(dtype).eps
    return 1e-3 if quantized else 1e-5


def _close(candidate: torch.Tensor, reference: torch.Tensor, tolerance: float) -> None:
    difference = float((candidate.float() - reference.float()).abs().max())
    assert difference <= tolerance * float(reference.float().abs().max()), difference


def _python_and_native(
    decoder: fast_forward.FastDecoder, kv: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``step(buffer)`` (one forward over a copy of ``kv``) through the Python layers, then through
    the native call: each one's logits and buffer."""
    results = []
    for use in (False, True):
        decoder.native = use
        buffer = kv.clone()
        before = decoder.native_steps
        with torch.inference_mode():
            logits = step(buffer)
        assert decoder.native_steps == before + use
        results.append((logits, buffer))
    return results[0], results[1]


def _decode_both(
    decoder: fast_forward.FastDecoder, rows: int, dtype: torch.dtype, live: int = 9, greedy: bool = True
) -> None:
    """One decode step of ``rows`` rows (the later ones padded on the left, as the batch keeps
    shorter rows) through the Python layers and through the native call, from the same buffer: the
    same greedy tokens (unless not ``greedy``: in bfloat16 a near tie may part them), logits and
    written keys and values within the dtype's tolerance, and no other column of the buffer touched."""
    generator = torch.Generator().manual_seed(rows)
    layers, columns, end = len(decoder.layers), live + 7, live + 3
    shape = (layers, 2, rows + 1, decoder.kv_heads, columns, decoder.head_dim)
    kv = (torch.randn(shape, generator=generator) * 0.5).to(dtype)
    mask = torch.ones(rows, live + 1, dtype=torch.long)
    for r in range(rows):
        mask[r, : min(2 * r, live)] = 0  # the new column stays
    ids = torch.randint(3, 300, (rows, 1), generator=generator)
    positions = mask.sum(1, keepdim=True) - 1
    (python_logits, python_kv), (native_logits, native_kv) = _python_and_native(
        decoder, kv, lambda buffer: decoder.decode(ids, positions, mask, buffer, end)
    )
    tolerance = _tolerance(dtype, decoder.quantize is not None)
    if greedy:
        assert torch.equal(native_logits.argmax(-1), python_logits.argmax(-1))
    _close(native_logits, python_logits, tolerance)
    written = native_kv[:, :, :rows, :, end]
    assert not torch.equal(written, kv[:, :, :rows, :, end])  # the step wrote its column...
    _close(written, python_kv[:, :, :rows, :, end], tolerance)
    native_kv[:, :, :rows, :, end] = kv[:, :, :rows, :, end]
    assert torch.equal(native_kv, kv)  # ...and nothing else


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(FAST))
def test_native_layers_give_the_python_layers_results(name, dtype):
    decoder = fast_forward.FastDecoder(FAST[name]().to(dtype))
    assert decoder._native is not None
    for rows in (1, 3, 6):  # one row: the plain single-row products in float32
        _decode_both(decoder, rows, dtype)


def _verify(decoder, ids, positions, mask, end, buffer) -> torch.Tensor:
    return decoder.step(fast_forward.VerifyRows(ids, positions, mask, buffer, end), [])[0]


def _verify_both(decoder: fast_forward.FastDecoder, rows_list: tuple[int, ...], live: int, tokens: int) -> None:
    generator = torch.Generator().manual_seed(0)
    layers = len(decoder.layers)
    for rows in rows_list:
        end = live + 3  # context in columns 3 to end - 1, the step writes end to end + tokens - 1
        shape = (layers, 2, rows, decoder.kv_heads, end + tokens + 2, decoder.head_dim)
        kv = torch.randn(shape, generator=generator) * 0.5
        mask = torch.ones(rows, live, dtype=torch.long)
        for r in range(rows):
            mask[r, : min(r, live - 1)] = 0
        ids = torch.randint(3, 300, (rows, tokens), generator=generator)
        positions = mask.sum(1, keepdim=True) + torch.arange(tokens)
        verify = functools.partial(_verify, decoder, ids, positions, mask, end)
        (python_logits, python_kv), (native_logits, native_kv) = _python_and_native(decoder, kv, verify)
        assert native_logits.shape == (rows * tokens, 400)
        assert torch.equal(native_logits.argmax(-1), python_logits.argmax(-1))
        _close(native_logits, python_logits, 1e-5)
        _close(native_kv[..., end : end + tokens, :], python_kv[..., end : end + tokens, :], 1e-5)
        assert torch.equal(native_kv[..., :end, :], kv[..., :end, :])


def test_native_verify_steps_give_the_python_layers_results():
    """A speculative verify step (each row feeds its last token and a draft: T tokens, each attending
    to the row's context and causally to the tokens before it), at a few rows."""
    _verify_both(fast_forward.FastDecoder(FAST["llama"]()), (1, 2, 6), live=9, tokens=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("head_dim", [16, 24, 32, 64, 80, 128])
def test_native_attention_takes_every_head_width(head_dim, dtype):
    """Heads of 1, 2, 4 and 8 sixteen-float blocks (the vector kernel's register-held sums), of 5
    blocks (the general vector loops) and of 24 floats (the plain loops); groups of three query
    heads a key/value head; decode rows over 40 columns (two blocks of sixteen and a part) with
    padding, and verify steps of 5 tokens (more queries a head than one register tile holds)."""
    geometry = dict(head_dim=head_dim, num_attention_heads=6, num_key_value_heads=2, hidden_size=48)
    model = _model(transformers.LlamaConfig, **geometry)
    decoder = fast_forward.FastDecoder(model.to(dtype))
    assert decoder.head_dim == head_dim and decoder._native is not None
    for rows in (1, 5):
        _decode_both(decoder, rows, dtype, live=40, greedy=dtype == torch.float32)
    if dtype == torch.float32:
        _verify_both(decoder, (1, 3), live=37, tokens=5)


def _chunks_both(
    decoder: fast_forward.FastDecoder, rows: int, chunks: list[tuple[int, int]], dtype: torch.dtype
) -> None:
    """One step of ``rows`` decode rows (none: a prefill alone) and prompt chunks (``(start, tokens)``
    each: ``start`` columns of its own buffer computed before) through the Python layers and through
    the native call, from the same buffers: the same logits (and in float32 greedy tokens) for the
    rows and the chunks, and the same keys and values written into each chunk's columns, nothing
    else touched. (In bfloat16 the Python layers' fused attention rounds its softmax weights to
    bfloat16 and the native kernel keeps them in float32: both are as far from a float32 forward.)"""
    generator = torch.Generator().manual_seed(rows + len(chunks))
    layers, live, end = len(decoder.layers), 6, 9
    shape = (layers, 2, max(rows, 1), decoder.kv_heads, end + 2, decoder.head_dim)
    kv = (torch.randn(shape, generator=generator) * 0.5).to(dtype)
    mask = torch.ones(rows, live + 1, dtype=torch.long)
    for r in range(rows):
        mask[r, : min(r, live)] = 0
    ids = torch.randint(3, 300, (rows, 1), generator=generator)
    positions = mask.sum(1, keepdim=True) - 1
    buffers = []
    for start, n in chunks:
        buffer = torch.randn(layers, 2, decoder.kv_heads, start + n + 3, decoder.head_dim, generator=generator)
        buffers.append(((buffer * 0.5).to(dtype), torch.randint(3, 300, (n,), generator=generator).tolist(), start))
    results = []
    for use in (False, True):
        decoder.native = use
        before = decoder.native_steps
        batch = kv.clone()
        step_chunks = [fast_forward.Chunk(tokens, buffer.clone(), start) for buffer, tokens, start in buffers]
        step_rows = fast_forward.Rows(ids, positions, mask, batch, end) if rows else None
        with torch.inference_mode():
            rows_logits, chunk_logits = decoder.step(step_rows, step_chunks)
        assert decoder.native_steps == before + use
        results.append((rows_logits, chunk_logits, batch, [c.kv for c in step_chunks]))
    (python_rows, python_chunks, python_kv, python_bufs), (native_rows, native_chunks, native_kv, native_bufs) = results
    tolerance = _tolerance(dtype, decoder.quantize is not None)
    assert native_rows.shape == (rows, 400) and native_chunks.shape == (len(chunks), 400)
    for native_logits, python_logits in ((native_rows, python_rows), (native_chunks, python_chunks)):
        if len(python_logits):
            if dtype == torch.float32:  # in bfloat16 a near tie of a random model's logits may flip
                assert torch.equal(native_logits.argmax(-1), python_logits.argmax(-1))
            _close(native_logits, python_logits, tolerance)
    if rows:
        _close(native_kv[..., end, :], python_kv[..., end, :], tolerance)
        assert torch.equal(native_kv[..., :end, :], kv[..., :end, :])
    for (start, n), (original, _, _), native_buf, python_buf in zip(chunks, buffers, native_bufs, python_bufs):
        written = slice(start, start + n)
        _close(native_buf[..., written, :], python_buf[..., written, :], tolerance)
        assert torch.equal(native_buf[..., :start, :], original[..., :start, :])  # the prefix is read, not written
        assert torch.equal(native_buf[..., start + n :, :], original[..., start + n :, :])


# Prompt chunks: from an empty buffer and after a prefix, short (the native kernel, in parallel) and
# long (ATen's fused attention, one call each: see SMALL_CHUNK in native_step.cpp).
CHUNKS = [(0, 5), (0, 12), (7, 3), (0, 70), (40, 50)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(FAST))
def test_native_prefill_and_mixed_steps_give_the_python_layers_results(name, dtype):
    decoder = fast_forward.FastDecoder(FAST[name]().to(dtype))
    _chunks_both(decoder, 0, CHUNKS, dtype)  # a prefill alone, padded to the row bucket
    _chunks_both(decoder, 2, CHUNKS[:3], dtype)  # chunks riding with decode rows
    _chunks_both(decoder, 6, CHUNKS[2:], dtype)


@pytest.mark.skipif(not onednn_int8(), reason="this torch build has no oneDNN int8 linear")
def test_native_int8_prefill_gives_the_python_layers_results():
    decoder = fast_forward.FastDecoder(FAST_INT8["llama"](), quantize="int8")
    _chunks_both(decoder, 3, CHUNKS, torch.float32)


def test_native_step_rejects_a_chunk_its_buffer_cannot_hold():
    decoder = fast_forward.FastDecoder(FAST["llama"]())
    layers = len(decoder.layers)
    buffer = torch.zeros(layers, 2, decoder.kv_heads, 4, decoder.head_dim)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="do not fit its buffer"):
        decoder.step(None, [fast_forward.Chunk([5, 6, 7], buffer, 2)])


def test_native_attention_over_a_long_context():
    """Hundreds of live columns, masked ones among them, in several rows."""
    decoder = fast_forward.FastDecoder(FAST["qwen2"]())
    for rows in (2, 8):
        _decode_both(decoder, rows, torch.float32, live=300)


@pytest.mark.skipif(not onednn_int8(), reason="this torch build has no oneDNN int8 linear")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(FAST_INT8))
def test_native_int8_layers_give_the_python_layers_results(name, dtype):
    """The int8 rows' quantization and scaling back, native kernels both, as the Python operations
    compute them: with and without smoothing, with biases (llama, qwen2) and without."""
    model = FAST_INT8[name]()
    with torch.inference_mode():
        smoothing = int8.calibrate(model, fast_forward.FastDecoder(model), int8.drawn_ids(100))
    model = model.to(dtype)
    for vectors in (smoothing, None):
        decoder = fast_forward.FastDecoder(model, quantize="int8", smoothing=vectors)
        for rows in (1, 3):
            _decode_both(decoder, rows, dtype)


async def test_the_engine_runs_the_native_step_and_keeps_greedy_tokens(tiny_model, tiny_tokenizer):
    llm = HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, device="cpu", pad_token_id=0)
    async with llm:
        llm.engine.ready.wait()
        decoder = llm.engine.runner.decoder  # type: ignore[attr-defined]
        results = [await llm.acomplete(p, chat_template=False, max_tokens=12, ignore_eos=True) for p in PROMPTS]
        assert decoder.native_steps >= 11 * len(PROMPTS)  # every decode step after the first token
    for prompt, result in zip(PROMPTS, results):
        expected = reference_ids(tiny_model, tiny_tokenizer(prompt).input_ids, 12)
        assert result.token_ids[: len(expected)] == expected


def test_a_product_the_native_step_does_not_run_keeps_the_python_layers():
    decoder = fast_forward.FastDecoder(FAST["llama"]())
    layer = decoder.layers[0]
    odd = lambda x: PlainLinear([(torch.ones(4, 4), None)])(x)  # noqa: E731 - a product of no known kind
    assert native.product_spec(odd) is None
    assert decoder._native is not None
    layer.o = odd
    assert native.layer_spec(decoder.layers) is None
    assert decoder._native is None  # a product replaced after the decoder was built is seen: the Python layers run


@pytest.mark.skipif(not onednn_int8(), reason="this torch build has no oneDNN int8 linear")
@pytest.mark.parametrize(("out_features", "in_features"), [(64, 576), (10, 100)])
def test_int8_products_of_a_few_rows_give_onednns(out_features, in_features):
    """One to four rows take the native step's own int8 kernel where the CPU has AVX512-VNNI (whole
    blocks of 64 bytes and a tail, groups of 4 weight rows and the rest), five and more oneDNN's:
    both as the Python layers' oneDNN product computes them."""
    generator = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    linear = Int8Linear(weight, torch.randn(out_features, generator=generator), 16)
    spec = native.product_spec(linear)
    assert spec is not None and spec[0] == native.INT8
    for rows in range(1, 6):
        x = torch.randn(rows, in_features, generator=generator)
        with torch.inference_mode():
            candidate = torch.ops.async_llm_native.product(x, spec[1], native.INT8)
            reference = linear(x)
        torch.testing.assert_close(candidate, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not onednn_int8(), reason="this torch build has no oneDNN int8 linear")
def test_int8_products_without_vnni_keep_no_plain_rows_and_run_through_onednn(monkeypatch):
    """A CPU without AVX512-VNNI: no plain int8 copy of the weight is held (the kernel that reads it
    cannot run there), and the native product is oneDNN's at every row count."""
    monkeypatch.setattr(fast_linear, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    generator = torch.Generator().manual_seed(0)
    linear = Int8Linear(torch.randn(16, 128, generator=generator), None, 16)
    assert linear.rows_weight is None and linear.rows_sum is None
    spec = native.product_spec(linear)
    assert spec is not None
    for rows in (1, 5):
        x = torch.randn(rows, 128, generator=generator)
        with torch.inference_mode():
            torch.testing.assert_close(torch.ops.async_llm_native.product(x, spec[1], native.INT8), linear(x))


def test_int8_output_projection_runs_in_bfloat16_where_the_cpu_multiplies_it():
    model = FAST_INT8["llama"]()
    decoder = fast_forward.FastDecoder(model, quantize="int8")
    if onednn_bf16():
        assert isinstance(decoder.lm_head, NarrowLinear)
        x = torch.randn(2, model.config.hidden_size)
        expected = torch.nn.functional.linear(x.bfloat16().float(), model.lm_head.weight.bfloat16().float())
        torch.testing.assert_close(decoder.lm_head(x).float(), expected, rtol=2e-2, atol=2e-2)
    else:
        assert isinstance(decoder.lm_head, (PackedLinear, PlainLinear))
    assert isinstance(fast_forward.FastDecoder(model).lm_head, (PackedLinear, PlainLinear))  # float: as the model


def test_the_built_library_is_kept_and_loaded_without_a_build(monkeypatch):
    path = native.library_path()
    assert path.is_file()

    def no_build(target):
        raise AssertionError("built again")

    monkeypatch.setattr(native, "_build", no_build)
    assert native._load()


def _events(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "async_llm.engine.runners.native"]


def test_a_compiler_that_fails_leaves_the_python_step_with_one_log_line(tmp_path, monkeypatch, caplog):
    broken = tmp_path / "broken-c++"
    broken.write_text("#!/bin/sh\necho 'no such header' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    monkeypatch.setenv("ASYNC_LLM_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="async_llm.engine.runners.native")
    assert native._load() is False
    failed = [e for e in _events(caplog) if e["event"] == "native decode step not used"]
    assert len(failed) == 1 and "no such header" in failed[0]["reason"]
    assert not list((tmp_path / "cache" / "native").glob("*.so"))  # nothing half-built under the name


@pytest.mark.parametrize("value", ["0", "off", "false"])
def test_the_environment_switch_keeps_the_python_step(value, monkeypatch, caplog):
    monkeypatch.setenv(native.ENV_VAR, value)
    caplog.set_level(logging.INFO, logger="async_llm.engine.runners.native")
    assert native.disabled_reason() == f"{native.ENV_VAR}=0"
    assert native._load() is False
    assert [e["reason"] for e in _events(caplog)] == [f"{native.ENV_VAR}=0"]
