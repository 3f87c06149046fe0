"""What users call: :class:`~async_llm.llm.base.BaseLLM` (the async-first interface, sync wrappers,
settings, chat, metrics, checkpoints, event log) and :class:`~async_llm.llm.huggingface.HuggingFaceLLM`
(a transformers model served by the engine), with the front end's output sinks (``frontend``)."""
