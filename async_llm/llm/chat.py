"""Multi-turn chat with a history, and summaries, on top of ``arun``."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from async_llm.errors import InvalidParameterError, ParameterTypeError

if TYPE_CHECKING:
    from async_llm.sampling_params import SamplingParams

_T = TypeVar("_T")

SUMMARY_PROMPT = (
    "Summarize the following text in two or three sentences. Keep the key facts and names; "
    "do not add anything that is not in the text.\n\nText:\n{text}"
)

ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
_TURN = re.compile(r"^(system|user|assistant|human|ai)\s*:\s?(.*)$", re.IGNORECASE)
_ROLE_NAMES = {"human": "user", "ai": "assistant"}


def parse_history(history: str | Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """History as chat messages.

    Args:
        history: A list of ``{"role", "content"}`` messages, or a transcript whose lines start
            with ``User:``, ``Assistant:`` or ``System:`` (continuation lines belong to the turn
            above). Text with no such prefix becomes one system message giving the context.

    Raises:
        TypeError: Neither a str nor a list of messages.
    """
    if isinstance(history, str):
        messages: list[dict[str, str]] = []
        for line in history.splitlines():
            turn = _TURN.match(line.strip())
            if turn:
                role = turn.group(1).lower()
                messages.append({"role": _ROLE_NAMES.get(role, role), "content": turn.group(2)})
            elif messages:
                messages[-1]["content"] += "\n" + line
            elif line.strip():
                messages.append({"role": "system", "content": "Conversation so far:\n" + line})
        return [{**m, "content": m["content"].strip()} for m in messages]
    if isinstance(history, Sequence) and all(isinstance(m, Mapping) for m in history):
        return [dict(m) for m in history if isinstance(m, Mapping)]
    raise ParameterTypeError("history", f"history must be a str or a list of messages, got {type(history).__name__}")


class ChatMixin:
    """``chat``/``achat`` with ``history``, and ``generate_summary``.

    The exchange of every chat turn (``role``'s message and the assistant's reply) is appended to
    ``self.history``; ``history=`` passed to a call replaces the context for that call only.
    """

    history: list[dict[str, str]]
    _role: str

    if TYPE_CHECKING:  # provided by BaseLLM

        def validate(self, **overrides: Any) -> SamplingParams: ...

        async def arun(self, prompt: Any, **overrides: Any) -> Any: ...

        def _call_sync(self, fn: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any) -> _T: ...

    @property
    def role(self) -> str:
        """The role of the caller's messages in :meth:`chat` (default ``"user"``)."""
        return self._role

    @role.setter
    def role(self, role: str) -> None:
        if role not in ROLES:
            raise InvalidParameterError("role", f"role must be one of {sorted(ROLES)}, got {role!r}")
        self._role = role

    def set_role(self, role: str) -> None:
        """Set :attr:`role`."""
        self.role = role

    def clear_history(self) -> None:
        """Forget the conversation."""
        self.history.clear()

    async def achat(self, task: str, history: str | Sequence[dict[str, str]] | None = None, **overrides: Any) -> str:
        """Answer ``task`` in the conversation so far, through the chat template.

        Args:
            task: The new message (sent with :attr:`role`).
            history: Context for this call instead of ``self.history`` (messages or a transcript).
            **overrides: Sampling parameters for this reply (``n`` must be 1).

        Returns:
            The assistant's reply, also appended to ``self.history`` after ``task``.

        Raises:
            TypeError: ``task`` is not a str, or ``history`` is malformed.
            ValueError: Bad sampling parameters, or ``n`` > 1.
        """
        if not isinstance(task, str):
            raise ParameterTypeError("task", f"task must be a str, got {type(task).__name__}")
        context = list(self.history) if history is None else parse_history(history)
        turn = {"role": self.role, "content": task}
        if self.validate(**overrides).n != 1:
            raise InvalidParameterError("n", "chat returns one reply: n (num_return_sequences) must be 1")
        reply: str = await self.arun([*context, turn], **overrides)
        self.history.extend([turn, {"role": "assistant", "content": reply}])
        return reply

    def chat(self, task: str, history: str | Sequence[dict[str, str]] | None = None, **overrides: Any) -> str:
        """Blocking :meth:`achat`."""
        return self._call_sync(self.achat, task, history, **overrides)

    async def agenerate_summary(self, text: str, **overrides: Any) -> str:
        """Summarise ``text`` with the model (a summarisation instruction through the chat template).

        Raises:
            TypeError: ``text`` is not a str.
        """
        if not isinstance(text, str):
            raise ParameterTypeError("text", f"text must be a str, got {type(text).__name__}")
        summary: str = await self.arun(SUMMARY_PROMPT.format(text=text), **overrides)
        return summary

    def generate_summary(self, text: str, **overrides: Any) -> str:
        """Blocking :meth:`agenerate_summary`."""
        return self._call_sync(self.agenerate_summary, text, **overrides)
