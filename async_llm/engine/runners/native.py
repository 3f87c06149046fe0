"""The fast runner's layers as one native call (``native_step.cpp``), built once per machine: every
step, decode rows, a verify step's rows, prompt chunks, or rows and chunks together.

A decode step at a small batch is bound by what runs between the products: per layer some thirty
small operations (norms, rotary, the attention's parts, residuals, the int8 rows' quantization),
each paying interpreter and dispatch, and, right after a product has streamed megabytes of weights
through the caches, its code and data brought back from memory (measured: an RMSNorm of one row costs
10 us alone and 70 us after a large product). The native call runs the same products (the same
oneDNN and ATen calls) and a few compact kernels between them, each rounding to the model's dtype
where the Python operations round; sums run in another order, so its results are
:meth:`FastDecoder._layers`' up to float32 reassociation (tested). 1.3x to 1.9x the Python layers'
tokens/s for one stream on the default model (``benchmarks/results/cpu-native-step-amx``).

It is compiled with the system's C++ compiler against the installed torch (``-march=native``: the
instructions of the CPU it runs on, so it never meets one the CPU lacks) the first time a fast runner
starts on a machine (about 15 s on 2 cores, at the lowest priority), and kept under
``<cache_root>/native/``, keyed by its source, torch's version, the compiler and the CPU's flags;
later starts load it at once. Without a compiler, or with ``ASYNC_LLM_NATIVE=0``, the Python step
serves, with one log line saying why.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from async_llm.cache import cache_root
from async_llm.engine.runners.fast_linear import Int8Linear, PackedLinear, PlainLinear, cpu_flags
from async_llm.log import get_logger

log = get_logger("async_llm.engine.runners.native")

SOURCE = Path(__file__).with_name("native_step.cpp")

#: Set to ``0`` to keep the Python step (nothing is compiled or loaded).
ENV_VAR = "ASYNC_LLM_NATIVE"

#: The product kinds of ``native_step.cpp``.
PLAIN, PACKED, INT8 = 0, 1, 2

#: The compiler's flags (part of the library's key): the CPU's own instructions; no fused
#: multiply-adds (the kernels round where the Python operations round); OpenMP for at::parallel_for,
#: whose threads are then torch's own (the runtime torch loaded, found by its name at load time).
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-march=native", "-ffp-contract=off", "-fopenmp", "-w")

#: Seconds a build may take before it is abandoned.
BUILD_TIMEOUT = 600

_lock = threading.Lock()
_loaded: bool | None = None
_builds: set[subprocess.Popen[str]] = set()


def disabled_reason() -> str | None:
    """Why the native step is not tried here (None: it is)."""
    if os.environ.get(ENV_VAR, "1").strip().lower() in {"0", "false", "no", "off"}:
        return f"{ENV_VAR}=0"
    if _compiler() is None:
        return "no C++ compiler (set CXX, or install g++ or clang++)"
    return None


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


@functools.cache
def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_path() -> Path:
    """Where the library built for this source, torch, compiler and CPU is kept."""
    compiler = _compiler() or "none"
    version = _compiler_version(compiler)
    key = hashlib.sha256(
        "\n".join(
            [SOURCE.read_text(encoding="utf-8"), torch.__version__, compiler, version, *FLAGS, *sorted(cpu_flags())]
        ).encode()
    ).hexdigest()[:24]
    return cache_root() / "native" / f"decode_step-{key}.so"


def _build(target: Path) -> None:
    """Compile ``native_step.cpp`` into ``target`` (atomically: a half-written file never has its name)."""
    compiler = _compiler()
    assert compiler is not None
    torch_dir = Path(torch.__file__).parent
    lib_dir = torch_dir / "lib"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        out = Path(tmp) / target.name
        command = [
            compiler,
            *FLAGS,
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-I{torch_dir / 'include'}",
            str(SOURCE),
            "-o",
            str(out),
            f"-L{lib_dir}",
            f"-Wl,-rpath,{lib_dir}",
            "-ltorch",
            "-ltorch_cpu",
            "-lc10",
        ]
        # At the lowest priority: on a machine of few cores a compiler at full priority would take a
        # core from the engine's threads, which wait for each other at every operation.
        nice = shutil.which("nice")
        if nice is not None:
            command = [nice, "-n", "19", *command]
        # A session of its own: the compiler driver's children (cc1plus, the linker) are stopped with it.
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        ) as process:
            _builds.add(process)
            try:
                _, stderr = process.communicate(timeout=BUILD_TIMEOUT)
            except subprocess.TimeoutExpired:
                _kill(process)
                raise
            finally:
                _builds.discard(process)
        if process.returncode != 0:
            raise RuntimeError(f"the native decode step did not compile: {stderr.strip()[-2000:]}")
        os.replace(out, target)


def _kill(process: subprocess.Popen[str]) -> None:
    """Stop a build's compiler and everything it started."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(process.pid, signal.SIGKILL)


def _stop_builds() -> None:
    """At exit: a compiler still running for a build this process started is stopped with it."""
    for process in list(_builds):
        _kill(process)


atexit.register(_stop_builds)


def _load() -> bool:
    reason = disabled_reason()
    if reason is not None:
        log.info("native decode step not used", reason=reason)
        return False
    try:
        target = library_path()
        if not target.exists():
            with FileLock(str(target) + ".lock"):
                if not target.exists():  # another process may have built it meanwhile
                    log.info("building the native decode step (once per machine)", path=str(target))
                    start = time.perf_counter()
                    _build(target)
                    log.info("native decode step built", seconds=round(time.perf_counter() - start, 1))
        if not hasattr(torch.ops.async_llm_native, "step_layers"):
            torch.ops.load_library(str(target))  # type: ignore[no-untyped-call]
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:  # a compiler that fails, a read-only cache
        log.info("native decode step not used", reason=repr(exc))
        return False
    return True


def load() -> bool:
    """Load the native step, once per process, building it first where this machine has none (about
    15 s on 2 cores, before the engine's first step: built beside a running engine, a compiler would
    take a core its threads wait for at every operation, and the first requests would crawl). Later
    calls answer at once. Whether it is loaded."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
        return _loaded


def greedy(logits: torch.Tensor) -> torch.Tensor | None:
    """Each row's argmax of CPU ``logits`` ``[N, V]`` (float32 or bfloat16, rows contiguous), as
    ``argmax`` chooses it, rows in parallel: None where the native step is not loaded (this never
    builds it) or the tensor is not such a matrix. At 64 rows of 49,152 it takes a fraction of
    torch's single-threaded reduction (3 to 4% of a decode step)."""
    if (
        not _loaded
        or logits.device.type != "cpu"
        or logits.dim() != 2
        or logits.dtype not in (torch.float32, torch.bfloat16)
        or logits.stride(-1) != 1
        or logits.shape[-1] == 0
    ):
        return None
    chosen: torch.Tensor = torch.ops.async_llm_native.greedy(logits)
    return chosen


def product_spec(linear: Any) -> tuple[int, list[torch.Tensor | None]] | None:
    """A product as ``native_step.cpp`` takes it: its kind and parameters (None: a product it does
    not run). A packed product's plain weights for one row follow its packed weight and bias."""
    if isinstance(linear, PlainLinear):
        return PLAIN, [t for w, b in linear.parts for t in (w, b)]
    if isinstance(linear, PackedLinear):
        params: list[torch.Tensor | None] = [linear.weight, linear.bias]
        if linear.single_row is not None:
            if not isinstance(linear.single_row, PlainLinear):
                return None
            params += [t for w, b in linear.single_row.parts for t in (w, b)]
        return PACKED, params
    if isinstance(linear, Int8Linear):
        return INT8, [
            linear.weight, linear.scale, linear.zero_points, linear.inverse_smoothing, linear.bias,
            linear.rows_weight, linear.rows_sum,
        ]  # fmt: skip
    return None


def layer_spec(layers: Sequence[Any]) -> tuple[list[torch.Tensor | None], list[int]] | None:
    """The decoder layers (``FastDecoder.layers``) as the native call's ``params`` and ``layout``:
    per layer its two norms (and q/k norms), then its four products, each ``kind, count`` in the
    layout and its parameters in ``params``. None when a product is of a kind it does not run."""
    params: list[torch.Tensor | None] = []
    layout: list[int] = []
    for layer in layers:
        params += [layer.input_norm, layer.post_norm]
        has_qk_norm = layer.q_norm is not None and layer.k_norm is not None
        layout.append(int(has_qk_norm))
        if has_qk_norm:
            params += [layer.q_norm, layer.k_norm]
        for linear in (layer.qkv, layer.o, layer.gate_up, layer.down):
            spec = product_spec(linear)
            if spec is None:
                return None
            kind, tensors = spec
            layout += [kind, len(tensors)]
            params += tensors
    return params, layout
