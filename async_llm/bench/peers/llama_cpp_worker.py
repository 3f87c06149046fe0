"""llama.cpp (through llama-cpp-python's low-level API) as a benchmark peer.

    LLAMA_PYTHON llama_cpp_worker.py '{"model": GGUF, "threads": 2, "max_seqs": 64}'

Continuous batching with llama.cpp's own batch API: one sequence id per request, each with its own
slice of the KV cache (``kv_unified`` off, ``n_ctx`` = sequences x 1024), so sequences never attend
over each other. Every step admits the requests that have arrived (their prompts go into the same
``llama_decode`` as the running sequences' next tokens), takes the greedy token of each sequence
from its logits, and retires the sequences that have their ``max_new_tokens`` (eos ignored).
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field
from typing import Any

from _worker_io import Done, RunFn, serve

CONTEXT_PER_SEQUENCE = 1024
BATCH_TOKENS = 2048


@dataclass
class _Sequence:
    spec: dict[str, Any]
    seq: int
    position: int = 0
    next_token: int = -1
    times: list[float] = field(default_factory=list)


def load(config: dict[str, Any]) -> RunFn:
    import llama_cpp as lc
    import numpy as np

    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(config["model"].encode(), lc.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {config['model']}")
    max_seqs = int(config.get("max_seqs", 64))
    params = lc.llama_context_default_params()
    params.n_ctx = max_seqs * CONTEXT_PER_SEQUENCE
    params.n_batch = BATCH_TOKENS
    params.n_ubatch = min(512, BATCH_TOKENS)
    params.n_seq_max = max_seqs
    params.n_threads = params.n_threads_batch = int(config.get("threads", 2))
    params.kv_unified = False
    ctx = lc.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context")
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    memory = lc.llama_get_memory(ctx)
    batch = lc.llama_batch_init(BATCH_TOKENS, 0, 1)

    def decode(entries: list[tuple[int, int, int, bool]]) -> dict[int, int]:
        """Feed ``(token, position, seq, wants_logits)`` entries; the greedy next token per seq."""
        chosen: dict[int, int] = {}
        for first in range(0, len(entries), BATCH_TOKENS):
            chunk = entries[first : first + BATCH_TOKENS]
            batch.n_tokens = len(chunk)
            for i, (token, position, seq, logits) in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = position
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = logits
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            for i, (_, _, seq, logits) in enumerate(chunk):
                if logits:
                    row = np.ctypeslib.as_array(
                        ctypes.cast(lc.llama_get_logits_ith(ctx, i), ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)
                    )
                    chosen[seq] = int(row.argmax())
        return chosen

    def run(start: float, requests: list[dict[str, Any]], done: Done) -> None:
        pending = sorted(requests, key=lambda r: r["arrival"])
        free = list(range(max_seqs - 1, -1, -1))
        active: dict[int, _Sequence] = {}
        while pending or active:
            now = time.perf_counter()
            entries: list[tuple[int, int, int, bool]] = []
            for state in active.values():  # the running sequences' next tokens
                entries.append((state.next_token, state.position, state.seq, True))
                state.position += 1
            while pending and start + pending[0]["arrival"] <= now and free:
                spec = pending.pop(0)
                state = _Sequence(spec, free.pop())
                lc.llama_memory_seq_rm(memory, state.seq, -1, -1)
                prompt = spec["prompt_ids"]
                entries.extend((t, j, state.seq, j == len(prompt) - 1) for j, t in enumerate(prompt))
                state.position = len(prompt)
                active[state.seq] = state
            if not entries:
                time.sleep(max(0.0, start + pending[0]["arrival"] - time.perf_counter()))
                continue
            chosen = decode(entries)
            now = time.perf_counter()
            for seq, token in chosen.items():
                state = active[seq]
                state.times.append(now)
                state.next_token = token
                if len(state.times) >= state.spec["max_new_tokens"]:
                    done(state.spec["index"], state.times)
                    del active[seq]
                    free.append(seq)

    return run


if __name__ == "__main__":
    serve(load)
