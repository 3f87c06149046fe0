"""``HuggingFaceLLM.aembed``: embeddings from the served causal LM (see :mod:`async_llm.engine.embedding`).

Inputs are checked (types, emptiness, the model's context) before anything runs, each error naming
the input's index. The forwards run in a worker thread, never on the event loop, in batches of
similar lengths (sorted, so little is padded); one embedding batch runs at a time per engine, beside
the generation engine's own steps.

Pooling: ``pooling=None`` reads the model folder's sentence-transformers pooling config
(``modules.json`` and its ``Pooling`` module: ``pooling_mode_lasttoken`` or
``pooling_mode_mean_tokens``) and falls back to the last token, the usual choice for causal LMs.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from async_llm.engine.embedding import POOLINGS, embed_rows, hidden_size
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
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    vectors: list[list[float]] = [[] for _ in rows]
    with _locks_guard:
        lock = _locks.setdefault(id(llm.model), threading.Lock())

    def run(batch: list[int]) -> list[list[float]]:
        with lock:  # one embedding forward at a time per model, beside the engine's steps
            out = embed_rows(
                llm.model, [rows[i] for i in batch], llm.pad_token_id, llm.torch_device, how, normalize, dimensions
            )
        return [list(map(float, v)) for v in out.tolist()]

    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        for i, vector in zip(batch, await anyio.to_thread.run_sync(run, batch), strict=True):
            vectors[i] = vector
    return Embeddings(vectors, sum(len(r) for r in rows))
