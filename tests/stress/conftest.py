"""Stress tests: marked ``stress`` (left out of the quick run); ``STRESS_SCALE`` scales them.

``STRESS_SCALE=1`` (the default) is the full size the reliability figures are quoted at;
``.ci/run`` runs a short version with a smaller scale.
"""

from __future__ import annotations

import os

import pytest

SCALE = float(os.environ.get("STRESS_SCALE", "1"))


def scaled(n: int, minimum: int = 1) -> int:
    return max(minimum, int(n * SCALE))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/stress/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.stress)
