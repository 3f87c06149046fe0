"""``quantize="int8"``: the fast runner's products with int8 weights and rows quantized on the fly.

Each decoder layer's four products (q/k/v, o, gate/up, down) run as
:class:`~async_llm.engine.runners.fast_linear.Int8Linear`: weights int8 per output channel,
symmetric; each row of the input quantized to int8 when it arrives; an integer product through
oneDNN (AMX or VNNI where the CPU has them). The output projection stays a float product:
quantizing it too costs another 0.7% of perplexity on the default model for a product the step runs
once (``benchmarks/quality.py``). Where the CPU multiplies bfloat16 in hardware it runs in bfloat16
(half the bytes of float32 a step streams; perplexity 13.2409 against 13.2412 with it in float32).

Quantizing a row with one scale loses its small values where a few channels are far larger than the
rest (the outlier channels of LLM activations): per-row int8 alone costs the default model 2.9% of
perplexity. So each product first moves part of its input's range into its weight, as SmoothQuant
does: input channel ``j`` is divided by ``s_j`` and the weight's column ``j`` multiplied by it, which
leaves the product unchanged in exact arithmetic, with ``s_j = a_j ** alpha / w_j ** (1 - alpha)``
(``a_j`` the largest input seen in channel ``j``, ``w_j`` the largest weight of column ``j``).
``a_j`` comes from a calibration pass over a fixed English text that ships with Python (sections of
``pydoc_data.topics`` that the quality benchmark does not score), and ``alpha`` is chosen per product
from :data:`ALPHAS` as the one whose int8 product is closest to the float one on that text. That
brings the cost to 0.7% (13.24 against 13.15). The calibration runs once per model files
(a few seconds) and is kept with the start-up checks' verdicts.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from async_llm.engine.runners.fast_forward import FastDecoder, layer_products
from async_llm.engine.runners.fast_linear import Linear, concatenated, onednn_int8, quantize_rows, quantize_weight
from async_llm.engine.start_checks import CheckStore, remembered
from async_llm.log import get_logger

log = get_logger("async_llm.engine.runners.int8")

#: The values of SmoothQuant's ``alpha`` each product chooses from (0.5 alone: 1.4% of perplexity).
ALPHAS = (0.0, 0.25, 0.5, 0.75)

#: Tokens of the calibration text: the first pass (largest input per channel) reads them all, the
#: second (the choice of ``alpha``) the first :data:`CHOICE_TOKENS`.
CALIBRATION_TOKENS = 512
CHOICE_TOKENS = 256

#: Sections of ``pydoc_data.topics`` the calibration reads (none of those the quality benchmark scores).
CALIBRATION_SECTIONS = ("atom-literals", "attribute-access", "augassign", "binary", "bitwise", "booleans", "calls")

#: Bump when the calibration judges its candidates differently (2: through Int8Linear's own row and
#: weight quantization).
CALIBRATION_VERSION = 2

#: The smallest value of a smoothing factor or a largest magnitude (a channel that is always zero).
_FLOOR = 1e-5


def calibration_text() -> str:
    """The calibration text (English prose and code from Python's own reference)."""
    try:
        import pydoc_data.topics as topics
    except ImportError:  # a Python built without its docs: the module's own prose is text enough
        return __doc__ or ""
    return "\n\n".join(topics.topics[name] for name in CALIBRATION_SECTIONS if name in topics.topics)


def drawn_ids(vocab: int) -> list[int]:
    """Calibration tokens for a model without a tokenizer at hand: a seeded draw from its
    vocabulary (a weaker calibration than text: its inputs are not the model's usual ones)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (CALIBRATION_TOKENS,), generator=generator).tolist()


def unavailable_reason(model: Any) -> str | None:
    """Why int8 products cannot run ``model`` (None when they can)."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        return f"int8 products run on a CPU, not {device.type}"
    if not onednn_int8():
        return "this torch build has no working oneDNN int8 linear"
    return None


class _Record:
    """A product under calibration: its float result, the largest input seen per channel, and,
    once ``candidates`` are set, each candidate's squared error against the float result."""

    def __init__(self, linear: Linear, modules: Sequence[nn.Linear]) -> None:
        self.linear = linear
        self.modules = modules
        self.amax: torch.Tensor | None = None
        self.candidates: list[tuple[torch.Tensor, torch.Tensor]] = []  # (s, quantized weight * s) in float
        self.errors: list[float] = []
        _, bias = concatenated(modules)
        self.bias = None if bias is None else bias.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        xf = x.detach().float()
        if not self.candidates:
            seen = xf.abs().amax(dim=0)
            self.amax = seen if self.amax is None else torch.maximum(self.amax, seen)
            return out
        reference = out.float() if self.bias is None else out.float() - self.bias
        for i, (s, weight) in enumerate(self.candidates):
            q, scale = quantize_rows(xf, 1.0 / s)  # the rows as Int8Linear quantizes them
            approx = (q.float() * scale) @ weight.T
            self.errors[i] += float((approx - reference).square().sum())
        return out

    def propose(self) -> None:
        """Set the candidates, one per :data:`ALPHAS`, from the largest inputs seen."""
        assert self.amax is not None, "the first pass ran"
        weight = concatenated(self.modules)[0].float()
        columns = weight.abs().amax(dim=0).clamp_(min=_FLOOR)
        amax = self.amax.clamp(min=_FLOOR)
        for alpha in ALPHAS:
            s = (amax**alpha / columns ** (1 - alpha)).clamp_(min=_FLOOR)
            q, scale = quantize_weight(weight * s)  # the weight as Int8Linear quantizes it
            self.candidates.append((s, q.float() * scale[:, None]))
        self.errors = [0.0] * len(ALPHAS)

    def best(self) -> torch.Tensor:
        """The smoothing of the candidate closest to the float product."""
        return self.candidates[min(range(len(ALPHAS)), key=self.errors.__getitem__)][0]


def calibrate(model: Any, decoder: FastDecoder, ids: Sequence[int]) -> list[torch.Tensor]:
    """The smoothing vector of every product of ``model``'s layers (in :func:`layer_products`'
    order), from the float ``decoder``'s forwards over ``ids`` (see the module's docstring)."""
    per_layer: list[list[_Record]] = []
    for layer, block in zip(decoder.layers, model.model.layers, strict=True):
        linears = (layer.qkv, layer.o, layer.gate_up, layer.down)
        records = [_Record(linear, modules) for linear, modules in zip(linears, layer_products(block), strict=True)]
        layer.qkv, layer.o, layer.gate_up, layer.down = records
        per_layer.append(records)
    everything = [record for records in per_layer for record in records]
    try:
        with torch.inference_mode():
            for start in range(0, len(ids), 256):  # the largest input of each channel
                decoder.sequence_logits(ids[start : start + 256])
            for record in everything:
                record.propose()
            decoder.sequence_logits(ids[:CHOICE_TOKENS])  # each candidate's error
    finally:  # the float decoder as it was
        for layer, records in zip(decoder.layers, per_layer, strict=True):
            layer.qkv, layer.o, layer.gate_up, layer.down = (record.linear for record in records)
    return [record.best() for record in everything]


def encode(smoothing: Sequence[torch.Tensor]) -> str:
    """The smoothing vectors as a JSON string (a start-up verdict: see :func:`remembered`)."""
    flat = torch.cat([s.float().flatten() for s in smoothing]).numpy().tobytes()
    return json.dumps({"sizes": [int(s.numel()) for s in smoothing], "float32": base64.b64encode(flat).decode()})


def decode(text: str) -> list[torch.Tensor]:
    """Inverse of :func:`encode`.

    Raises:
        ValueError: ``text`` is not what :func:`encode` writes.
    """
    record = json.loads(text)
    sizes = [int(n) for n in record["sizes"]]
    flat = torch.frombuffer(bytearray(base64.b64decode(record["float32"])), dtype=torch.float32)
    if flat.numel() != sum(sizes):
        raise ValueError("stored smoothing vectors do not match their sizes")
    return list(torch.split(flat.clone(), sizes))


def _valid(model: Any) -> Callable[[object], bool]:
    expected = [modules[0].in_features for block in model.model.layers for modules in layer_products(block)]

    def valid(value: object) -> bool:
        if not isinstance(value, str):
            return False
        try:
            return [int(s.numel()) for s in decode(value)] == expected
        except (ValueError, KeyError, TypeError):
            return False

    return valid


def smoothing_for(
    model: Any,
    float_decoder: Callable[[], FastDecoder],
    calibration_ids: Sequence[int],
    checks: CheckStore | None,
    context: dict[str, str],
) -> list[torch.Tensor]:
    """The smoothing vectors of ``model``: kept from an earlier start with the same files, else
    calibrated (:func:`calibrate`) on ``float_decoder()``, then kept."""
    ids = list(calibration_ids)[:CALIBRATION_TOKENS]
    # The version counts changes to how candidates are judged: a stored choice of an older one is unused.
    digest = hashlib.sha256(json.dumps([ids, ALPHAS, CHOICE_TOKENS, CALIBRATION_VERSION]).encode()).hexdigest()[:16]
    context = {**context, "calibration": digest}

    def run() -> str:
        log.info("calibrating int8 products (once for these model files)", tokens=len(ids))
        return encode(calibrate(model, float_decoder(), ids))

    return decode(remembered(checks, model, "int8_smoothing", context, run, valid=_valid(model)))
