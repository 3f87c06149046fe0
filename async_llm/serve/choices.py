"""The OpenAI shapes of one request's choices: message or text, logprobs, prompt logprobs, echo and
tool calls, for whole responses and for stream chunks alike."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from async_llm.llm.base import Prompt
from async_llm.llm.tool_stream import ToolCallStreamParser
from async_llm.llm.tool_use import finish_reason
from async_llm.outputs import Logprob, StreamDelta, TokenStream
from async_llm.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest

Kind = Literal["completion", "chat"]


class ChoiceView:
    """Renders the choices of one request (``n`` per prompt, prompt-major).

    Args:
        kind: ``completion`` or ``chat``.
        request: The request's body.
        prompts: Its prompts (for ``echo``).
    """

    def __init__(self, kind: Kind, request: SamplingRequest, prompts: Sequence[Prompt]) -> None:
        self.kind = kind
        self.request = request
        self.prompts = prompts
        self.top = request.top_logprobs_count()  # None: no logprobs asked
        self.one_call = isinstance(request, ChatCompletionRequest) and request.parallel_tool_calls is False

    # -- whole responses ------------------------------------------------------------------------------
    def choice(self, index: int, text: str, stream: TokenStream) -> dict[str, Any]:
        """A choice of a non-streaming response."""
        calls: list[dict[str, Any]] = []
        content: str | None = text
        if stream.tool_use is not None:
            content, calls = stream.tool_use.parse(text)
            calls = calls[:1] if self.one_call else calls
        reason = self._reason(stream, bool(calls))
        choice: dict[str, Any] = {"index": index}
        if self.kind == "completion":
            prompt_lps = stream.prompt_logprobs if self._echo() else None
            choice["text"] = self.echo(index) + text
            choice["logprobs"] = (
                self._completion_logprobs(stream, stream.logprobs or [], prompt_lps) if self.top is not None else None
            )
        else:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            choice["message"] = message
            choice["logprobs"] = (
                {"content": [lp.to_openai() for lp in stream.logprobs or []]} if self.top is not None else None
            )
        choice["finish_reason"] = reason
        if self.request.prompt_logprobs is not None:
            choice["prompt_logprobs"] = _prompt_logprobs(stream.prompt_logprobs)
        return choice

    # -- stream chunks --------------------------------------------------------------------------------
    def stream_parser(self, stream: TokenStream) -> ToolCallStreamParser | None:
        return stream.tool_use.stream_parser() if stream.tool_use is not None else None

    def tool_events(self, parser: ToolCallStreamParser | None, text: str | None) -> list[dict[str, Any]]:
        """The chunk deltas of ``text`` through the parser (``None``: the end of the output)."""
        if parser is None:
            return []
        events = parser.finish() if text is None else parser.feed(text)
        if self.one_call:  # parallel_tool_calls=false: the first call only
            events = [e for e in events if all(c.get("index", 0) == 0 for c in e.get("tool_calls", []))]
        return events

    def finish_reason(self, stream: TokenStream, parser: ToolCallStreamParser | None) -> str | None:
        return self._reason(stream, parser is not None and bool(parser.tool_calls))

    def delta_logprobs(self, index: int, delta: StreamDelta, stream: TokenStream, first: bool) -> dict[str, Any] | None:
        """The logprobs of a stream chunk's tokens (the echoed prompt's before them on the first)."""
        if self.top is None:
            return None
        if self.kind == "chat":
            return {"content": [lp.to_openai() for lp in delta.logprobs or []]}
        prompt_lps = stream.prompt_logprobs if first and self._echo() else None
        return self._completion_logprobs(stream, delta.logprobs or [], prompt_lps)

    def echo(self, index: int) -> str:
        """The prompt text to put before choice ``index``'s text (completions with ``echo``)."""
        if not self._echo():
            return ""
        prompt = self.prompts[index // self.request.n]
        return prompt if isinstance(prompt, str) else ""

    # -- helpers ----------------------------------------------------------------------------------------
    def _echo(self) -> bool:
        return isinstance(self.request, CompletionRequest) and self.request.echo

    def _reason(self, stream: TokenStream, called: bool) -> str | None:
        return finish_reason(stream.finish_reason.value if stream.finish_reason is not None else None, called)

    def _completion_logprobs(
        self, stream: TokenStream, logprobs: Sequence[Logprob], prompt_logprobs: Sequence[Logprob | None] | None
    ) -> dict[str, Any]:
        """The completions endpoint's (legacy) shape: parallel lists, ``top_logprobs`` as dicts."""
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        for entry in [*(prompt_logprobs or []), *logprobs]:
            if entry is None:  # the first prompt token has no logprob
                tokens.append(stream.token_text(stream.prompt_token_ids[0]))
                values.append(None)
                tops.append(None)
                continue
            tokens.append(entry.token)
            values.append(entry.logprob)
            tops.append({t.token: t.logprob for t in entry.top_logprobs[: self.top]})
        offsets, position = [], 0
        for token in tokens:
            offsets.append(position)
            position += len(token)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _prompt_logprobs(entries: Sequence[Logprob | None] | None) -> list[dict[str, Any] | None] | None:
    """vLLM's ``prompt_logprobs``: per prompt token, ``{token_id: {"logprob", "rank", "decoded_token"}}``
    for the token itself and the most likely ones (``None`` for the first token)."""
    if entries is None:
        return None
    out: list[dict[str, Any] | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        ranks = {top.token_id: rank for rank, top in enumerate(entry.top_logprobs, start=1)}
        position = {
            str(entry.token_id): {
                "logprob": entry.logprob,
                "rank": ranks.get(entry.token_id),
                "decoded_token": entry.token,
            }
        }
        for top in entry.top_logprobs:
            position[str(top.token_id)] = {
                "logprob": top.logprob,
                "rank": ranks[top.token_id],
                "decoded_token": top.token,
            }
        out.append(position)
    return out
