"""BaseLLM: the async-first interface every model backend implements.

Subclasses implement the async primitives (:meth:`BaseLLM.astream`, :meth:`BaseLLM._close_backend`)
and a few backend hooks; everything else (sync wrappers, batch runs, chat and history, settings,
metrics, event log, checkpoints) is built on them here and in the mixins.

The sync wrappers run the coroutine on a private event loop in a daemon thread, so they work the
same with no loop at all and when called from inside a running loop (Jupyter, a sync helper called
from async code): ``asyncio.run`` is never nested and the caller's loop is never re-entered.

Why not anyio's blocking portal: its thread is a daemon (anyio 4.16), but the portal lives inside a
context manager that must be exited explicitly. An LLM that a script never closes would leave that
exit to garbage collection during interpreter shutdown, when daemon threads no longer run: the exit
waits for the portal's loop forever (seen here with anyio 4.16). A bare loop thread needs no exit.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import anyio

from async_llm.errors import InvalidParameterError, ParameterTypeError
from async_llm.llm import checkpoint
from async_llm.llm.chat import ROLES, ChatMixin, parse_history
from async_llm.llm.concurrency import gather
from async_llm.llm.event_log import EventLog
from async_llm.llm.metrics import MetricsRecorder, RequestMetrics, resource_utilization
from async_llm.llm.settings import SettingsMixin
from async_llm.log import get_logger
from async_llm.sampling_params import SamplingParams

T = TypeVar("T")
_Self = TypeVar("_Self", bound="BaseLLM")  # typing.Self needs Python 3.11
_events = get_logger("async_llm.events")
Message = Mapping[str, str]
Prompt = str | Sequence[Message]


def check_prompt(prompt: Any) -> Prompt:
    """Check a prompt: a str, or a chat as a list of ``{"role": ..., "content": ...}`` messages.

    Raises:
        TypeError: Neither a str nor a list of messages with str roles and contents.
        ValueError: An empty chat, an unknown role, or text that is not valid Unicode (a lone
            surrogate, as ``json.loads('"\\ud800"')`` gives): no tokenizer can encode it.
    """
    if isinstance(prompt, str):
        _check_unicode(prompt, "prompt")
        return prompt
    if not isinstance(prompt, (list, tuple)):
        raise ParameterTypeError(
            "prompt", f"prompt must be a str or a list of chat messages, got {type(prompt).__name__}"
        )
    if not prompt:
        raise InvalidParameterError("prompt", "prompt is an empty list of messages")
    for i, message in enumerate(prompt):
        # An assistant message that calls tools may have no content (OpenAI sends null).
        calls = isinstance(message, Mapping) and message.get("tool_calls") and message.get("content") is None
        if not isinstance(message, Mapping) or not (calls or isinstance(message.get("content"), str)):
            raise ParameterTypeError("prompt", f"prompt message {i} must be a mapping with a str 'content'")
        if calls:
            continue
        if message.get("role") not in ROLES:
            raise InvalidParameterError(
                "prompt", f"prompt message {i} has role {message.get('role')!r}; expected one of {sorted(ROLES)}"
            )
        _check_unicode(message["content"], f"prompt message {i}")
    return prompt


def _check_unicode(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParameterError(
            "prompt", f"{where} is not valid Unicode: lone surrogate {text[exc.start]!r} at index {exc.start}"
        ) from None


class _LoopThread:
    """An event loop running forever in a daemon thread, for the sync wrappers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="async-llm-sync", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop thread and wait for its result (from any other thread)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a sync method of the LLM was called from its own sync loop; await the async form")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if threading.current_thread() is self._thread:
            self.loop.call_soon(self.loop.stop)
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class BaseLLM(SettingsMixin, ChatMixin, abc.ABC):
    """Async-first language model interface.

    Args:
        system_prompt: Prepended as a system message when prompts go through the chat template.
        chat_template: Format prompts with the tokenizer's chat template when it has one; ``False``
            sends raw text (plain completion). Can be overridden per call.
        role: Role of the caller's messages in :meth:`chat` (default ``"user"``).
        history: Initial conversation for :meth:`chat` (messages or a transcript).
        **sampling_defaults: Defaults for every request (see :class:`SamplingParams`, aliases
            included); each call can override them. They are also attributes (``llm.temperature``)
            with ``set_*`` setters, validated on every change.

    Raises:
        TypeError, ValueError: A setting is invalid.
    """

    def __init__(
        self,
        *,
        system_prompt: str | None = None,
        chat_template: bool = True,
        role: str = "user",
        history: str | Sequence[Message] | None = None,
        **sampling_defaults: Any,
    ) -> None:
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ParameterTypeError(
                "system_prompt", f"system_prompt must be a str or None, got {type(system_prompt).__name__}"
            )
        self.system_prompt = system_prompt
        self.chat_template = chat_template
        self.role = role
        self.history: list[dict[str, str]] = parse_history(history) if history is not None else []
        self.sampling_defaults = SamplingParams().merge(**sampling_defaults)
        self.metrics_recorder = MetricsRecorder()
        self._event_log: EventLog | None = None
        self._sync_loop: _LoopThread | None = None
        self._sync_lock = threading.Lock()
        self._closed = False

    # -- backend hooks ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def astream(self, prompt: Prompt, **overrides: Any) -> AsyncIterator[str]:
        """Stream the completion of ``prompt`` as text deltas.

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

    @abc.abstractmethod
    def _close_backend(self) -> None:
        """Release the backend (may block; called off the event loop by :meth:`aclose`)."""

    @abc.abstractmethod
    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` for this model's tokenizer (no special tokens)."""

    @abc.abstractmethod
    def set_model_name(self, model_name: str) -> None:
        """Load another model and serve it from now on (requests in flight finish on the old one)."""

    @abc.abstractmethod
    def set_device(self, device: str | None) -> None:
        """Move the model to ``device`` once the requests in flight are done."""

    @abc.abstractmethod
    def _save_weights(self, folder: Path) -> None:
        """Write the model and tokenizer with ``save_pretrained`` (blocking)."""

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

    async def arun(self, prompt: Prompt, **overrides: Any) -> Any:
        """Generate the completion of ``prompt``.

        Args:
            prompt: A str, or a chat as a list of messages.
            **overrides: Per-request sampling parameters.

        Returns:
            The generated text (stop strings and the eos token excluded); a list of ``n`` texts
            when ``n`` (``num_return_sequences``) is greater than 1.

        Raises:
            Same as :meth:`astream`; plus :class:`GenerationError` if the model step failed and
            :class:`EngineClosedError` if the LLM was closed meanwhile.
        """
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
        self.metrics_recorder.record(
            RequestMetrics(0, self.count_tokens(text), None if first is None else first - start, end - start)
        )
        return text

    async def abatch_run(self, prompts: Iterable[Prompt], **overrides: Any) -> list[Any]:
        """Generate completions of all ``prompts`` concurrently (they share the batch).

        Returns:
            The results in input order (each a str, or a list of str when ``n`` > 1).

        Raises:
            TypeError: ``prompts`` is a str or holds an invalid prompt (checked before anything is queued).
            Any error of :meth:`arun`; the other requests of the call are then cancelled.
        """
        if isinstance(prompts, str):
            raise ParameterTypeError("prompts", "prompts must be a list of prompts, not a single str (use arun)")
        prompts = [check_prompt(p) for p in prompts]
        self.validate(**overrides)
        return await gather([functools.partial(self.arun, p, **overrides) for p in prompts])

    async def agenerate(self, prompt: Prompt, max_length: int | None = None, **overrides: Any) -> Any:
        """:meth:`arun` with ``max_length`` (prompt plus output tokens), as in transformers."""
        if max_length is not None:
            overrides["max_length"] = max_length
        return await self.arun(prompt, **overrides)

    # -- sync wrappers ------------------------------------------------------------------------------------
    def run(self, prompt: Prompt, **overrides: Any) -> Any:
        """Blocking :meth:`arun`; works with or without a running event loop in this thread."""
        return self._call_sync(self.arun, prompt, **overrides)

    def batch_run(self, prompts: Iterable[Prompt], **overrides: Any) -> list[Any]:
        """Blocking :meth:`abatch_run`; works with or without a running event loop in this thread."""
        return self._call_sync(self.abatch_run, list(prompts), **overrides)

    def generate(self, prompt: Prompt, max_length: int | None = None, **overrides: Any) -> Any:
        """Blocking :meth:`agenerate`."""
        return self._call_sync(self.agenerate, prompt, max_length, **overrides)

    def __call__(self, prompt: Prompt, **overrides: Any) -> Any:
        """Same as :meth:`run`."""
        return self.run(prompt, **overrides)

    def _call_sync(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        with self._sync_lock:
            if self._sync_loop is None:
                self._sync_loop = _LoopThread()
            loop_thread = self._sync_loop
        return loop_thread.call(fn(*args, **kwargs))  # type: ignore[arg-type]  # fn returns a coroutine

    # -- metrics ------------------------------------------------------------------------------------------
    def _num_tokens(self, text: str) -> int:
        """Tokens in ``text`` (this model's tokenizer)."""
        return self.count_tokens(text)

    def _tokens_per_second(self) -> float:
        """Output tokens per second of the last finished request (0.0 before any)."""
        last = self.metrics_recorder.last
        return last.tokens_per_second if last else 0.0

    def _time_for_generation(self, task: Prompt, **overrides: Any) -> float:
        """Run ``task`` and return the seconds it took."""
        start = time.perf_counter()
        self.run(task, **overrides)
        return time.perf_counter() - start

    def get_generation_time(self) -> float:
        """Seconds the last finished request took, submission to last token (0.0 before any)."""
        last = self.metrics_recorder.last
        return last.latency if last else 0.0

    def get_time_to_first_token(self) -> float | None:
        """Seconds from submission to the first token of the last finished request."""
        last = self.metrics_recorder.last
        return last.time_to_first_token if last else None

    def metrics(self) -> dict[str, Any]:
        """Per-request aggregates (totals, tokens/s, time to first token and latency percentiles)
        and the engine's counters."""
        return {**self.metrics_recorder.summary(), "engine": self.stats()}

    def track_resource_utilization(self) -> dict[str, Any]:
        """CPU and memory of this process, and allocated/reserved memory on a CUDA device."""
        return resource_utilization(getattr(self, "device", None))

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

    # -- checkpoints --------------------------------------------------------------------------------------
    async def asave_checkpoint(
        self, checkpoint_dir: str | os.PathLike[str] = "checkpoints", save_weights: bool = False
    ) -> Path:
        """Save settings, history and metric totals as JSON (atomically), and optionally the weights.

        Returns:
            The path of ``checkpoint.json``.
        """
        folder = Path(checkpoint_dir)
        weights = None
        if save_weights:
            await anyio.to_thread.run_sync(self._save_weights, folder / checkpoint.WEIGHTS_DIR)
            weights = checkpoint.WEIGHTS_DIR
        payload = {
            "model_name": getattr(self, "model_name", None),
            "settings": {
                "sampling": self.sampling_defaults.to_dict(),
                "system_prompt": self.system_prompt,
                "role": self.role,
                "chat_template": self.chat_template,
            },
            "history": list(self.history),
            "metrics": self.metrics_recorder.summary(),
            "weights": weights,
        }
        return await checkpoint.write(folder, payload)

    async def aload_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore a checkpoint written by :meth:`asave_checkpoint` (and its weights, if saved).

        Raises:
            FileNotFoundError: Nothing there. :class:`CheckpointError`: corrupt or invalid; in both
            cases nothing is changed.
        """
        data = await checkpoint.read(path)
        settings = data["settings"]
        role = settings.get("role") or "user"
        if role not in ROLES:
            raise checkpoint.CheckpointError(f"invalid checkpoint {str(path)!r}: unknown role {role!r}")
        if data["weights"] is not None:
            await anyio.to_thread.run_sync(self.set_model_name, str(data["weights"]))
        self.sampling_defaults = data["params"]
        self.system_prompt = settings.get("system_prompt")
        self.role = role
        self.chat_template = bool(settings.get("chat_template", True))
        self.history = [dict(m) for m in data["history"]]
        self.metrics_recorder.restore(data["metrics"])

    def save_checkpoint(
        self, checkpoint_dir: str | os.PathLike[str] = "checkpoints", save_weights: bool = False
    ) -> Path:
        """Blocking :meth:`asave_checkpoint`."""
        return self._call_sync(self.asave_checkpoint, checkpoint_dir, save_weights)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Blocking :meth:`aload_checkpoint`."""
        self._call_sync(self.aload_checkpoint, path)

    # -- lifecycle ----------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` (or :meth:`aclose`) was called: new requests then raise
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
