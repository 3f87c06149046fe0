"""``HuggingFaceLLM.aembed``: embeddings from the served causal LM (see :mod:`async_llm.engine.embedding`).

Inputs are checked (types, emptiness, the model's context) before anything runs, each error naming
the input's index. Calls made at the same time are merged into shared forwards, as the engine
batches generation (:class:`_Batcher`): the forwards run in a worker thread, never on the event
loop, in batches of similar lengths (sorted, so little is padded), one at a time per model, beside
the generation engine's own steps.

Pooling: ``pooling=None`` reads the model folder's sentence-transformers pooling config
(``modules.json`` and its ``Pooling`` module: ``pooling_mode_lasttoken`` or
``pooling_mode_mean_tokens``) and falls back to the last token, the usual choice for causal LMs.
"""

from __future__ import annotations

import asyncio
import json
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from async_llm.engine.embedding import POOLINGS, embed_rows, finish, hidden_size
from async_llm.errors import InvalidParameterError, ParameterTypeError

__all__ = ["DEFAULT_EMBED_BATCH", "Embeddings", "EmbeddingInput", "embed", "folder_pooling"]

#: Inputs per forward.
DEFAULT_EMBED_BATCH = 32

EmbeddingInput = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]

_locks: dict[int, threading.Lock] = {}
_locks_guard = threading.Lock()


@dataclass(frozen=True)
class Embeddings:
    """One :func:`embed` call's result: a vector per input, in order, and the tokens read."""

    vectors: list[list[float]]
    prompt_tokens: int


def folder_pooling(model_id: str | None) -> str | None:
    """The pooling a sentence-transformers folder declares (``"last"``/``"mean"``), or None."""
    if not model_id:
        return None
    folder = Path(model_id)
    modules = folder / "modules.json"
    if not modules.is_file():
        return None
    try:
        entries = json.loads(modules.read_text())
        for entry in entries:
            if str(entry.get("type", "")).endswith("Pooling"):
                config = json.loads((folder / entry.get("path", "") / "config.json").read_text())
                if config.get("pooling_mode_lasttoken"):
                    return "last"
                if config.get("pooling_mode_mean_tokens"):
                    return "mean"
    except (OSError, ValueError, AttributeError):
        return None
    return None


def _rows(llm: Any, inputs: EmbeddingInput) -> list[list[int]]:
    if isinstance(inputs, str):
        items: list[Any] = [inputs]
    elif (
        isinstance(inputs, Sequence) and inputs and all(isinstance(x, int) and not isinstance(x, bool) for x in inputs)
    ):
        items = [list(inputs)]  # one input as token ids
    elif isinstance(inputs, Sequence):
        items = list(inputs)
    else:
        raise ParameterTypeError(
            "input", f"input must be a str, a list of str or token ids, got {type(inputs).__name__}"
        )
    if not items:
        raise InvalidParameterError("input", "input is empty: give at least one text")
    rows: list[list[int]] = []
    limit = llm.max_context
    vocab = llm.engine.vocab_size
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids = list(llm.tokenizer(item).input_ids)
        elif isinstance(item, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            ids = list(item)
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidParameterError(
                    f"input[{i}]", f"input[{i}] has token ids outside the vocabulary (0..{vocab - 1})"
                )
        else:
            raise ParameterTypeError(f"input[{i}]", f"input[{i}] must be a str or a list of token ids")
        if not ids:
            raise InvalidParameterError(f"input[{i}]", f"input[{i}] is empty")
        if limit is not None and len(ids) > limit:
            raise InvalidParameterError(
                f"input[{i}]", f"input[{i}] has {len(ids)} tokens; the model reads at most {limit}"
            )
        rows.append(ids)
    return rows


async def embed(
    llm: Any,
    inputs: EmbeddingInput,
    *,
    pooling: str | None = None,
    normalize: bool = True,
    dimensions: int | None = None,
    batch_size: int = DEFAULT_EMBED_BATCH,
) -> Embeddings:
    """Embed ``inputs`` with ``llm``'s model (see :meth:`HuggingFaceLLM.aembed`)."""
    if pooling is not None and pooling not in POOLINGS:
        raise InvalidParameterError("pooling", f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if not isinstance(normalize, bool):
        raise ParameterTypeError("normalize", f"normalize must be a bool, got {normalize!r}")
    size = hidden_size(llm.model)
    if dimensions is not None:
        if isinstance(dimensions, bool) or not isinstance(dimensions, int):
            raise ParameterTypeError("dimensions", f"dimensions must be an int, got {dimensions!r}")
        if not 1 <= dimensions <= size:
            raise InvalidParameterError(
                "dimensions", f"dimensions must be in 1..{size} (the model's width), got {dimensions}"
            )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidParameterError("batch_size", f"batch_size must be an int >= 1, got {batch_size!r}")
    rows = _rows(llm, inputs)
    how = pooling or folder_pooling(llm.model_id) or "last"
    job = _Job(rows, how, normalize, dimensions, batch_size, asyncio.get_running_loop().create_future())
    return Embeddings(await _batcher(llm).submit(job), sum(len(r) for r in rows))


@dataclass(eq=False)
class _Job:
    """One :func:`embed` call waiting for its vectors."""

    rows: list[list[int]]
    pooling: str
    normalize: bool
    dimensions: int | None
    batch_size: int
    future: asyncio.Future[list[list[float]]]
    vectors: list[list[float] | None] = field(default_factory=list)
    left: int = 0


class _Batcher:
    """The embedding calls of one model on one event loop, merged into shared forwards.

    While a forward runs (in a worker thread), new calls wait; the next forward takes the rows of
    every call waiting, shortest first, ``batch_size`` rows at a time (the smallest any of them
    asked for). A call is answered as soon as its own rows are done; a cancelled call's rows are
    dropped before they run. Forwards of one model never overlap (one lock per model, whatever the
    loop), and run beside the generation engine's steps.
    """

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.pending: list[_Job] = []
        self.draining = False
        with _locks_guard:
            self.lock = _locks.setdefault(id(llm.model), threading.Lock())

    async def submit(self, job: _Job) -> list[list[float]]:
        job.vectors, job.left = [None] * len(job.rows), len(job.rows)
        self.pending.append(job)
        if not self.draining:
            self.draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await job.future

    async def _drain(self) -> None:
        try:
            while self.pending:
                jobs, self.pending = [j for j in self.pending if not j.future.done()], []
                items = sorted(
                    ((j, k) for j in jobs for k in range(len(j.rows))), key=lambda jk: len(jk[0].rows[jk[1]])
                )
                size = min((j.batch_size for j in jobs), default=DEFAULT_EMBED_BATCH)
                for start in range(0, len(items), size):
                    chunk = [(j, k) for j, k in items[start : start + size] if not j.future.done()]
                    if chunk:
                        await self._run(chunk)
        finally:
            self.draining = False

    async def _run(self, chunk: list[tuple[_Job, int]]) -> None:
        llm = self.llm

        def forward() -> list[list[float]]:
            with self.lock:
                pooled = embed_rows(
                    llm.model, [j.rows[k] for j, k in chunk], llm.pad_token_id, llm.torch_device,
                    [j.pooling for j, _ in chunk],
                )  # fmt: skip
            return [finish(vector, j.dimensions, j.normalize) for (j, _), vector in zip(chunk, pooled, strict=True)]

        try:
            vectors = await anyio.to_thread.run_sync(forward)
        except Exception as exc:  # noqa: BLE001  # the calls in this forward fail; others go on
            for job, _ in chunk:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        for (job, k), vector in zip(chunk, vectors, strict=True):
            if job.future.done():
                continue
            job.vectors[k] = vector
            job.left -= 1
            if job.left == 0:
                job.future.set_result([v for v in job.vectors if v is not None])


_batchers: weakref.WeakKeyDictionary[Any, dict[asyncio.AbstractEventLoop, _Batcher]] = weakref.WeakKeyDictionary()


def _batcher(llm: Any) -> _Batcher:
    loop = asyncio.get_running_loop()
    per_loop = _batchers.setdefault(llm, {})
    batcher = per_loop.get(loop)
    if batcher is None or batcher.llm.model is not llm.model:  # a new model after set_model_name
        batcher = per_loop[loop] = _Batcher(llm)
    return batcher
