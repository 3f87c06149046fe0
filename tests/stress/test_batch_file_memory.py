"""A batch file of 10,000 lines (times STRESS_SCALE) runs in bounded memory: the process's RSS grows
by less than 64 MiB from 30% of the lines to the end (lines are read as the job goes, at most a
window of requests is in flight, results are written as they complete)."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import psutil
import pytest

from async_llm import HuggingFaceLLM
from async_llm.serve.batch_file import run_batch_file
from tests.stress.conftest import scaled

LIMIT = 64 * 2**20


@pytest.mark.timeout(900)
async def test_a_large_batch_file_runs_in_bounded_memory(tiny_model, tiny_tokenizer, tmp_path: Path):
    count = scaled(10_000, minimum=2_500)
    source, output = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    with source.open("w") as file:
        for i in range(count):
            url, body = (
                ("/v1/embeddings", {"input": f"text {i}"}) if i % 10 == 0
                else ("/v1/completions", {"prompt": f"Request {i}: hello", "max_tokens": 2})
            )  # fmt: skip
            file.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": url, "body": body}) + "\n")
    process = psutil.Process()
    marks: dict[str, int] = {}

    async def watch() -> None:
        while "start" not in marks:
            if output.exists() and output.stat().st_size and sum(1 for _ in output.open()) >= 0.3 * count:
                marks["start"] = process.memory_info().rss
            await anyio.sleep(0.2)

    async with HuggingFaceLLM(model=tiny_model, tokenizer=tiny_tokenizer, device="cpu", max_batch_size=32) as llm:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            summary = await run_batch_file(llm, source, output)
            marks["end"] = process.memory_info().rss
            tg.cancel_scope.cancel()
        assert llm.stats()["num_running"] == 0
    assert (summary.succeeded, summary.failed) == (count, 0)
    assert "start" in marks
    growth = marks["end"] - marks["start"]
    print(f"{count} lines: RSS {marks['start'] / 2**20:.0f} MiB at 30%, {marks['end'] / 2**20:.0f} MiB at the end")
    assert growth < LIMIT, f"RSS grew by {growth / 2**20:.1f} MiB from 30% of the lines to the end"
