"""Batch files in OpenAI's Batch API format: every route, results equal to direct requests, bad
lines in the error file with their line numbers (the job goes on), a restart that redoes nothing
finished (in process, and after ``kill -9`` of ``async-llm batch``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from async_llm.serve.batch_file import error_path_for, run_batch_file

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def line(custom_id: Any, url: str, body: dict[str, Any], method: str = "POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(text) for text in path.read_text().splitlines()] if path.exists() else []


async def test_every_route_runs_and_bad_lines_go_to_the_error_file(llm, tmp_path: Path):
    source, output = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    source.write_text("\n".join([
        line("chat", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 8}),
        line("text", "/v1/completions", {"prompt": "The quick brown fox", "max_tokens": 8}),
        line("vector", "/v1/embeddings", {"input": ["one", "two"]}),
        "{not json",
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}),
        line("text", "/v1/completions", {"prompt": "again"}),  # a duplicate id
        line("where", "/v1/files", {}),
        line("streamed", "/v1/completions", {"prompt": "x", "stream": True}),
        line("hot", "/v1/completions", {"prompt": "x", "temperature": -1}),
        line("typed", "/v1/completions", {"prompt": 5}),
        "",  # blank lines are skipped, not errors
    ]) + "\n")  # fmt: skip
    with anyio.fail_after(60):
        summary = await run_batch_file(llm, source, output)
        chat = await llm.arun(CHAT, max_tokens=8)
        text = await llm.arun("The quick brown fox", chat_template=False, max_tokens=8)
        vectors = await llm.aembed(["one", "two"])
    assert (summary.succeeded, summary.failed, summary.skipped, summary.lines) == (3, 7, 0, 10)
    results = {r["custom_id"]: r for r in read(output)}
    assert set(results) == {"chat", "text", "vector"}
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in results.values())
    assert results["chat"]["response"]["body"]["choices"][0]["message"]["content"] == chat
    assert results["text"]["response"]["body"]["choices"][0]["text"] == text
    embedded = [d["embedding"] for d in results["vector"]["response"]["body"]["data"]]
    assert len(embedded) == 2 and all(e == pytest.approx(v, abs=1e-6) for e, v in zip(embedded, vectors, strict=True))
    errors = {e["error"]["line"]: e for e in read(error_path_for(output))}
    assert sorted(errors) == [4, 5, 6, 7, 8, 9, 10]
    assert errors[4]["error"]["code"] == "invalid_line" and "not JSON" in errors[4]["error"]["message"]
    assert errors[5]["custom_id"] is None and "custom_id" in errors[5]["error"]["message"]
    assert errors[6]["error"]["code"] == "duplicate_custom_id"
    assert "/v1/files" in errors[7]["error"]["message"] and "stream" in errors[8]["error"]["message"]
    # A body the API refuses: its 400, as the server would answer it, naming the parameter.
    assert (
        errors[9]["response"]["status_code"] == 400 and errors[9]["response"]["body"]["error"]["param"] == "temperature"
    )
    assert errors[10]["response"]["status_code"] == 400 and errors[10]["custom_id"] == "typed"
    assert llm.stats()["num_running"] == 0 and llm.stats()["num_waiting"] == 0


async def test_a_restart_skips_finished_lines_and_redoes_a_line_cut_off_by_a_crash(llm, tmp_path: Path):
    source, output = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    source.write_text(
        "\n".join(line(f"r{i}", "/v1/completions", {"prompt": f"Line {i}", "max_tokens": 3}) for i in range(20)) + "\n"
    )
    with anyio.fail_after(60):
        await run_batch_file(llm, source, output, window=4)
    kept = output.read_text().splitlines()[:12]
    output.write_text("\n".join(kept) + "\n" + kept[12 - 1][:40])  # 12 whole lines, then a cut-off one
    before = llm.stats()["num_finished"]
    with anyio.fail_after(60):
        summary = await run_batch_file(llm, source, output, window=4)
    assert (summary.skipped, summary.succeeded) == (12, 8)
    assert llm.stats()["num_finished"] - before == 8  # nothing finished was run again
    ids = [r["custom_id"] for r in read(output)]  # the cut-off line was dropped, every line is whole
    assert sorted(ids) == sorted(f"r{i}" for i in range(20)) and len(ids) == 20


async def test_missing_input_and_a_bad_window_are_clear_errors(llm, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no batch input"):
        await run_batch_file(llm, tmp_path / "none.jsonl", tmp_path / "out.jsonl")
    (tmp_path / "in.jsonl").write_text("")
    with pytest.raises(ValueError, match="window"):
        await run_batch_file(llm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", window=0)


@pytest.mark.timeout(240)
def test_the_command_resumes_after_a_kill_without_redoing_lines(tiny_model_dir: Path, tmp_path: Path):
    source, output = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    count = 300
    body = {"prompt": "Tell me", "max_tokens": 24, "ignore_eos": True}
    source.write_text("\n".join(line(f"r{i}", "/v1/completions", body) for i in range(count)) + "\n")
    command = [sys.executable, "-m", "async_llm.cli", "batch", "-i", str(source), "-o", str(output),
               "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress", "--window", "8"]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(read_lines(output)) < 20:  # let it write some results, then kill it mid-job
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended early"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait()
    done_before = {json.loads(t)["custom_id"] for t in read_lines(output) if t.endswith("}")}
    assert 20 <= len(done_before) < count
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr
    assert f"{len(done_before)} already done" in second.stderr
    ids = [r["custom_id"] for r in read(output)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(count)) and len(ids) == count  # each once


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
