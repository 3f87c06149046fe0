"""The engine: worker threads that own the model and the running batch, and nothing else.

``core`` (the step: plan -> run -> update), ``planner`` (what a step runs), ``runners`` (how it runs
on a device: the fast runner, the static runner with its CUDA graphs, the transformers runner),
``update`` (sampling, the finish rule, outputs, overlapped steps), ``scheduler`` (waiting and running
queues, pure Python), ``prefill`` (prompts being prefilled), ``batch`` (the padded KV layout and what
every layout shares), ``slot_batch`` (the static runner's fixed slots), ``kv_budget`` and ``buckets``
(its size and shapes), ``sampler`` (vectorised per-row sampling), ``draws`` (counter-based random
numbers on the device),
``detokenizer`` (incremental text and stop strings), ``request`` (a request as the engine sees it),
``finish`` (the finish rule), ``worker`` (the thread and its thread-safe inbox), ``beam`` (beam search
through ``generate``), ``output`` (the narrow interface through which a front end receives outputs
and the engine's value types), ``config`` (the engine's options) and ``model_api`` (how the engine
calls a transformers model).

The engine imports nothing from ``async_llm.llm``, ``async_llm.serve``, ``async_llm.bench``,
``async_llm.loading`` or ``async_llm.outputs`` (checked in CI by import-linter).
"""
