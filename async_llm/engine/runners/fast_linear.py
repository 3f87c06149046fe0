"""The fast runner's linear layers: fused products (q/k/v, gate/up) with weights of their own,
multiplied through oneDNN with a prepacked weight where that is faster.

On a CPU in float32, oneDNN multiplies a weight it has reordered once for its kernel about twice as
fast as the default kernel for a decode step's shapes (``benchmarks/fast_path.py``); in bfloat16 it
does the same where the CPU multiplies bf16 in hardware (AVX512-BF16, AMX). The ops that do
it are torch's private ``torch.ops.mkldnn._*``: :func:`onednn_prepack` is the one place that checks
they exist and work, once per process; every other path is a plain ``F.linear``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from async_llm.log import get_logger

log = get_logger("async_llm.engine.runners.fast_linear")

Linear = Callable[[torch.Tensor], torch.Tensor]


@functools.cache
def onednn_prepack() -> bool:
    """Whether this torch build has oneDNN's prepacked linear ops, and they compute (checked once)."""
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return False
    try:
        weight, x = torch.ones(4, 8), torch.ones(2, 8)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 2)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.equal(out, F.linear(x, weight)))
    except (RuntimeError, AttributeError, NotImplementedError) as exc:  # a torch build without the ops
        log.info("prepacked linear unavailable; plain linear", error=repr(exc))
        return False


#: The CPU flags the native step's int8 few-row kernel needs (AVX512-VNNI's dot products).
VNNI_FLAGS = frozenset({"avx512_vnni", "avx512bw"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where that cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def onednn_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX, where oneDNN runs bf16
    products at about three times float32's rate; without them bf16 is emulated and slower than
    float32) and oneDNN's prepacked linear computes it here (checked once)."""
    if not onednn_prepack() or not {"avx512_bf16", "amx_bf16"} & cpu_flags():
        return False
    try:
        weight = torch.linspace(-1, 1, 64 * 32).reshape(64, 32).bfloat16()
        x = torch.linspace(1, -1, 4 * 32).reshape(4, 32).bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 4)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(out.float(), F.linear(x.float(), weight.float()), rtol=2e-2, atol=2e-2))
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        log.info("prepacked bfloat16 linear unavailable", error=repr(exc))
        return False


@functools.cache
def onednn_int8() -> bool:
    """Whether this torch build has oneDNN's int8 linear ops and they compute integer products
    exactly here (checked once). oneDNN picks its kernel for the CPU it runs on (AMX, AVX512-VNNI,
    AVX-VNNI, or AVX2's ``vpmaddubsw``), so no instruction the CPU lacks is ever run."""
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return False
    try:
        weight = (torch.arange(64 * 32) % 255 - 127).reshape(64, 32).to(torch.int8)
        x = (torch.arange(3 * 32) * 7 % 255 - 127).reshape(3, 32).to(torch.int8)
        packed = torch.ops.onednn.qlinear_prepack(weight, [3, 32])
        ones, zeros = torch.ones(64), torch.zeros(64, dtype=torch.int32)
        out = torch.ops.onednn.qlinear_pointwise(
            x, 1.0, 0, packed, ones, zeros, None, 1.0, 0, torch.float32, "none", [], ""
        )
        return bool(torch.equal(out, x.float() @ weight.float().T))
    except (RuntimeError, AttributeError, NotImplementedError) as exc:  # a torch build without the ops
        log.info("int8 linear unavailable", error=repr(exc))
        return False


def quantize_rows(x: torch.Tensor, inverse_smoothing: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[N, K]`` (divided by a smoothing vector ``[K]`` first, given its inverse) as int8,
    symmetric per row: ``(q, scale)`` with ``x / s ~ q * scale``, ``scale`` ``[N, 1]`` float32 (a
    row of zeros gets the smallest positive scale and quantizes to zeros)."""
    tiny = torch.finfo(torch.float32).tiny
    if inverse_smoothing is None:
        x = x.float()  # the caller's own tensor in float32: not written to
        amax = x.abs().amax(dim=-1, keepdim=True).clamp_(min=tiny)
        q = (x * (127.0 / amax)).round_().to(torch.int8)
    else:
        x = x * inverse_smoothing  # a new float32 tensor (the vector is float32)
        amax = x.abs().amax(dim=-1, keepdim=True).clamp_(min=tiny)
        q = x.mul_(127.0 / amax).round_().to(torch.int8)
    return q, amax.div_(127.0)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` ``[N, K]`` as int8, symmetric per output channel: ``(q, scale)`` with
    ``weight ~ q * scale[:, None]``, ``scale`` ``[N]`` float32."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp_(min=torch.finfo(torch.float32).tiny).div_(127.0)
    return torch.round(w / scale[:, None]).to(torch.int8), scale


class Int8Linear:
    """A linear layer with int8 weights, symmetric per output channel, whose input is quantized per
    row on the fly, so the product is an integer dot product (oneDNN's int8 kernel with its weight
    prepacked: AMX or VNNI where the CPU has them), then scaled back: ``(q_x @ q_w.T) * s_w * s_x``.

    Given a smoothing vector ``s`` (see :mod:`async_llm.engine.runners.int8`), input channel ``j`` is
    divided by ``s_j`` before it is quantized and the weight's column ``j`` multiplied by it. Weights
    take a quarter of float32's memory, and a decode step streams a quarter of the bytes. The result
    is in the input's dtype (the model's).
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int, smoothing: torch.Tensor | None = None
    ) -> None:
        w = weight.detach().float()
        self.inverse_smoothing = None
        if smoothing is not None:  # input channel j divided by s_j, weight column j multiplied by it
            w = w * smoothing.float()
            self.inverse_smoothing = 1.0 / smoothing.float()
        q, scale = quantize_weight(w)
        self.weight = torch.ops.onednn.qlinear_prepack(q, [batch_hint, w.shape[1]])
        # The int8 weight as plain rows too, with each row's sum, for the native step's few-row kernel
        # where the CPU has the instructions it is built with (see native_step.cpp: a byte a
        # parameter more, for one-row products at twice oneDNN's rate).
        self.rows_weight: torch.Tensor | None = None
        self.rows_sum: torch.Tensor | None = None
        if cpu_flags() >= VNNI_FLAGS:
            self.rows_weight = q.contiguous()
            self.rows_sum = q.sum(dim=1, dtype=torch.int32)
        self.scale = scale
        self.zero_points = torch.zeros(w.shape[0], dtype=torch.int32)
        self.bias = None if bias is None else bias.detach()
        self.out_features = w.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        q, row_scale = quantize_rows(x, self.inverse_smoothing)
        out: torch.Tensor = torch.ops.onednn.qlinear_pointwise(
            q, 1.0, 0, self.weight, self.scale, self.zero_points, None, 1.0, 0, x.dtype, "none", [], ""
        )
        out.mul_(row_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out


class PlainLinear:
    """The linears of one input over their own weights (``parts``: each weight and bias), outputs
    concatenated: ``torch.cat([x @ w.T + b ...], -1)`` (one product for one part)."""

    def __init__(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        self.parts = [(w.detach(), None if b is None else b.detach()) for w, b in parts]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.parts) == 1:
            weight, bias = self.parts[0]
            return F.linear(x, weight, bias)
        return torch.cat([F.linear(x, w, b) for w, b in self.parts], dim=-1)


class PackedLinear:
    """A linear layer whose weight oneDNN has reordered once for its matrix-multiply kernel (its own
    copy), and, for one row in float32, the plain kernel over the weights the model holds anyway:
    streaming a weight for one row, the default kernel (a matrix-vector product) is faster than the
    packed one (20.2 against 23.9 ms for the default model's products, weights streamed from memory
    as in a decode step; at 4 rows and more the packed kernel wins, 24.6 against 40.5: see
    ``benchmarks/cpu_products.py``). In bfloat16 the packed kernel wins at one row too."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int, single_row: Linear | None = None
    ) -> None:
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
        self.bias = None if bias is None else bias.detach()
        self.single_row = single_row if weight.dtype == torch.float32 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.single_row is not None and x.shape[0] == 1:
            return self.single_row(x)
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return out


def prepacks(weight: torch.Tensor) -> bool:
    """Whether :func:`prepacked_linear` gives ``weight`` its own prepacked copy: float32 on a CPU,
    and bfloat16 on a CPU that multiplies it in hardware (:func:`onednn_bf16`)."""
    if weight.device.type != "cpu" or not onednn_prepack():
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and onednn_bf16())


def prepacked_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int, single_row: Linear | None = None
) -> Linear:
    """``x @ weight.T + bias``: through oneDNN with the weight prepacked once (its own reordered
    copy) where :func:`prepacks` says so, faster for these shapes than the default kernel; else the
    plain linear over ``weight`` itself.

    Args:
        single_row: The product for one row (see :class:`PackedLinear`); None: the plain linear
            over ``weight`` (pass one when ``weight`` is a temporary the caller does not keep).
    """
    plain = PlainLinear([(weight, bias)])
    if prepacks(weight):
        return PackedLinear(weight, bias, batch_hint, single_row if single_row is not None else plain)
    return plain


class NarrowLinear:
    """A float32 product run in bfloat16 (weight and input; the output, in bfloat16, is the caller's
    to widen), through oneDNN with the weight prepacked: half the bytes a step streams, on a CPU that
    multiplies bfloat16 in hardware (see :func:`onednn_bf16`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int) -> None:
        self.inner = PackedLinear(
            weight.detach().bfloat16(), None if bias is None else bias.detach().bfloat16(), batch_hint
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.bfloat16())


def concatenated(modules: Sequence[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights of linears of one input as one ``[sum(out), in]`` weight (their outputs
    concatenated), and their biases so (zeros for a module without one; None when none has one)."""
    weight = torch.cat([m.weight.detach() for m in modules])
    bias = None
    if any(m.bias is not None for m in modules):
        bias = torch.cat([m.bias.detach() if m.bias is not None else weight.new_zeros(m.out_features) for m in modules])
    return weight, bias


def fused_linear(modules: Sequence[nn.Linear], batch_hint: int, owned: bool) -> Linear:
    """One product for several linears of the same input (their outputs concatenated).

    The caller's model is never changed unless the library owns it (``owned``): prepacked, the
    concatenation is a temporary the packed copy is made from; unpacked (an accelerator, another
    dtype), an owned model's modules become views of the concatenated weight (nothing held twice),
    and a model passed in keeps its weights while the runner holds a concatenated copy.
    """
    weight, bias = concatenated(modules)
    if not prepacks(weight) and owned:
        _share(modules, weight, bias)
        return prepacked_linear(weight, bias, batch_hint)
    single_row = PlainLinear([(m.weight, m.bias) for m in modules])  # the modules' own weights: nothing held twice
    return prepacked_linear(weight, bias, batch_hint, single_row)


def _share(modules: Sequence[nn.Linear], weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Make each module's parameters views into the concatenated ``weight`` and ``bias``."""
    row = 0
    for m in modules:
        n = m.out_features
        m.weight = nn.Parameter(weight[row : row + n], requires_grad=False)
        if m.bias is not None and bias is not None:
            m.bias = nn.Parameter(bias[row : row + n], requires_grad=False)
        row += n


def int8_linear(modules: Sequence[nn.Linear], batch_hint: int, smoothing: torch.Tensor | None = None) -> Linear:
    """One :class:`Int8Linear` for several linears of the same input (their outputs concatenated);
    the modules keep their own weights (the int8 copy is the runner's)."""
    weight, bias = concatenated(modules)
    return Int8Linear(weight, bias, batch_hint, smoothing)
