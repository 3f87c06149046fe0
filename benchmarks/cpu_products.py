"""The decode step's matrix products alone, as the fast runner runs them, on a CPU: the packed
oneDNN kernel against the plain one, per row count and dtype.

    python benchmarks/cpu_products.py [--rows 1,4,16] [--dtypes float32,bfloat16] [--layers 30]

Weights of the default model's shapes (SmolLM2-135M: fused q/k/v, o, fused gate/up, down, for
every layer, then the output projection), each layer its own tensors, so each product streams its
weight from memory as in a real step (not from a cache that a repeated product would hit). Prints
the milliseconds for all of them and the bytes of weights read per second. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # qkv, o, gate_up, down: [out, in]
HEAD = (49152, 576)


def _time(step: Callable[[], object], repeats: int = 10) -> float:
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args()
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        weights = [torch.randn(*shape).to(dtype) for _ in range(args.layers) for shape in SHAPES]
        weights.append(torch.randn(*HEAD).to(dtype))
        total = sum(w.numel() * w.element_size() for w in weights)
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in weights]
        for rows in (int(r) for r in args.rows.split(",")):
            xs = {w.shape[1]: torch.randn(rows, w.shape[1]).to(dtype) for w in weights}
            with torch.inference_mode():
                plain = _time(lambda xs=xs, weights=weights: [F.linear(xs[w.shape[1]], w) for w in weights])
                onednn = _time(
                    lambda xs=xs, weights=weights, packed=packed: [
                        torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")
                        for w, p in zip(weights, packed, strict=True)
                    ]
                )
            print(
                f"{name} rows {rows:3d}: plain {plain * 1e3:6.1f} ms ({total / plain / 1e9:5.1f} GB/s), "
                f"packed {onednn * 1e3:6.1f} ms ({total / onednn / 1e9:5.1f} GB/s)"
            )


if __name__ == "__main__":
    main()
