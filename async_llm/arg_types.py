"""Value types for command-line options (``argparse``'s ``type=``), shared by the CLI and the
benchmark suite: each turns the text of one option into its value or raises
:class:`argparse.ArgumentTypeError` with the reason."""

from __future__ import annotations

import argparse
import re

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
