"""What a new user meets first: wrong model paths, stray output on stderr, Ctrl-C under ``serve``,
a port in use, progress lines, and start-up time (the start-up checks' cache, deferred imports).

Covers async_llm.loading (paths, quiet, check_cache), async_llm.log, async_llm.cli,
async_llm.serve.server and the shutdown of streams in async_llm.serve.openai_app.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import async_llm
from async_llm import HuggingFaceLLM, ModelNotAvailableError, cli
from async_llm.engine.runners import fast_check
from async_llm.loading import gguf
from async_llm.loading.check_cache import CheckCache
from async_llm.loading.loading import resolve_model_path
from async_llm.loading.paths import ModelNotFoundError, check_model_id
from async_llm.loading.quiet import GGUF_READER_MODULE, quiet_progress
from async_llm.serve.limits import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES
from async_llm.serve.openai_app import _sse_data
from async_llm.serve.server import bind_listener
from async_llm.serve.serving import ChunkStream

LOADING_LINE = re.compile(r"^loading (?P<name>\S+)\.\.\. done \(\d+\.\d s\)$")


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, empty cache root (converted GGUF files, start-up check verdicts) for one test."""
    root = tmp_path / "cache"
    monkeypatch.setenv(gguf.CACHE_ENV_VAR, str(root))
    return root


def _stderr_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# 1. A model_id that names no model says what was looked for and where.


def test_missing_path_says_what_was_expected(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(ModelNotFoundError) as info:
        check_model_id(str(missing))
    message = str(info.value)
    assert message.startswith(f"no model at {str(missing)!r}: the path does not exist")
    assert "a .gguf file, or a Hugging Face hub id like 'org/name'" in message
    # One error, three ways to catch it: the library's model error, a ValueError, a parameter error.
    assert isinstance(info.value, ModelNotAvailableError) and isinstance(info.value, ValueError)
    assert info.value.param == "model_id"


def test_file_that_is_not_a_model(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelNotFoundError, match=r"notes\.txt' is not a model: expected a folder with config\.json"):
        check_model_id(text)


def test_folder_without_config_and_one_holding_a_gguf(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="it has no config.json"):
        check_model_id(tmp_path)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="it holds 'model.gguf': pass that file"):
        check_model_id(tmp_path)


def test_model_folder_without_tokenizer(tmp_path: Path, tiny_model: Any) -> None:
    folder = tmp_path / "weights-only"
    tiny_model.save_pretrained(folder)
    with pytest.raises(ModelNotFoundError) as info:
        check_model_id(folder)
    assert str(info.value).startswith(f"{str(folder)!r} has a model but no tokenizer (looked for tokenizer.json, ")


def test_gguf_paths_are_checked_before_converting(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="the file does not exist"):
        check_model_id(tmp_path / "absent.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(random.Random(0).randbytes(256))
    with pytest.raises(ModelNotFoundError, match="is not a GGUF file: it does not start with the GGUF magic bytes"):
        check_model_id(fake)


@pytest.mark.parametrize("hub_id", ["gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "org/name"])
def test_hub_ids_still_go_to_the_hub(hub_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # so that no local folder of that name exists
    check_model_id(hub_id)
    assert resolve_model_path(hub_id) == hub_id


def test_llm_with_a_missing_path_raises_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no model at"):
        HuggingFaceLLM(model_id=str(tmp_path / "absent"), device="cpu")


@pytest.mark.parametrize("case", ["missing", "text file", "no tokenizer", "random .gguf"])
def test_cli_wrong_model_exits_2_with_one_clear_line(
    case: str, tmp_path: Path, tiny_model: Any, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "thing"
    expected = {
        "missing": "the path does not exist",
        "text file": "is not a model",
        "no tokenizer": "has a model but no tokenizer",
        "random .gguf": "is not a GGUF file",
    }[case]
    if case == "text file":
        path.write_text("hi")
    elif case == "no tokenizer":
        tiny_model.save_pretrained(path)
    elif case == "random .gguf":
        path = tmp_path / "corrupt.gguf"
        path.write_bytes(random.Random(1).randbytes(4096))
    capsys.readouterr()  # drop what saving the test's folder printed
    assert cli.main(["generate", "hi", "--model", str(path)]) == 2
    (line,) = _stderr_lines(capsys.readouterr().err)  # no progress line, log line or traceback
    assert line.startswith("async-llm: error: ") and str(path) in line and expected in line
    assert "Repo id" not in line


# ---------------------------------------------------------------------------------------------
# 2. Nothing on stderr from the library unless the application configured logging.


def test_unreadable_gguf_shows_no_log_line(tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file with GGUF's magic bytes that transformers cannot read: the progress line ends with
    'failed', the error follows, and no JSON log line comes between (the failure is raised, not
    logged as a warning)."""
    path = tmp_path / "truncated.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + random.Random(2).randbytes(24))
    assert cli.main(["generate", "hi", "--model", str(path)]) == 2
    progress, error = _stderr_lines(capsys.readouterr().err)
    assert progress.startswith("converting truncated.gguf to a transformers folder") and progress.endswith("failed")
    assert error.startswith("async-llm: error: cannot read 'truncated.gguf' as a model")
    assert gguf.cached_conversion(path) is None


def _run_python(code: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_library_is_silent_and_imports_no_server_until_serving() -> None:
    """In a fresh interpreter with no logging configured, the library's warnings and errors print
    nothing (Python's last-resort handler would print them); and importing the package or building
    the command's parser imports no web server or Ray."""
    result = _run_python(
        """
        import sys
        import async_llm
        from async_llm import cli
        from async_llm.log import get_logger

        get_logger("async_llm.loading.gguf").warning("gguf.conversion_failed", gguf="x.gguf")
        get_logger("async_llm").error("failed", request_id="r1")
        cli.build_parser()
        heavy = ("fastapi", "uvicorn", "starlette", "sse_starlette", "ray")
        print(sorted(name for name in heavy if name in sys.modules))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.strip() == "[]"


def test_cli_shows_library_warnings_as_readable_lines() -> None:
    message = '{"error": "boom", "event": "x", "level": "warning", "logger": "async_llm.serve"}'
    record = logging.LogRecord("async_llm.serve", logging.WARNING, __file__, 1, message, None, None)
    assert cli._ReadableEvents().format(record) == "async-llm: warning: x (error=boom)"


# ---------------------------------------------------------------------------------------------
# 3. serve: a port in use is found before the model loads; Ctrl-C ends open streams properly.


def test_bind_listener_reports_a_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}: the port is in use") as info:
            bind_listener("127.0.0.1", port)
        assert "Errno" not in str(info.value)
    free = bind_listener("127.0.0.1", 0)
    free.close()


def test_serve_on_a_port_in_use_exits_2_before_loading(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model must not load when the port is taken")

    monkeypatch.setattr(async_llm, "HuggingFaceLLM", no_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--model", str(tiny_model_dir), "--port", str(port)]) == 2
    (line,) = _stderr_lines(capsys.readouterr().err)
    assert line == f"async-llm: error: cannot listen on 127.0.0.1:{port}: the port is in use (another server?); " + (
        "choose one with --port"
    )


async def test_open_stream_ends_with_an_error_event_and_done_on_shutdown() -> None:
    finished = anyio.Event()

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        try:
            yield {"n": 1}
            await anyio.Event().wait()  # a request still generating
        finally:
            finished.set()

    shutdown = anyio.Event()
    data = _sse_data(ChunkStream(chunks(), []), shutdown)
    with anyio.fail_after(10):
        assert json.loads(await anext(data)) == {"n": 1}
        pending = asyncio.ensure_future(anext(data))
        await asyncio.sleep(0.05)
        assert not pending.done()
        shutdown.set()
        error = json.loads(await pending)["error"]
        assert (error["type"], error["code"]) == ("service_unavailable", "server_shutting_down")
        assert error["message"].startswith("server shutting down")
        assert finished.is_set()  # the chunk generator was closed: its requests are aborted
        assert await anext(data) == "[DONE]"
        with pytest.raises(StopAsyncIteration):
            await anext(data)


async def test_stream_without_shutdown_ends_with_done() -> None:
    async def chunks() -> AsyncIterator[dict[str, Any]]:
        for n in range(3):
            yield {"n": n}

    with anyio.fail_after(10):
        items = [item async for item in _sse_data(ChunkStream(chunks(), []), anyio.Event())]
    assert [json.loads(i) for i in items[:-1]] == [{"n": 0}, {"n": 1}, {"n": 2}] and items[-1] == "[DONE]"


# Runs `async-llm serve` with every engine step slowed down, so that a stream is still running when
# the server gets SIGINT (the tiny model would otherwise finish before the signal arrives).
SLOW_SERVE = """
import sys, time
from async_llm.engine import core

step = core.Engine._step
core.Engine._step = lambda self, *a, **k: (time.sleep(0.02), step(self, *a, **k))[1]
from async_llm.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_serve_ctrl_c_ends_open_streams_with_an_error_event(tiny_model_dir: Path, cache_dir: Path) -> None:
    import httpx

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    argv = [sys.executable, "-c", SLOW_SERVE, "serve", "--model", str(tiny_model_dir), "--port", "0"]
    server = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert server.stderr is not None
        head: list[str] = []
        port = None
        while port is None:
            line = server.stderr.readline()
            assert line, f"the server stopped before it listened: {''.join(head)}"
            head.append(line)
            if found := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line):
                port = int(found.group(1))
        assert LOADING_LINE.match(head[0].strip()), head
        body = {"prompt": "hi", "max_tokens": 900, "ignore_eos": True, "stream": True}
        events: list[str] = []
        url = f"http://127.0.0.1:{port}/v1/completions"
        with httpx.Client(timeout=60) as http, http.stream("POST", url, json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    if len(events) == 2:
                        server.send_signal(signal.SIGINT)
        rest = server.communicate(timeout=60)[1]
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "server_shutting_down", events[-3:]
    assert all("error" not in json.loads(e) for e in events[:-2])  # tokens until the shutdown, then the error
    assert "ASGI callable returned without completing response" not in rest
    assert "Traceback" not in rest
    assert server.returncode == 130 and rest.rstrip().endswith("interrupted")


# ---------------------------------------------------------------------------------------------
# 4. One progress line of the command's own, no progress bars from transformers.


def _bars_enabled() -> bool:
    from transformers.utils import logging as hf_logging

    return hf_logging.is_progress_bar_enabled()


@pytest.mark.skipif(not _bars_enabled(), reason="transformers' progress bars are off in this environment")
def test_quiet_progress_silences_bars_of_this_thread_only() -> None:
    import importlib

    from transformers.utils import logging as hf_logging

    gguf_reader = importlib.import_module(GGUF_READER_MODULE)
    original_gguf_tqdm = gguf_reader.tqdm
    other: list[bool] = []
    if not hf_logging.is_progress_bar_enabled():  # turned off for the process by an earlier test (the bench's)
        hf_logging.enable_progress_bar()
    with quiet_progress():
        assert hf_logging.tqdm(range(2), file=io.StringIO()).disable
        assert gguf_reader.tqdm(range(2), file=io.StringIO()).disable
        thread = threading.Thread(target=lambda: other.append(hf_logging.tqdm(range(2), file=io.StringIO()).disable))
        thread.start()
        thread.join()
        with quiet_progress():  # nested (a GGUF conversion inside a load)
            pass
        assert hf_logging.tqdm(range(2), file=io.StringIO()).disable  # still inside the outer block
    assert other == [False]
    assert not hf_logging.tqdm(range(2), file=io.StringIO()).disable
    assert gguf_reader.tqdm is original_gguf_tqdm


@pytest.mark.skipif(not _bars_enabled(), reason="transformers' progress bars are off in this environment")
async def test_loading_draws_no_progress_bars(
    tiny_model_dir: Path, cache_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    async with HuggingFaceLLM(model_id=str(tiny_model_dir), device="cpu", max_tokens=2) as llm:
        await llm.arun("hi")
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err, err


def test_cli_prints_one_loading_line(tiny_model_dir: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "hi", "--model", str(tiny_model_dir), "--max-tokens", "2"]) == 0
    (line,) = _stderr_lines(capsys.readouterr().err)
    match = LOADING_LINE.match(line)
    assert match and match["name"] == tiny_model_dir.name, line


def test_cli_loading_line_is_whole_when_logs_are_shown(
    tiny_model_dir: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["-v", "generate", "hi", "--model", str(tiny_model_dir), "--max-tokens", "2"]) == 0
    lines = _stderr_lines(capsys.readouterr().err)
    assert sum(bool(LOADING_LINE.match(line)) for line in lines) == 1
    assert all(line.startswith("{") or LOADING_LINE.match(line) for line in lines), lines


# ---------------------------------------------------------------------------------------------
# 5. Start-up time: the checks that run the model are skipped once their verdict is stored.


@pytest.fixture
def check_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the fast step's check forwards (``fast_check._difference``)."""
    runs: list[int] = []
    real = fast_check._difference

    def counted(*args: Any, **kwargs: Any) -> float:
        runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fast_check, "_difference", counted)
    return runs


def _started(**kwargs: Any) -> HuggingFaceLLM:
    """An LLM whose engine has run its start-up checks (they run on the engine thread)."""
    llm = HuggingFaceLLM(device="cpu", **kwargs)
    assert llm.engine.ready.wait(60)
    return llm


def _verdict_files(cache_dir: Path, check: str = "fast_decode") -> list[Path]:
    """The stored verdicts of one start-up check (the prefill's checks are stored beside it)."""

    def of_check(path: Path) -> bool:
        try:
            return bool(json.loads(path.read_text()).get("check") == check)
        except (ValueError, AttributeError):
            return False

    return [path for path in sorted((cache_dir / "checks").glob("*.json")) if of_check(path)]


def test_check_verdict_is_stored_and_reused(tiny_model_dir: Path, cache_dir: Path, check_runs: list[int]) -> None:
    with _started(model_id=str(tiny_model_dir)) as first:
        assert first.engine.runner.name == "fast"
    assert len(check_runs) == 1
    (stored,) = _verdict_files(cache_dir)
    assert json.loads(stored.read_text())["verdict"] is None  # None: the fast step applies
    with _started(model_id=str(tiny_model_dir)) as second:
        assert second.engine.runner.name == "fast"
    assert len(check_runs) == 1  # the second start ran no check forward


def test_stored_refusal_is_honoured(tiny_model_dir: Path, cache_dir: Path, check_runs: list[int]) -> None:
    _started(model_id=str(tiny_model_dir)).close()
    (stored,) = _verdict_files(cache_dir)
    record = json.loads(stored.read_text())
    stored.write_text(json.dumps({**record, "verdict": "refused in an earlier start"}))
    with _started(model_id=str(tiny_model_dir)) as llm:
        assert llm.engine.runner.name != "fast"
    assert len(check_runs) == 1


@pytest.mark.parametrize("garbage", ["{not json", '{"format": "async_llm.check", "version": 1}', "[]"])
def test_corrupt_verdict_runs_the_check_again(
    garbage: str, tiny_model_dir: Path, cache_dir: Path, check_runs: list[int]
) -> None:
    _started(model_id=str(tiny_model_dir)).close()
    (stored,) = _verdict_files(cache_dir)
    stored.write_text(garbage)
    with _started(model_id=str(tiny_model_dir)) as llm:
        assert llm.engine.runner.name == "fast"
    assert len(check_runs) == 2
    assert json.loads(stored.read_text())["verdict"] is None  # rewritten


def test_changed_model_files_are_checked_again(
    tiny_model_dir: Path, tmp_path: Path, cache_dir: Path, check_runs: list[int]
) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, folder)
    _started(model_id=str(folder)).close()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    _started(model_id=str(folder)).close()
    assert len(check_runs) == 2 and len(_verdict_files(cache_dir)) == 2


def test_models_passed_as_objects_are_always_checked(
    tiny_model: Any, tiny_tokenizer: Any, cache_dir: Path, check_runs: list[int]
) -> None:
    for _ in range(2):
        _started(model=tiny_model, tokenizer=tiny_tokenizer).close()
    assert len(check_runs) == 2
    assert not (cache_dir / "checks").exists()


def test_unwritable_cache_only_costs_the_check(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, check_runs: list[int]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(gguf.CACHE_ENV_VAR, str(blocker))  # <file>/checks cannot be created
    for _ in range(2):
        with _started(model_id=str(tiny_model_dir)) as llm:
            assert llm.engine.runner.name == "fast"
    assert len(check_runs) == 2


def test_check_cache_keys_on_context_and_refuses_odd_verdicts(tmp_path: Path) -> None:
    cache = CheckCache({"files": "abc"}, root=tmp_path)
    assert cache.get("c", {"device": "cpu"}) is None
    cache.put("c", {"device": "cpu"}, "why not")
    assert cache.get("c", {"device": "cpu"}) == {"verdict": "why not"}
    assert cache.get("c", {"device": "cuda"}) is None
    assert cache.get("other", {"device": "cpu"}) is None
    assert CheckCache({"files": "abd"}, root=tmp_path).get("c", {"device": "cpu"}) is None
    path = cache.path("c", {"device": "cpu"})
    path.write_text(json.dumps({"format": "async_llm.check", "version": 1, "check": "c", "verdict": [1]}))
    assert cache.get("c", {"device": "cpu"}) is None


def test_serve_help_shows_the_server_limits() -> None:
    """The parser states the limits without importing the server (see cli._MAX_BODY_HELP)."""
    assert DEFAULT_MAX_BODY_BYTES % 2**20 == 0
    assert f"{DEFAULT_MAX_BODY_BYTES // 2**20} MiB" == cli._MAX_BODY_HELP
    assert float(cli._BODY_TIMEOUT_HELP) == DEFAULT_BODY_TIMEOUT_S
