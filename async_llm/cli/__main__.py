"""``python -m async_llm.cli``: the ``async-llm`` command."""

from __future__ import annotations

import sys

from async_llm.cli import main

if __name__ == "__main__":  # pragma: no cover - run as a program only
    sys.exit(main())
