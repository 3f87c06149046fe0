"""BaseLLM: the async-first interface every model backend implements.

A subclass implements one of two primitives and gets everything else (sync wrappers, batch runs,
chat and history, settings, metrics, event log, checkpoints) from here and the mixins:

- :meth:`BaseLLM.astream`, async and streaming: the async-first way (:class:`HuggingFaceLLM`); or
- ``run(task)``, synchronous, as the swarm_models documentation describes (a wrapper over some
  other model or API): the async methods then call it in a worker thread, never on the event loop,
  and a chat reaches it as a plain-text transcript.

The sync wrappers run the coroutine on a private event loop in a daemon thread
(:class:`~async_llm.llm.frontend.SyncLoop`), so they work the same with no loop at all and when
called from inside a running loop (Jupyter, a sync helper called from async code): ``asyncio.run``
is never nested and the caller's loop is never re-entered. The async methods run on asyncio only.

Every method takes its prompt under the names of the documents this interface follows: ``task``
(swarm_models), ``prompt_text`` (Zeta) or ``prompt``. The documents' extra positional ``*args``
reach no model, so they are refused with a TypeError naming them rather than silently dropped.
The documents' other names (setters, measuring methods, ``generate``) are in
:mod:`async_llm.llm.compat`.

Once :meth:`BaseLLM.close` has run, every entry point (``run``, ``arun``, ``astream``, the batch and
chat methods, a subclass's own ``run`` or ``astream`` included) raises :class:`EngineClosedError`
(:mod:`async_llm.llm.closing`).
"""

from __future__ import annotations

import functools
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import anyio

from async_llm.errors import ParameterTypeError
from async_llm.llm.batch import BatchMixin
from async_llm.llm.chat import (
    TRANSCRIPT_STOP,
    ChatMixin,
    Message,
    Prompt,
    check_prompt,
    parse_history,
    pop_prompt,
    render_transcript,
)
from async_llm.llm.checkpoint import CheckpointMixin
from async_llm.llm.closing import guard_entry_points
from async_llm.llm.compat import SeedDocumentNames
from async_llm.llm.event_log import EventLog
from async_llm.llm.frontend import SyncLoop, require_asyncio
from async_llm.llm.metrics import MetricsRecorder, RequestMetrics
from async_llm.llm.settings import SettingsMixin, describe_model
from async_llm.log import get_logger
from async_llm.sampling_params import SamplingParams

__all__ = ["BaseLLM", "Message", "Prompt", "check_prompt"]

T = TypeVar("T")
_Self = TypeVar("_Self", bound="BaseLLM")  # typing.Self needs Python 3.11
_events = get_logger("async_llm.events")
_WORDS = re.compile(r"\w+|[^\w\s]")


class BaseLLM(SeedDocumentNames, SettingsMixin, BatchMixin, CheckpointMixin, ChatMixin):
    """Async-first language model interface. Subclass it and implement :meth:`astream` (async) or
    ``run(task, *args, **kwargs) -> str`` (sync); see the module's documentation.

    Every argument may be None, which means its default (as in the swarm_models constructor).

    Args:
        system_prompt: Prepended as a system message when prompts go through the chat template.
        chat_template: Format prompts with the tokenizer's chat template when it has one; ``False``
            sends raw text (plain completion). Can be overridden per call.
        role: Role of the caller's messages in :meth:`chat` (default ``"user"``).
        history: Initial conversation for :meth:`chat` (messages or a transcript).
        model_name, model_id, device, pad_token_id, eos_token_id, bos_token_id: What the model is and
            where it runs, kept as attributes of those names (``model_id`` is an alias of
            ``model_name``); a backend such as :class:`HuggingFaceLLM` takes them itself.
        **sampling_defaults: Defaults for every request (see :class:`SamplingParams`, aliases
            included); each call can override them. They are also attributes (``llm.temperature``)
            with ``set_*`` setters, validated on every change.

    Raises:
        TypeError: The class implements neither ``astream`` nor ``run`` (``BaseLLM`` itself
            included), or a setting has the wrong type. ValueError: A setting is out of range.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        guard_entry_points(cls)  # a subclass's own run/astream... refuse calls once it is closed too

    def __init__(
        self,
        *,
        system_prompt: str | None = None,
        chat_template: bool | None = True,
        role: str | None = "user",
        history: str | Sequence[Message] | None = None,
        model_name: str | None = None,
        model_id: str | None = None,
        device: Any = None,
        pad_token_id: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        bos_token_id: int | None = None,
        **sampling_defaults: Any,
    ) -> None:
        cls = type(self)
        if cls.astream is BaseLLM.astream and cls.run is BaseLLM.run:
            raise TypeError(
                f"{cls.__name__} implements neither astream (async, streaming) nor run (sync): BaseLLM is "
                "an interface; subclass it and implement one of them, and it provides the rest"
            )
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ParameterTypeError(
                "system_prompt", f"system_prompt must be a str or None, got {type(system_prompt).__name__}"
            )
        describe_model(
            self, model_name, model_id, device=device, pad_token_id=pad_token_id,
            eos_token_id=eos_token_id, bos_token_id=bos_token_id,
        )  # fmt: skip
        self.system_prompt = system_prompt
        self.chat_template = True if chat_template is None else chat_template
        self.role = role  # type: ignore[assignment]  # the setter takes None: the default role
        #: Wall-clock (``time.time()``) submission and finish of the last finished request.
        self.start_time: float | None = None
        self.end_time: float | None = None
        self.history: list[dict[str, str]] = parse_history(history) if history is not None else []
        self.sampling_defaults = SamplingParams().merge(**sampling_defaults)
        self.metrics_recorder = MetricsRecorder()
        self._event_log: EventLog | None = None
        self._sync_loop: SyncLoop | None = None
        self._sync_lock = threading.Lock()
        self._closed = False

    # -- backend hooks ----------------------------------------------------------------------------------
    def astream(self, prompt: Prompt, **overrides: Any) -> AsyncIterator[str]:
        """Stream the completion of ``prompt`` as text deltas: the async primitive a backend implements.

        The default serves a subclass that implements only a sync ``run``: its whole answer, computed
        in a worker thread, as one delta.

        Args:
            prompt: A str, or a chat as a list of ``{"role", "content"}`` messages.
            **overrides: Per-request sampling parameters (see :class:`SamplingParams`).

        Returns:
            An async iterator of ``str`` deltas that concatenate to the full text. Leaving the loop
            early or cancelling the consuming task aborts the request.

        Raises:
            TypeError: ``prompt`` is not a str or messages, or an unknown/ill-typed parameter.
            ValueError: A parameter is out of range, or the prompt does not fit the model's context.
            QueueFullError: The engine's queue is full.
        """
        check_prompt(prompt)
        return self._one_delta(prompt, overrides)

    async def _one_delta(self, prompt: Prompt, overrides: dict[str, Any]) -> AsyncIterator[str]:
        yield await self._arun_sync(prompt, **overrides)

    def _close_backend(self) -> None:
        """Release the backend (may block; called off the event loop by :meth:`aclose`). By default
        there is nothing to release."""
        return None

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` for this model's tokenizer (no special tokens). The default,
        for a subclass without a tokenizer, counts words and punctuation marks: an approximation
        (metrics' tokens/s are then words/s); override it for exact counts."""
        return len(_WORDS.findall(text))

    def set_model_name(self, model_name: str) -> None:
        """Serve another model from now on (a backend loads it; requests in flight finish on the
        old one). The default, for a wrapper subclass, records the name as ``model_name``/``model_id``."""
        vars(self).update(model_name=model_name, model_id=model_name)

    def set_device(self, device: Any) -> None:
        """Move the model to ``device`` once the requests in flight are done. The default, for a
        wrapper subclass, records it as ``device``."""
        vars(self).update(device=device)

    def _save_weights(self, folder: Path) -> None:
        """Write the model and tokenizer with ``save_pretrained`` (blocking).

        Raises:
            NotImplementedError: By default: a wrapper subclass has no weights of its own.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no weights to save: implement _save_weights, or save_weights=False"
        )

    def stats(self) -> dict[str, int]:
        """Engine counters; backends without an engine return an empty dict."""
        return {}

    # -- generation -------------------------------------------------------------------------------------
    #: Keyword arguments of the generation methods that are not sampling parameters (the prompt's
    #: rendering, streamers, tools); :meth:`validate` leaves them out.
    CALL_OPTIONS: frozenset[str] = frozenset()

    def validate(self, **overrides: Any) -> SamplingParams:
        """The defaults merged with ``overrides`` (call options left out), validated (raises before
        anything is queued)."""
        return self.sampling_defaults.merge(**{k: v for k, v in overrides.items() if k not in self.CALL_OPTIONS})

    async def arun(self, task: Prompt | None = None, *args: Any, **overrides: Any) -> Any:
        """Generate the completion of ``task``.

        Args:
            task: A str, or a chat as a list of messages; also by keyword as ``prompt`` or
                ``prompt_text``.
            *args: Refused: extra positional arguments (the documents' ``*args``) raise a TypeError
                naming them.
            **overrides: Per-request sampling parameters.

        Returns:
            The generated text (stop strings and the eos token excluded); a list of ``n`` texts
            when ``n`` (``num_return_sequences``) is greater than 1.

        Raises:
            Same as :meth:`astream`; plus :class:`GenerationError` if the model step failed,
            :class:`EngineClosedError` if the LLM was closed meanwhile, and RuntimeError when the
            running event loop is not asyncio's (trio).
        """
        require_asyncio()
        return await self._arun(pop_prompt("arun", task, args, overrides), **overrides)

    async def _arun(self, prompt: Prompt, **overrides: Any) -> Any:
        """One completion, timed: from :meth:`astream`, or from a subclass's own sync ``run``."""
        if type(self).astream is BaseLLM.astream:
            return await self._arun_sync(prompt, **overrides)
        start = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        stream = self.astream(prompt, **overrides)
        try:
            async for delta in stream:
                first = first or time.perf_counter()
                parts.append(delta)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        text = "".join(parts)
        end = time.perf_counter()
        self._record(RequestMetrics(0, self.count_tokens(text), None if first is None else first - start, end - start))
        return text

    async def _arun_sync(self, prompt: Prompt, **overrides: Any) -> Any:
        """A subclass's own sync ``run`` in a worker thread, so the event loop keeps running.

        Overrides are validated as sampling parameters first and passed on as given. A chat reaches
        ``run`` as a plain-text transcript, and the reply ends where the model starts the next user
        turn (as the stop string of a transcript does in the engine).
        """
        check_prompt(prompt)
        self.validate(**overrides)
        text = prompt if isinstance(prompt, str) else render_transcript(prompt, self.system_prompt)
        start = time.perf_counter()
        result = await anyio.to_thread.run_sync(functools.partial(self.run, text, **overrides))
        if not isinstance(prompt, str) and isinstance(result, str):
            result = result.split(TRANSCRIPT_STOP, 1)[0]
        latency = time.perf_counter() - start
        output = result if isinstance(result, str) else ""
        # No stream: the first text arrives with the last, so the time to it is the latency.
        self._record(RequestMetrics(self.count_tokens(text), self.count_tokens(output), latency, latency))
        return result

    # -- sync wrappers ------------------------------------------------------------------------------------
    def run(self, task: Prompt | None = None, *args: Any, **overrides: Any) -> Any:
        """Blocking :meth:`arun`; works with or without a running event loop in this thread.

        A subclass may implement ``run`` itself instead of :meth:`astream`: the async methods then
        call it in a worker thread.
        """
        prompt = pop_prompt("run", task, args, overrides)
        return self._call_sync(self.arun, prompt, **overrides)

    def __call__(self, task: Prompt | None = None, *args: Any, **overrides: Any) -> Any:
        """Same as :meth:`run` (a subclass's own ``run`` gets the arguments as they are)."""
        return self.run(task, *args, **overrides)

    def _call_sync(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        with self._sync_lock:
            if self._sync_loop is None and not self._closed:
                self._sync_loop = SyncLoop()
            loop_thread = self._sync_loop
        if loop_thread is None:
            # Closed (generation is refused before it gets here): a checkpoint still saves, on a
            # loop of its own that ends with the call, so no thread outlives close().
            loop_thread = SyncLoop()
            try:
                return loop_thread.call(fn(*args, **kwargs))  # type: ignore[arg-type]
            finally:
                loop_thread.stop()
        return loop_thread.call(fn(*args, **kwargs))  # type: ignore[arg-type]  # fn returns a coroutine

    # -- event log ----------------------------------------------------------------------------------------
    def enable_logging(self, log_file: str | os.PathLike[str] = "model.log") -> None:
        """Write the library's events (requests admitted/finished/aborted, :meth:`log_event`) to
        ``log_file`` as JSON lines, from a background writer thread. Closed (and flushed) on close."""
        if self._event_log is not None:
            self._event_log.close()
        self._event_log = EventLog(log_file)

    def log_event(self, message: str, **fields: Any) -> None:
        """Log an application event (structured ``fields`` allowed) through the library's logger."""
        _events.info(message, **fields)

    # -- lifecycle ----------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` (or :meth:`aclose`) was called: every entry point then raises
        :class:`EngineClosedError`."""
        return self._closed

    def close(self) -> None:
        """Fail pending requests with :class:`EngineClosedError`, flush the event log, release
        everything. Idempotent."""
        self._closed = True
        self._close_backend()
        if self._event_log is not None:
            self._event_log.close()
        with self._sync_lock:
            loop_thread, self._sync_loop = self._sync_loop, None
        if loop_thread is not None:
            loop_thread.stop()

    async def aclose(self) -> None:
        """Async :meth:`close`; the blocking part runs in a worker thread."""
        await anyio.to_thread.run_sync(self.close)

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self: _Self) -> _Self:
        """The LLM, once its backend is ready (waited for off the event loop)."""
        await anyio.to_thread.run_sync(self._wait_ready)
        return self

    def _wait_ready(self) -> None:
        """Block until the backend can serve at once (default: it always can)."""

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


for _part in BaseLLM.__mro__[:-1]:  # the base's own entry points and its mixins', where each is defined
    guard_entry_points(_part)
