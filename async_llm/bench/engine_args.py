"""The async_llm systems' engine options on ``async-llm bench``'s command line: the runner and the
static runner's KV budget, as ``async-llm serve`` takes them (the same value types,
:mod:`async_llm.arg_types`), and their defaults for a run.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from async_llm.arg_types import add_runner_args

__all__ = ["ENGINE_FLAGS", "add_engine_args", "engine_options", "workload_context"]

#: The async_llm systems' engine flags (`async-llm serve` has the same), each the HuggingFaceLLM argument
#: (and SystemConfig field) of the same name.
ENGINE_FLAGS = ("runner", "max_model_len", "gpu_memory_utilization", "kv_cache_bytes")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The async_llm systems' engine options; not given, each is the library's default for the device."""
    engine = p.add_argument_group("async_llm engine (the async_llm systems only; default: the library's)")
    add_runner_args(
        engine,
        "static runner: tokens per slot (default: the longest request of the run's workloads, prompt and "
        "output, wherever the static runner runs)",
    )


def workload_context(workloads: Sequence[Any]) -> int:
    """The longest context one request of ``workloads`` needs: prompt tokens plus new tokens (0: none)."""
    return max((len(r.prompt_ids) + r.max_new_tokens for w in workloads for r in w.requests), default=0)


def engine_options(args: argparse.Namespace, workloads: Sequence[Any]) -> dict[str, Any]:
    """The async_llm systems' engine options (:data:`ENGINE_FLAGS`, None: the library's default).

    Wherever the static runner may run (CUDA, or ``--runner static``) and ``--max-model-len`` is not
    given, a slot holds the run's longest request: the library's default (the model's context, up
    to 8192 tokens) would preallocate ``--max-batch-size`` slots of it, gigabytes the workloads never
    touch, on a device whose memory the other systems of the run share. The CPU runners have no
    slots and get nothing they did not get before.
    """
    options = {name: getattr(args, name) for name in ENGINE_FLAGS}
    static_may_run = args.runner == "static" or (args.runner is None and args.device.startswith("cuda"))
    if options["max_model_len"] is None and static_may_run:
        options["max_model_len"] = workload_context(workloads) or None
    return options
