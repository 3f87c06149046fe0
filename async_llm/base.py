"""BaseLLM: the async-first interface every model backend implements.

Subclasses implement the async primitives (:meth:`BaseLLM.astream` and :meth:`BaseLLM._close_backend`);
everything else is built on them here. The sync wrappers run the coroutine on a private event loop
in a daemon thread, so they work the same with no loop at all and when called from inside a running
loop (Jupyter, a sync helper called from async code): ``asyncio.run`` is never nested and the
caller's loop is never re-entered. (anyio's blocking portal would do the same, but its thread is a
non-daemon executor worker that the interpreter joins at exit, so a script that forgot ``close()``
would hang on exit.)
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, Union

import anyio

from async_llm.sampling_params import SamplingParams

T = TypeVar("T")


Message = Mapping[str, str]
Prompt = Union[str, Sequence[Message]]

_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})


def check_prompt(prompt: Any) -> Prompt:
    """Check a prompt: a str, or a chat as a list of ``{"role": ..., "content": ...}`` messages.

    Raises:
        TypeError: Neither a str nor a list of messages with str roles and contents.
        ValueError: An empty chat or an unknown role.
    """
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(f"prompt must be a str or a list of chat messages, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError("prompt is an empty list of messages")
    for i, message in enumerate(prompt):
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise TypeError(f"prompt message {i} must be a mapping with a str 'content'")
        if message.get("role") not in _ROLES:
            raise ValueError(f"prompt message {i} has role {message.get('role')!r}; expected one of {sorted(_ROLES)}")
    return prompt


class _LoopThread:
    """An event loop running forever in a daemon thread, for the sync wrappers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="async-llm-sync", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a sync method of the LLM was called from its own sync loop; await the async form")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if threading.current_thread() is self._thread:
            self.loop.call_soon(self.loop.stop)  # closed by the thread itself when it returns
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class BaseLLM(abc.ABC):
    """Async-first language model interface.

    Args:
        system_prompt: Prepended as a system message when prompts go through the chat template.
        chat_template: Format prompts with the tokenizer's chat template when it has one; ``False``
            sends raw text (plain completion). Can be overridden per call.
        **sampling_defaults: Defaults for every request (see :class:`SamplingParams`); each call can
            override them.

    Raises:
        TypeError, ValueError: A sampling default is invalid.
    """

    def __init__(self, *, system_prompt: str | None = None, chat_template: bool = True, **sampling_defaults: Any) -> None:
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt must be a str or None, got {type(system_prompt).__name__}")
        self.system_prompt = system_prompt
        self.chat_template = chat_template
        self.sampling_defaults = SamplingParams().merge(**sampling_defaults)
        self._sync_loop: _LoopThread | None = None
        self._sync_lock = threading.Lock()

    # -- async primitives ---------------------------------------------------------------------------
    @abc.abstractmethod
    def astream(self, prompt: str, **overrides: Any) -> AsyncIterator[str]:
        """Stream the completion of ``prompt`` as text deltas.

        Args:
            prompt: The prompt text.
            **overrides: Per-request sampling parameters (see :class:`SamplingParams`).

        Returns:
            An async iterator of ``str`` deltas that concatenate to the full text. Leaving the loop
            early or cancelling the consuming task aborts the request.

        Raises:
            TypeError: ``prompt`` is not a str, or an unknown/ill-typed parameter.
            ValueError: A parameter is out of range, or the prompt does not fit the model's context.
            QueueFullError: The engine's queue is full.
        """

    @abc.abstractmethod
    def _close_backend(self) -> None:
        """Release the backend (may block; called off the event loop by :meth:`aclose`)."""

    def stats(self) -> dict[str, int]:
        """Engine counters; backends without an engine return an empty dict."""
        return {}

    def validate(self, **overrides: Any) -> SamplingParams:
        """The defaults merged with ``overrides``, validated (raises before anything is queued)."""
        return self.sampling_defaults.merge(**overrides)

    async def arun(self, prompt: str, **overrides: Any) -> str:
        """Generate the completion of ``prompt``.

        Args:
            prompt: The prompt text.
            **overrides: Per-request sampling parameters.

        Returns:
            The generated text (stop strings and the eos token excluded).

        Raises:
            Same as :meth:`astream`; plus :class:`GenerationError` if the model step failed and
            :class:`EngineClosedError` if the LLM was closed meanwhile.
        """
        parts: list[str] = []
        async with contextlib.aclosing(self.astream(prompt, **overrides)) as stream:  # type: ignore[type-var]
            async for delta in stream:
                parts.append(delta)
        return "".join(parts)

    async def abatch_run(self, prompts: Iterable[str], **overrides: Any) -> list[str]:
        """Generate completions of all ``prompts`` concurrently (they share the batch).

        Returns:
            The texts in input order.

        Raises:
            TypeError: ``prompts`` is a str or holds a non-str (checked before anything is queued).
            Any error of :meth:`arun`; the other requests of the call are then cancelled.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of prompts, not a single str (use arun)")
        prompts = [check_prompt(p) for p in prompts]
        self.validate(**overrides)
        tasks = [asyncio.ensure_future(self.arun(p, **overrides)) for p in prompts]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    # -- sync wrappers --------------------------------------------------------------------------------
    def run(self, prompt: str, **overrides: Any) -> str:
        """Blocking :meth:`arun`; works with or without a running event loop in this thread."""
        return self._call_sync(self.arun, prompt, **overrides)

    def batch_run(self, prompts: Iterable[str], **overrides: Any) -> list[str]:
        """Blocking :meth:`abatch_run`; works with or without a running event loop in this thread."""
        return self._call_sync(self.abatch_run, list(prompts), **overrides)

    def __call__(self, prompt: str, **overrides: Any) -> str:
        """Same as :meth:`run`."""
        return self.run(prompt, **overrides)

    def _call_sync(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        with self._sync_lock:
            if self._sync_loop is None:
                self._sync_loop = _LoopThread()
            loop_thread = self._sync_loop
        return loop_thread.call(fn(*args, **kwargs))

    def _stop_sync_loop(self) -> None:
        with self._sync_lock:
            loop_thread, self._sync_loop = self._sync_loop, None
        if loop_thread is not None:
            loop_thread.stop()

    # -- lifecycle ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Fail pending requests with :class:`EngineClosedError` and release everything. Idempotent."""
        self._close_backend()
        self._stop_sync_loop()

    async def aclose(self) -> None:
        """Async :meth:`close`; the blocking part runs in a worker thread."""
        await anyio.to_thread.run_sync(self.close)

    def __enter__(self) -> BaseLLM:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> BaseLLM:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
