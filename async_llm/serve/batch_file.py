"""Batch files in OpenAI's Batch API format, run through one engine (``async-llm batch``).

Each input line is ``{"custom_id", "method": "POST", "url", "body"}`` with ``url`` one of
``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``. Each result line is OpenAI's:

    {"id": "batch_req_...", "custom_id": ..., "response": {"status_code": 200, "request_id": ...,
     "body": {...}}, "error": null}

Requests that fail (a body the API refuses, a generation error) and lines that cannot be read (not
JSON, no ``custom_id``, a ``custom_id`` seen before, an unknown ``url`` or ``method``, a streaming
body) go to the error file instead, with ``error: {"code", "message", "line"}`` (and the response
the API gave, where there was one); the job goes on.

Memory is bounded whatever the file's size: lines are read as the job goes, at most ``window``
requests are in flight, and each result is written (and flushed) as it completes, so a crash never
truncates the output. A restart skips the ``custom_id`` values already in the output and error
files (a last line cut off by the crash is removed first), so finished lines are not redone.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pydantic

from async_llm.llm.huggingface import HuggingFaceLLM
from async_llm.log import get_logger
from async_llm.serve.errors import APIError, from_exception, from_validation_errors
from async_llm.serve.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from async_llm.serve.serving import OpenAIServing

__all__ = ["BATCH_URLS", "BatchSummary", "error_path_for", "run_batch_file"]

log = get_logger("async_llm.serve.batch")

#: The routes a batch line may name.
BATCH_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


@dataclass
class BatchSummary:
    """What one run of a batch file did."""

    succeeded: int = 0
    failed: int = 0
    skipped: int = 0  # lines already in the output or error file (a restart)
    lines: int = 0
    failures: list[str] = field(default_factory=list)  # the first few failures' messages


def error_path_for(output: Path) -> Path:
    """The default error file: ``results.jsonl`` -> ``results.errors.jsonl``."""
    return output.with_name(f"{output.stem}.errors{output.suffix or '.jsonl'}")


def _finished_ids(path: Path) -> set[str]:
    """``custom_id`` values of the complete lines of ``path``, read line by line (a large file is
    never held whole); a cut-off last line is removed."""
    done: set[str] = set()
    if not path.exists():
        return done
    with path.open("rb+") as file:
        whole = 0  # bytes of complete lines read so far
        for raw in file:
            if not raw.endswith(b"\n"):  # the last line was cut off by a crash: drop it, redo that request
                file.truncate(whole)
                break
            whole += len(raw)
            try:
                custom_id = json.loads(raw).get("custom_id")
            except (ValueError, AttributeError):
                continue
            if isinstance(custom_id, str):
                done.add(custom_id)
    return done


class _Writer:
    """Appends lines to a file, one at a time, each flushed at once (``os.fsync`` is left to the OS)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None
        self._lock = anyio.Lock()

    async def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        async with self._lock:
            if self._file is None:
                self._file = await anyio.open_file(self.path, "a", encoding="utf-8")
            await self._file.write(line)
            await self._file.flush()

    async def aclose(self) -> None:
        if self._file is not None:
            await self._file.aclose()


async def run_batch_file(
    llm: HuggingFaceLLM,
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    error_path: str | os.PathLike[str] | None = None,
    *,
    window: int | None = None,
    progress: bool = False,
    model_name: str | None = None,
) -> BatchSummary:
    """Run every line of ``input_path`` through ``llm``; results to ``output_path`` (see the module).

    Args:
        llm: The engine (open; it stays open).
        input_path: OpenAI Batch API lines (JSONL).
        output_path: Result lines, appended (a restart continues it).
        error_path: Failed lines (default: ``<output>.errors.jsonl``).
        window: Requests in flight at most (default: the engine's batch window).
        progress: A tqdm bar on stderr.
        model_name: The model name bodies may give (default: the engine's).

    Returns:
        The counts of this run.

    Raises:
        FileNotFoundError: No input file.
        ValueError: ``window`` below 1.
    """
    source = Path(input_path)
    output = Path(output_path)
    errors = Path(error_path) if error_path is not None else error_path_for(output)
    window = window if window is not None else llm._batch_window()
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    serving = OpenAIServing(llm, model_name=model_name)
    done, total = await anyio.to_thread.run_sync(_prepare, source, output, errors, progress)
    results, failures = _Writer(output), _Writer(errors)
    summary = BatchSummary()
    seen: set[str] = set()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="batch", unit="request")

    async def fail(line: int, custom_id: Any, code: str, message: str, response: dict[str, Any] | None) -> None:
        summary.failed += 1
        if len(summary.failures) < 10:
            summary.failures.append(f"line {line}: {message}")
        record = {
            "id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response,
            "error": {"code": code, "message": message, "line": line},
        }  # fmt: skip
        await failures.write(record)

    async def run_one(line: int, custom_id: str, url: str, body: dict[str, Any]) -> None:
        try:
            if url == "/v1/chat/completions":
                answer = await serving.chat_completion(ChatCompletionRequest.model_validate(body))
            elif url == "/v1/completions":
                answer = await serving.completion(CompletionRequest.model_validate(body))
            else:
                answer = await serving.embeddings(EmbeddingRequest.model_validate(body))
        except pydantic.ValidationError as exc:  # the body's 400, as the server answers it
            error = from_validation_errors(exc.errors())
            await fail(line, custom_id, "invalid_request", error.message, _response(400, error.body()))
        except Exception as exc:  # noqa: BLE001  # one line fails; the job goes on
            error = exc if isinstance(exc, APIError) else from_exception(exc)
            await fail(line, custom_id, error.code or "error", error.message, _response(error.status, error.body()))
        else:
            summary.succeeded += 1
            record = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": _response(200, answer)}
            await results.write({**record, "error": None})
        finally:
            if bar is not None:
                bar.update(1)

    slots = anyio.Semaphore(window)

    async def guarded(*args: Any) -> None:
        try:
            await run_one(*args)
        finally:
            slots.release()

    try:
        async with anyio.create_task_group() as tg, await anyio.open_file(source, encoding="utf-8") as lines:
            number = 0
            async for text in lines:
                number += 1
                if not text.strip():
                    continue
                summary.lines += 1
                parsed = _parse(text)
                custom_id = parsed.custom_id
                if parsed.error is not None:
                    if custom_id is not None and custom_id in done:
                        summary.skipped += 1
                    else:
                        await fail(number, custom_id, "invalid_line", parsed.error, None)
                    if bar is not None:
                        bar.update(1)
                    continue
                assert custom_id is not None
                if custom_id in seen:
                    why = f"custom_id {custom_id!r} was used by an earlier line"
                    await fail(number, custom_id, "duplicate_custom_id", why, None)
                    if bar is not None:
                        bar.update(1)
                    continue
                seen.add(custom_id)
                if custom_id in done:
                    summary.skipped += 1
                    if bar is not None:
                        bar.update(1)
                    continue
                await slots.acquire()  # at most `window` requests in flight: memory stays bounded
                tg.start_soon(guarded, number, custom_id, parsed.url, parsed.body)
    finally:
        await results.aclose()
        await failures.aclose()
        if bar is not None:
            bar.close()
    log.info(
        "batch done", succeeded=summary.succeeded, failed=summary.failed, skipped=summary.skipped,
        output=str(output), errors=str(errors),
    )  # fmt: skip
    return summary


def _prepare(source: Path, output: Path, errors: Path, count: bool) -> tuple[set[str], int | None]:
    """What a run starts from (blocking file work, run in a worker thread): the ids already
    finished, and the number of lines when a progress bar needs it."""
    if not source.is_file():
        raise FileNotFoundError(f"no batch input file at {source}")
    done = _finished_ids(output) | _finished_ids(errors)
    total = None
    if count:
        with source.open("rb") as lines:
            total = sum(1 for line in lines if line.strip())
    return done, total


@dataclass
class _Line:
    """One input line as read: its ``custom_id`` (any string the line gave, even on a bad line, so
    a restart can recognise it), and either why it cannot run or its ``url`` and ``body``."""

    custom_id: str | None
    error: str | None = None
    url: str = ""
    body: dict[str, Any] = field(default_factory=dict)


def _parse(text: str) -> _Line:
    """A line's ``custom_id``, ``url`` and ``body``, or why it cannot be run."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        return _Line(None, f"the line is not JSON: {exc}")
    if not isinstance(value, dict):
        return _Line(None, "the line is not a JSON object")
    custom_id = value.get("custom_id")
    if not isinstance(custom_id, str):
        custom_id = None
    if not custom_id:
        return _Line(custom_id, "the line has no custom_id (a non-empty string)")
    method = value.get("method", "POST")
    if method != "POST":
        return _Line(custom_id, f"method must be POST, got {method!r}")
    url = value.get("url")
    if url not in BATCH_URLS:
        return _Line(custom_id, f"url must be one of {', '.join(BATCH_URLS)}, got {url!r}")
    body = value.get("body")
    if not isinstance(body, dict):
        return _Line(custom_id, "the line has no body (a JSON object)")
    if body.get("stream"):
        return _Line(custom_id, "stream is not available in a batch: results are written whole")
    return _Line(custom_id, None, url, body)


def _response(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """A result line's ``response``: the API's status and body, under a request id of its own."""
    return {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body}
