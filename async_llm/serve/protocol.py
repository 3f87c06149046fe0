"""OpenAI request bodies (pydantic) and the mapping of their fields onto the engine's arguments.

Only the shapes live here. Value ranges are checked once, by :class:`~async_llm.SamplingParams`, when
the request is submitted: the server and the library can then never disagree on what is valid.
Models are strict (no ``"0.5"`` for a float, no ``true`` for an int) and accept unknown fields,
because OpenAI clients send fields this server has no use for (``user``, ``store``, ``metadata``...);
the few that would change the answer if ignored are refused by :func:`check_unsupported`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from async_llm.serve.errors import APIError

#: Most choices (``n``) one request may ask for: each is a row of the batch.
MAX_N = 64

# Fields of OpenAI's API this server cannot honour, with the values that mean "not used". A request
# that sets one to anything else gets a 400 naming it, rather than an answer that silently ignores it.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    # vLLM's token controls and output options (accepted by its server, and by the openai client
    # through extra_body): each would change the answer if ignored.
    "min_tokens": (None, 0),
    "stop_token_ids": (None, []),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "prompt_logprobs": (None,),
    "chat_template_kwargs": (None, {}),
}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    include_usage: bool = False


class SamplingRequest(_Strict):
    """Fields shared by completions and chat completions (OpenAI's names, plus vLLM's extensions)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    best_of: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions (as vLLM accepts them in the body; the openai client sends them through extra_body).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :meth:`HuggingFaceLLM.submit`: the fields the client set.

        Fields left out keep the engine's defaults (``max_tokens`` included).
        """
        names = (
            "max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "seed",
            "frequency_penalty", "presence_penalty", "repetition_penalty", "ignore_eos",
        )  # fmt: skip
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def field_name(self, param: str) -> str:
        """The request field that carries the sampling parameter ``param`` (for error messages)."""
        return param

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    """Body of ``POST /v1/completions``: ``prompt`` is raw text, sent without a chat template."""

    prompt: str | list[str]


class TextPart(_Strict):
    """A text part of a message's content (the only kind of part a text model can read)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One message of a chat; content parts are joined into one text."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    """Body of ``POST /v1/chat/completions``; ``max_completion_tokens`` wins over ``max_tokens``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def sampling_kwargs(self) -> dict[str, Any]:
        kwargs = super().sampling_kwargs()
        if self.max_completion_tokens is not None:
            kwargs["max_tokens"] = self.max_completion_tokens
        return kwargs

    def field_name(self, param: str) -> str:
        if param == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return "messages" if param == "prompt" else param

    def chat(self) -> list[dict[str, str]]:
        """The messages as the engine takes them: ``{"role", "content"}`` dicts."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]


def check_unsupported(request: SamplingRequest) -> None:
    """Refuse fields this server would otherwise silently ignore.

    Raises:
        APIError: 400 naming the first such field set to a value other than its neutral one.
    """
    extra = request.model_extra or {}
    for name, neutral in _UNSUPPORTED.items():
        if name in extra and extra[name] not in neutral:
            raise APIError(400, f"{name} is not supported by this server", param=name)
        # Completions' logprobs is a count: 0 asks for the sampled token's own logprob, not for none.
        value = extra.get(name)
        if name == "logprobs" and isinstance(request, CompletionRequest) and value == 0 and value is not False:
            raise APIError(400, "logprobs is not supported by this server", param=name)
    if request.best_of is not None and request.best_of != request.n:
        raise APIError(400, "best_of is not supported by this server (only best_of == n)", param="best_of")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
