"""OpenAI request bodies (pydantic) and the mapping of their fields onto the engine's arguments.

Only the shapes live here. Value ranges are checked once, by :class:`~async_llm.SamplingParams`, when
the request is submitted: the server and the library can then never disagree on what is valid.
Models are strict (no ``"0.5"`` for a float, no ``true`` for an int) and accept unknown fields,
because OpenAI clients send fields this server has no use for (``user``, ``store``, ``metadata``...);
the few that would change the answer if ignored are refused by :func:`check_unsupported`, and the
ones nobody knows (a typo such as ``temprature``) are named by :meth:`SamplingRequest.unknown_fields`.

The sampling fields are those of :class:`~async_llm.SamplingParams` (:data:`SAMPLING_FIELDS`): every
field is forwarded under its own name unless :data:`NOT_OVER_HTTP` says why not, so a new sampling
parameter reaches the server without a change here (typed and range-checked by ``SamplingParams``);
a pydantic field below only gives it a stricter JSON shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from async_llm.sampling_params import SamplingParams
from async_llm.serve.errors import APIError

#: Most choices (``n``) one request may ask for: each is a row of the batch.
MAX_N = 64

# Fields of OpenAI's and vLLM's APIs this server cannot honour, with the values that mean "not used".
# A request that sets one to anything else gets a 400 naming it, rather than an answer that silently
# ignores it. Fields that cannot change the answer (``user``, ``store``, ``metadata``,
# ``service_tier``, ``prompt_cache_key``, ``safety_identifier``) are accepted and have no effect.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""),
    "functions": (None, []),  # the deprecated form of tools
    "function_call": (None, "none", "auto"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
    "use_beam_search": (None, False),
    "num_beams": (None, 1),  # beam search: the library's, not over HTTP (NOT_OVER_HTTP)
    "early_stopping": (None, False),
    "length_penalty": (None, 1.0, 1),
    "spaces_between_special_tokens": (None, True),
    "truncate_prompt_tokens": (None,),
    "add_generation_prompt": (None, True),
    "continue_final_message": (None, False),
    "add_special_tokens": (None, False),
    "documents": (None, []),
    "chat_template": (None,),
    "mm_processor_kwargs": (None, {}),
    "structural_tag": (None,),
    "structured_outputs": (None,),
    "guided_decoding_backend": (None,),
    "guided_whitespace_pattern": (None,),
    "logits_processors": (None, []),
    "return_tokens_as_token_ids": (None, False),
    "cache_salt": (None,),
    "kv_transfer_params": (None,),
    "vllm_xargs": (None,),
    # Fields of the other endpoint (chat's on completions, completions' on chat).
    "echo": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True),
    "chat_template_kwargs": (None, {}),
}

#: Fields of OpenAI's API that cannot change the answer: accepted, no effect, no warning.
_NO_EFFECT = frozenset({"store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier"})

#: The fields of :class:`SamplingParams` that are not taken from a request body under their own
#: name, and why. Every other field is forwarded (:data:`SAMPLING_FIELDS`).
NOT_OVER_HTTP: dict[str, str] = {
    "n": "the server submits one request per choice (each with its own seed)",
    "logprobs": "each endpoint has its own shape (a count on completions, a flag on chat)",
    "top_logprobs": "each endpoint has its own shape (completions' logprobs count)",
    "logits_processors": "callables cannot travel as JSON (refused by check_unsupported)",
    "num_beams": "beam search is not served over HTTP (refused by check_unsupported)",
    "length_penalty": "beam search only (refused by check_unsupported)",
    "early_stopping": "beam search only (refused by check_unsupported)",
}
#: HTTP names of sampling parameters that differ from the library's, HTTP name -> field. When the
#: request gives both, the HTTP name wins (OpenAI: ``max_completion_tokens`` replaces ``max_tokens``).
RENAMED: dict[str, str] = {"max_completion_tokens": "max_tokens"}
#: The sampling parameters a request body may set under the library's name: the public fields of
#: :class:`SamplingParams` (its bookkeeping fields are left out) but those of :data:`NOT_OVER_HTTP`.
SAMPLING_FIELDS: tuple[str, ...] = tuple(
    f.name
    for f in dataclasses.fields(SamplingParams)
    if f.name in SamplingParams.field_names() and f.name not in NOT_OVER_HTTP
)


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
    # Token controls (OpenAI's logit_bias; vLLM's others).
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    prompt_logprobs: int | None = None
    # Structured output (OpenAI's response_format; vLLM's guided_*).
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :meth:`HuggingFaceLLM.submit`: the sampling fields the client set
        (:data:`SAMPLING_FIELDS`, and :data:`RENAMED` under the library's names).

        Fields left out keep the engine's defaults (``max_tokens`` included).
        """
        kwargs = {name: value for name in SAMPLING_FIELDS if (value := self._given(name)) is not None}
        for http_name, name in RENAMED.items():
            if (value := self._given(http_name)) is not None:
                kwargs[name] = value
        return kwargs

    def _given(self, name: str) -> Any:
        """A body field's value: a declared field, or one only ``SamplingParams`` types (extra)."""
        if name in type(self).model_fields:
            return getattr(self, name)
        return (self.model_extra or {}).get(name)

    def unknown_fields(self) -> list[str]:
        """The body's fields that no part of this server or of OpenAI's API knows (typos, fields of
        other APIs), sorted; nested objects are not searched (clients send back messages with
        fields of their own)."""
        known = {*_UNSUPPORTED, *_NO_EFFECT, *SAMPLING_FIELDS, *RENAMED}
        return sorted(name for name in self.model_extra or {} if name not in known)

    def top_logprobs_count(self) -> int | None:
        """How many alternatives per generated token the client asked for; None: no logprobs."""
        return None

    def field_name(self, param: str) -> str:
        """The request field that carries the sampling parameter ``param`` (for error messages)."""
        for http_name, name in RENAMED.items():
            if name == param and self._given(http_name) is not None:
                return http_name
        return param

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    """Body of ``POST /v1/completions``: ``prompt`` is raw text, sent without a chat template.

    ``logprobs`` is a count (0..20: the sampled token's logprob plus that many alternatives);
    ``echo`` puts the prompt before the text (and its tokens' logprobs before the others').
    """

    prompt: str | list[str]
    logprobs: int | None = None
    echo: bool = False

    def sampling_kwargs(self) -> dict[str, Any]:
        kwargs = super().sampling_kwargs()
        if self.logprobs is not None:
            kwargs.update(logprobs=True, top_logprobs=self.logprobs)
            if self.echo:
                kwargs.setdefault("prompt_logprobs", self.logprobs)
        return kwargs

    def field_name(self, param: str) -> str:
        return "logprobs" if param == "top_logprobs" else super().field_name(param)

    def top_logprobs_count(self) -> int | None:
        return self.logprobs


class TextPart(_Strict):
    """A text part of a message's content (the only kind of part a text model can read)."""

    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    """A call an assistant message made (sent back in the history)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    """One message of a chat; content parts are joined into one text."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

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
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def sampling_kwargs(self) -> dict[str, Any]:
        kwargs = super().sampling_kwargs()
        if self.logprobs:
            kwargs["logprobs"] = True
        if self.top_logprobs is not None:
            kwargs["top_logprobs"] = self.top_logprobs
        if self.tools is not None:
            kwargs["tools"] = self.tools
        if self.tool_choice is not None:
            kwargs["tool_choice"] = self.tool_choice
        if self.chat_template_kwargs is not None:
            kwargs["chat_template_kwargs"] = self.chat_template_kwargs
        return kwargs

    def field_name(self, param: str) -> str:
        return "messages" if param == "prompt" else super().field_name(param)

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat(self) -> list[dict[str, Any]]:
        """The messages as the engine takes them: ``{"role", "content"}`` dicts, with the calls
        of assistant messages and the ids of tool results."""
        messages: list[dict[str, Any]] = []
        for m in self.messages:
            message: dict[str, Any] = {"role": m.role, "content": m.text()}
            if m.tool_calls:
                message["tool_calls"] = [call.model_dump() for call in m.tool_calls]
            for key in ("tool_call_id", "name"):
                if getattr(m, key) is not None:
                    message[key] = getattr(m, key)
            messages.append(message)
        return messages


def check_unsupported(request: SamplingRequest) -> None:
    """Refuse fields this server would otherwise silently ignore.

    Raises:
        APIError: 400 naming the first such field set to a value other than its neutral one.
    """
    extra = request.model_extra or {}
    for name, neutral in _UNSUPPORTED.items():
        if name in extra and extra[name] not in neutral:
            raise APIError(400, f"{name} is not supported by this server", param=name)
    if request.best_of is not None and request.best_of != request.n:
        raise APIError(400, "best_of is not supported by this server (only best_of == n)", param="best_of")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's ``usage`` object, with ``prompt_tokens_details.cached_tokens`` (prompt tokens taken
    from the prefix cache, as OpenAI and vLLM report them)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class EmbeddingRequest(_Strict):
    """``/v1/embeddings``: OpenAI's fields, plus ``pooling`` and ``normalize`` (extensions)."""

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    pooling: Literal["last", "mean"] | None = None
    normalize: bool = True

    def unknown_fields(self) -> list[str]:
        """The body's fields this route does not know, sorted."""
        return sorted(self.model_extra or {})
