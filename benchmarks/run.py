"""The benchmark suite from a checkout: the same as ``async-llm bench`` (see benchmarks/README.md).

python benchmarks/run.py --quick
python benchmarks/run.py --device cuda --out benchmarks/results-cuda
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a checkout without installing: the repository root goes first on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from async_llm.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
