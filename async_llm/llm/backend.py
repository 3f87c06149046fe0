"""One loaded model with its tokenizer and the workers serving it (the engine and the beam-search
runner), shared by every call of a :class:`~async_llm.llm.huggingface.HuggingFaceLLM`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from async_llm.engine.beam import BeamRunner
from async_llm.engine.core import Engine
from async_llm.llm.controls import GrammarCompiler
from async_llm.llm.frontend import Sinks


def _ids(value: int | Sequence[int] | None) -> set[int]:
    if value is None:
        return set()
    return {int(value)} if isinstance(value, int) else {int(v) for v in value}


class Backend:
    """One loaded model with its tokenizer and the workers serving it."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        pad_token_id: int | None,
        eos_token_id: Any,
        max_batch_size: int,
        max_queue_size: int,
        engine_options: dict[str, Any],
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        eos = _ids(eos_token_id)
        if not eos:
            for source in (getattr(model, "generation_config", None), model.config, tokenizer):
                eos |= _ids(getattr(source, "eos_token_id", None))
        self.eos_token_ids = frozenset(eos)
        if pad_token_id is None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
        self.pad_token_id = pad_token_id
        self.max_context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.engine = Engine(model, pad_token_id, max_batch_size, max_queue_size, **engine_options)
        self.grammars = GrammarCompiler(tokenizer, self.engine.vocab_size)
        # A token's text and bytes, for logprobs (as OpenAI shows them: special tokens included).
        self.token_text: Callable[[int], tuple[str, list[int]]] = functools.lru_cache(maxsize=1 << 16)(self._token_text)

        self.beams = BeamRunner(model, pad_token_id, max_queue_size=max_queue_size)
        self.sinks = Sinks()
        self.engine.start()
        self.beams.start()

    def _token_text(self, token_id: int) -> tuple[str, list[int]]:
        text = str(self.tokenizer.decode([token_id]))
        raw = self.grammars.token_bytes(token_id)
        return text, list(raw if raw is not None else text.encode("utf-8"))

    def close(self) -> None:
        self.engine.close()
        self.beams.close()
