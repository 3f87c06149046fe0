"""Prompts and multi-turn chat: the prompt's shapes and checks, the names the documented interfaces
call it by, the plain-text transcript of a chat for models without a chat template, and
``chat``/``achat`` with a history, and summaries, on top of ``arun``."""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from async_llm.errors import InvalidParameterError, ParameterTypeError
from async_llm.llm.frontend import require_asyncio

if TYPE_CHECKING:
    from async_llm.sampling_params import SamplingParams

_T = TypeVar("_T")
F = TypeVar("F", bound=Callable[..., Any])
Message = Mapping[str, str]
Prompt = str | Sequence[Message]

SUMMARY_PROMPT = (
    "Summarize the following text in two or three sentences. Keep the key facts and names; "
    "do not add anything that is not in the text.\n\nText:\n{text}"
)

ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
_TURN = re.compile(r"^(system|user|assistant|human|ai)\s*:\s?(.*)$", re.IGNORECASE)
_ROLE_NAMES = {"human": "user", "ai": "assistant"}

#: Roles of OpenAI's API that chat templates do not know, and the role each is sent as: OpenAI's
#: ``developer`` messages are what ``system`` messages were for earlier models, and it treats them so.
TEMPLATE_ROLES = {"developer": "system"}

#: Where a reply in a plain-text transcript ends: the model starting the user's next turn. It is a
#: stop string of every request rendered as a transcript (not returned, as stop strings never are).
TRANSCRIPT_STOP = "\nUser:"

#: Names the first argument goes by: the library's ``prompt``, the swarm_models documents' ``task``
#: and the Zeta document's ``prompt_text``.
PROMPT_NAMES = ("task", "prompt", "prompt_text")


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


def pop_prompt(method: str, first: Any, args: tuple[Any, ...], kwargs: dict[str, Any], first_name: str = "task") -> Any:
    """The prompt of a call written against any of the documented signatures.

    ``first`` is the first positional argument (or ``first_name=``); the other names of
    :data:`PROMPT_NAMES` are popped from ``kwargs``. Extra positional arguments have no meaning
    here (the documents' ``*args`` reach no model), so they are refused rather than silently dropped.

    Raises:
        TypeError: Extra positional arguments (named in the message), or the prompt given under two
            names with different values.
    """
    refuse_extra_args(method, args)
    given = [(first_name, first)] + [(name, kwargs.pop(name, None)) for name in PROMPT_NAMES if name != first_name]
    values = [(name, v) for name, v in given if v is not None]
    if len(values) > 1 and any(v != values[0][1] for _, v in values[1:]):
        names = " and ".join(name for name, _ in values)
        raise ParameterTypeError("prompt", f"{method}() got the prompt twice, as {names}: give one")
    return values[0][1] if values else None


def pop_prompts(method: str, first: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The prompts of a batch call: the first positional argument, ``tasks=`` or ``prompts=``.

    Raises:
        TypeError: Extra positional arguments, the prompts given twice, or none given.
    """
    refuse_extra_args(method, args, "tasks")
    other = kwargs.pop("prompts", None)
    if first is not None and other is not None and other is not first:
        raise ParameterTypeError("prompts", f"{method}() got the prompts twice, as tasks and prompts: give one")
    prompts = first if first is not None else other
    if prompts is None:
        raise ParameterTypeError("tasks", f"{method}() needs the tasks: a list of prompts")
    return prompts


def takes_tasks(fn: F) -> F:
    """Let a batch method ``fn(self, prompts, **overrides)`` be called as the documents call it,
    ``fn(tasks, *args, **kwargs)``, with ``tasks=`` or ``prompts=`` by keyword; extra positional
    arguments raise a TypeError naming them. The method's body always gets the prompts first,
    whatever the caller's spelling; an async one refuses event loops other than asyncio's."""
    name = fn.__name__
    wrapper: Callable[..., Any]
    if inspect.iscoroutinefunction(fn):

        async def run_async(self: Any, tasks: Any = None, *args: Any, **kwargs: Any) -> Any:
            require_asyncio()
            return await fn(self, pop_prompts(name, tasks, args, kwargs), **kwargs)

        wrapper = run_async
    else:

        def run_sync(self: Any, tasks: Any = None, *args: Any, **kwargs: Any) -> Any:
            return fn(self, pop_prompts(name, tasks, args, kwargs), **kwargs)

        wrapper = run_sync
    functools.update_wrapper(wrapper, fn)
    vars(wrapper).pop("__wrapped__")  # so help() shows the documents' (tasks=None, *args, **kwargs)
    return cast(F, wrapper)


def refuse_extra_args(method: str, args: tuple[Any, ...], what: str = "prompt") -> None:
    """Raise a TypeError naming ``args`` if there are any.

    Raises:
        TypeError: ``args`` is not empty.
    """
    if args:
        shown = ", ".join(repr(a)[:40] for a in args)
        raise TypeError(
            f"{method}() takes the {what} and keyword arguments; got {len(args)} extra positional "
            f"argument(s): {shown}. Pass sampling parameters by name (max_tokens=..., temperature=...)"
        )


def template_messages(messages: Sequence[Message]) -> list[Message]:
    """``messages`` with the roles a chat template knows (``developer`` sent as ``system``, see
    :data:`TEMPLATE_ROLES`); the other messages are passed on as they are."""
    return [
        {**message, "role": TEMPLATE_ROLES[str(message.get("role"))]}
        if message.get("role") in TEMPLATE_ROLES
        else message
        for message in messages
    ]


def render_transcript(messages: Sequence[Message], system_prompt: str | None = None) -> str:
    """A chat as plain text, for a model whose tokenizer has no chat template (a base model).

    The system prompt (or a leading system message) comes first as it is, then one
    ``User: ...`` / ``Assistant: ...`` line per message, ending with ``Assistant:`` for the model to
    continue; generation stops at :data:`TRANSCRIPT_STOP`. (:func:`parse_history` reads such
    ``User:``/``Assistant:`` lines back as messages.)
    """
    lines: list[str] = []
    rest = template_messages(messages)
    if rest and rest[0].get("role") == "system":
        system_prompt = str(rest.pop(0).get("content") or "")
    if system_prompt:
        lines.append(system_prompt.strip())
    for message in rest:
        role = str(message.get("role") or "user")
        lines.append(f"{role.capitalize()}: {str(message.get('content') or '').strip()}")
    lines.append("Assistant:")
    return "\n".join(lines)


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

        async def arun(self, task: Any = None, *args: Any, **overrides: Any) -> Any: ...

        def _call_sync(self, fn: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any) -> _T: ...

    @property
    def role(self) -> str:
        """The role of the caller's messages in :meth:`chat` (default ``"user"``)."""
        return self._role

    @role.setter
    def role(self, role: str | None) -> None:
        role = "user" if role is None else role  # None: the default, as in the swarm_models constructor
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

        A model whose tokenizer has no chat template (a base model such as GPT-2), or a subclass
        that implements only a text ``run``, gets the conversation as a plain-text transcript
        (:func:`render_transcript`) and its reply ends where it starts the next ``User:`` turn.

        Args:
            task: The new message (sent with :attr:`role`).
            history: Context for this call instead of ``self.history`` (messages or a transcript);
                ``None`` or ``""`` (the swarm_models default) use ``self.history``.
            **overrides: Sampling parameters for this reply (``n`` must be 1).

        Returns:
            The assistant's reply, also appended to ``self.history`` after ``task``.

        Raises:
            TypeError: ``task`` is not a str, or ``history`` is malformed.
            ValueError: Bad sampling parameters, or ``n`` > 1.
        """
        if not isinstance(task, str):
            raise ParameterTypeError("task", f"task must be a str, got {type(task).__name__}")
        context = list(self.history) if history is None or history == "" else parse_history(history)
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
