"""The roofline: bare batched forward passes for a burst workload's shapes, nothing else.

For burst N with prompts left-padded to P tokens and T new tokens, any system must at least run one
prefill forward ``[N, P]`` and T - 1 decode forwards ``[N, 1]`` over a growing KV cache. This times
exactly those calls (a transformers ``DynamicCache``, ``logits_to_keep=1`` as async_llm and
``generate`` use), with every input tensor built before the clock starts, no sampling (a constant
next token), no scheduling and no Python per token. A system's time over this is its overhead.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from async_llm.bench.workloads import Workload
from async_llm.engine.model_api import cache_kwarg


def _inputs(workload: Workload, pad: int, device: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded ``[N, P]`` ids and mask of the workload's prompts, and T."""
    requests = workload.requests
    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.full((len(requests), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(requests):
        ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids) :] = 1
    new_tokens = max(r.max_new_tokens for r in requests)
    return ids.to(device), mask.to(device), new_tokens


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def _one_pass(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, device: str
) -> tuple[float, list[float]]:
    n, p = ids.shape
    # Everything the loop needs, prepared up front: full mask, positions per step, the fed token.
    full_mask = torch.cat([mask, torch.ones(n, new_tokens, dtype=mask.dtype, device=mask.device)], dim=1)
    prefill_positions = (mask.cumsum(-1) - 1).clamp(min=0)
    lengths = mask.sum(-1)
    step_positions = [(lengths + s)[:, None] for s in range(new_tokens)]  # decode step s feeds position len + s - 1
    step_masks = [full_mask[:, : p + s] for s in range(new_tokens)]  # step s attends to p + s columns
    token = torch.zeros(n, 1, dtype=torch.long, device=ids.device)
    cache = {cache_kwarg(model): DynamicCache()}  # under the name this model's forward takes it
    _sync(device)
    t0 = time.perf_counter()
    model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=prefill_positions,
        use_cache=True,
        logits_to_keep=1,
        **cache,
    )
    _sync(device)
    prefill = time.perf_counter() - t0
    steps = []
    for s in range(1, new_tokens):
        t0 = time.perf_counter()
        model(
            input_ids=token,
            attention_mask=step_masks[s],
            position_ids=step_positions[s - 1],
            use_cache=True,
            logits_to_keep=1,
            **cache,
        )
        _sync(device)
        steps.append(time.perf_counter() - t0)
    return prefill, steps


def matmul_limit(model: Any, batch: int, device: str, repeats: int = 3) -> tuple[float, float]:
    """The physical limit of one decode step: every matrix product of the model's linear layers
    (its own weights, output projection included) for ``batch`` rows, back to back, nothing else,
    with the faster of the default kernel and oneDNN's prepacked one per matrix, best of
    ``repeats``. Weights stream from memory as in a real step (they do not fit the caches).

    Returns:
        The step's milliseconds and its floating-point operations.
    """
    import torch.nn.functional as F

    from async_llm.engine.runners.fast_linear import prepacked_linear

    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    flops = float(sum(2 * batch * w.shape[0] * w.shape[1] for w in weights))
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}
    packed = [prepacked_linear(w, None, batch) for w in weights]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(max(1, repeats) + 1):  # the first pass warms up
            for kernels in ([lambda x, w=w: F.linear(x, w) for w in weights], packed):
                _sync(device)
                start = time.perf_counter()
                for w, kernel in zip(weights, kernels):
                    kernel(inputs[w.shape[1]])
                _sync(device)
                best = min(best, time.perf_counter() - start)
    return best * 1000.0, flops


def measure(model: Any, workload: Workload, pad: int, device: str, repeats: int = 3) -> dict[str, Any]:
    """Time the bare forwards of ``workload`` (a burst), best of ``repeats`` (after one warm-up pass).

    Returns:
        batch, prompt_width, new_tokens, prefill_ms, decode_step_ms (mean of the decode forwards),
        total_s (prefill + all decode forwards), output_tokens_per_s (N * T / total_s), and the
        matrix products' limit of a decode step (matmul_step_ms, matmul_gflops; see matmul_limit).
    """
    ids, mask, new_tokens = _inputs(workload, pad, device)
    _one_pass(model, ids, mask, min(new_tokens, 4), device)  # warm-up: first-call costs of these shapes
    best: tuple[float, list[float]] | None = None
    for _ in range(max(1, repeats)):
        prefill, steps = _one_pass(model, ids, mask, new_tokens, device)
        if best is None or prefill + sum(steps) < best[0] + sum(best[1]):
            best = (prefill, steps)
    assert best is not None
    prefill, steps = best
    total = prefill + sum(steps)
    n = ids.shape[0]
    matmul_ms, flops = matmul_limit(model, n, device, repeats)
    return {
        "matmul_step_ms": matmul_ms,
        "matmul_gflops": flops / matmul_ms / 1e6 if matmul_ms else None,
        "batch": n,
        "prompt_width": ids.shape[1],
        "new_tokens": new_tokens,
        "repeats": max(1, repeats),
        "prefill_ms": prefill * 1000.0,
        "decode_step_ms": (sum(steps) / len(steps) * 1000.0) if steps else None,
        "total_s": total,
        "output_tokens_per_s": n * new_tokens / total if total > 0 else None,
    }
