"""A short run of the soak script (the full one is `python -m tests.stress.soak`, 30 minutes)."""

from __future__ import annotations

import csv
import json

import anyio
import pytest

from async_llm import HuggingFaceLLM
from tests.stress.conftest import SCALE
from tests.stress.soak import run_soak


async def test_short_soak_keeps_memory_flat(tiny_model, tiny_tokenizer, tmp_path):
    pytest.importorskip("matplotlib")
    seconds = max(6.0, 30 * SCALE)
    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, max_batch_size=8) as llm:
        summary = await run_soak(llm, seconds, interval=seconds / 10, clients=8, out=tmp_path)
        assert llm.stats()["num_failed"] == 0
    rows = list(csv.DictReader((await anyio.Path(tmp_path / "soak.csv").read_text()).splitlines()))
    assert len(rows) >= 3  # sampling every tenth of the run (fewer when the machine is loaded)
    assert [float(r["elapsed_s"]) for r in rows] == sorted(float(r["elapsed_s"]) for r in rows)
    assert sum(float(r["tokens_per_s"]) > 0 for r in rows) >= len(rows) // 2
    assert json.loads((tmp_path / "soak.json").read_text()) == summary
    assert (tmp_path / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["failed"] == 0 and summary["aborted"] > 0
    assert summary["rss_growth_after_warmup"] < 0.05
