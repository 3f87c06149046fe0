"""The engine: worker threads that own the model and the running batch, and nothing else.

``core`` (the step: schedule, prefill, decode, update), ``scheduler`` (waiting and running queues,
pure Python), ``batch`` (the padded KV layout), ``sampler`` (vectorised per-row sampling),
``detokenizer`` (incremental text and stop strings), ``request`` (a request as the engine sees it),
``worker`` (the thread and its thread-safe inbox), ``beam`` (beam search through ``generate``),
``output`` (the narrow interface through which a front end receives outputs), ``fast_decode`` (the
fast decode step of Llama-family models) and ``model_api`` (how the engine calls a transformers model).

The engine imports nothing from ``async_llm.llm``, ``async_llm.serve``, ``async_llm.bench``,
``async_llm.loading`` or ``async_llm.outputs`` (checked in CI by import-linter).
"""
