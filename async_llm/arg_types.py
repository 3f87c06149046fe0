"""Command-line options shared by the CLI and the benchmark suite: value types (``argparse``'s
``type=``, each turns the text of one option into its value or raises
:class:`argparse.ArgumentTypeError` with the reason) and the runner's flags."""

from __future__ import annotations

import argparse
import re

from async_llm.engine.config import RUNNERS  # light: the engine's options, no torch

_BYTE_UNITS = {"": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text}")
    return value


def byte_size(text: str) -> int:
    """A size in bytes: ``8589934592``, ``8GiB``, ``512 MiB`` (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]i[bB])?\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected bytes, or a size with KiB, MiB or GiB, got {text!r}")
    value = int(float(match.group(1)) * _BYTE_UNITS[(match.group(2) or "").lower()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value


def add_runner_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, max_model_len_help: str) -> None:
    """``--runner``, ``--max-model-len`` and the static runner's budget (``--gpu-memory-utilization``
    or ``--kv-cache-bytes``), each None when not given (the library's default)."""
    parser.add_argument(
        "--runner", choices=RUNNERS, default=None,
        help="model runner (default: static on CUDA, else fast where the model supports it, else transformers)",
    )  # fmt: skip
    parser.add_argument("--max-model-len", type=positive_int, default=None, help=max_model_len_help)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--gpu-memory-utilization", type=fraction, default=None,
        help="static runner: share of the device's memory for weights, KV store and activations (default 0.9 on CUDA)",
    )  # fmt: skip
    budget.add_argument(
        "--kv-cache-bytes", type=byte_size, default=None,
        help="static runner: KV store size, e.g. 8GiB, 512MiB or bytes (default: from --gpu-memory-utilization)",
    )  # fmt: skip
