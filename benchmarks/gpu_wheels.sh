#!/usr/bin/env bash
# The wheels a bare GPU machine (Python 3.12; torch, transformers, anyio, pytest there) needs to run
# benchmarks/gpu_check.py --tests: the library's own imports and pytest-asyncio, downloaded into
# .whl/ (ignored by git) for Python 3.12 on x86-64 Linux. On that machine:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out "$OUT" --tests
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl \
    structlog==26.1.0 partial-json-parser==0.2.1.1.post7 platformdirs==4.14.9 sniffio==1.3.1 \
    pytest-asyncio==1.5.0
du -sh .whl && ls .whl
