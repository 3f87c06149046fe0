"""LangChain: :class:`ChatAsyncLLM`, a chat model over the in-process engine (no HTTP hop).

    from async_llm.integrations.langchain import ChatAsyncLLM

    chat = ChatAsyncLLM(max_tokens=128)                      # the embedded default model
    print((await chat.ainvoke("Hello")).content)
    async for chunk in chat.astream("Tell me a story"):
        print(chunk.content, end="")

Requests go through the same OpenAI-shaped serving layer as ``async-llm serve``
(:class:`~async_llm.serve.serving.OpenAIServing`), in process: tools and every ``tool_choice``
form, ``response_format`` (json_schema through the engine's grammar, json mode), streamed
tool-call chunks, logprobs, usage and finish reasons behave exactly as over HTTP.

Engines are shared: chat models built with the same ``model`` and ``engine_kwargs`` use one engine,
loaded on first use (off the event loop) and closed by :meth:`ChatAsyncLLM.aclose_shared_engines`;
or pass an engine you own with ``llm=HuggingFaceLLM(...)`` (several chat models may share it; it
stays open until you close it). Needs the ``langchain`` extra (``pip install 'async-llm[langchain]'``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

try:
    from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
    from langchain_core.language_models import BaseChatModel, LanguageModelInput
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, convert_to_openai_messages
    from langchain_core.messages.ai import UsageMetadata
    from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
    from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
    from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
    from langchain_core.tools import BaseTool
    from langchain_core.utils.function_calling import convert_to_openai_tool
    from langchain_core.utils.pydantic import is_basemodel_subclass
    from pydantic import BaseModel, ConfigDict, Field, PrivateAttr
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "async_llm.integrations.langchain needs langchain-core: pip install 'async-llm[langchain]'"
    ) from exc

from async_llm.errors import AsyncLLMError, QueueFullError
from async_llm.integrations.shared import (
    EngineRef,
    aclose_shared_engines,
    api_error_cause,
    close_shared_engines,
    iterate_sync,
)
from async_llm.llm.huggingface import HuggingFaceLLM
from async_llm.serve.errors import APIError
from async_llm.serve.protocol import ChatCompletionRequest

__all__ = ["ChatAsyncLLM"]

ToolChoice = str | bool | dict[str, Any] | None


class ChatAsyncLLM(BaseChatModel):
    """A LangChain chat model running an async_llm engine in this process.

    Args (fields):
        model: Model id, folder or GGUF file (None: the embedded SmolLM2-135M-Instruct).
        llm: An engine to use instead of loading one (shared, never closed by this class).
        engine_kwargs: :class:`HuggingFaceLLM` arguments of a loaded engine (``device``, ``dtype``...).
        temperature, top_p, max_tokens, stop, seed: Sampling, as in OpenAI's API.
        timeout: Seconds a request may take in all (the engine's ``timeout``; the request then fails).
        max_retries: Retries of a request refused because the engine's queue is full.
        logprobs, top_logprobs: Token logprobs in ``response_metadata["logprobs"]``.
        streaming: ``invoke`` streams underneath (callbacks see each token).
        model_kwargs: Other request fields (``top_k``, ``repetition_penalty``, ``priority``...).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    model: str | None = Field(default=None, alias="model_name")
    llm: Any = Field(default=None, exclude=True)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    seed: int | None = None
    timeout: float | None = None
    max_retries: int = 2
    logprobs: bool | None = None
    top_logprobs: int | None = None
    streaming: bool = False
    model_kwargs: dict[str, Any] = Field(default_factory=dict)

    _ref: EngineRef | None = PrivateAttr(default=None)

    @property
    def _llm_type(self) -> str:
        return "async-llm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model_name, "engine_kwargs": self.engine_kwargs}

    @property
    def model_name(self) -> str:
        """The served model's id (the engine's, or what ``model`` names)."""
        if self.llm is not None:
            return str(self.llm.model_id or "default")
        return self.model or "SmolLM2-135M-Instruct"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "async_llm"
        params["ls_model_name"] = kwargs.get("model") or self.model_name
        if self.temperature is not None:
            params["ls_temperature"] = self.temperature
        if self.max_tokens is not None:
            params["ls_max_tokens"] = self.max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # -- the engine ------------------------------------------------------------------------------------
    def _engines(self) -> EngineRef:
        if self._ref is None:
            self._ref = EngineRef(self.llm, self.model, self.engine_kwargs)
        return self._ref

    def _engine(self) -> HuggingFaceLLM:
        return self._engines().engine()

    @staticmethod
    async def aclose_shared_engines() -> None:
        """Close every engine loaded by models built with ``model=`` (LangChain's and LlamaIndex's;
        the next use loads again)."""
        await aclose_shared_engines()

    @staticmethod
    def close_shared_engines() -> None:
        """Blocking :meth:`aclose_shared_engines`."""
        close_shared_engines()

    # -- requests --------------------------------------------------------------------------------------
    def _request(
        self, messages: list[BaseMessage], stop: list[str] | None, stream: bool, **kwargs: Any
    ) -> ChatCompletionRequest:
        kwargs.pop("model", None)  # a per-call model name is for tracing: this engine runs one model
        kwargs.pop("ls_structured_output_format", None)  # tracing only (LangChain normally takes it)
        body: dict[str, Any] = {"messages": convert_to_openai_messages(messages), "stream": stream}
        fields = {
            "temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
            "seed": self.seed, "logprobs": self.logprobs, "top_logprobs": self.top_logprobs, "timeout": self.timeout,
        }  # fmt: skip
        body.update({name: value for name, value in fields.items() if value is not None})
        stops = stop if stop is not None else self.stop
        if stops:
            body["stop"] = stops
        if stream:
            body["stream_options"] = {"include_usage": True}
        body.update(self.model_kwargs)
        body.update({name: value for name, value in kwargs.items() if value is not None})
        return ChatCompletionRequest.model_validate(body)

    async def _with_retries(self, call: Callable[[], Any]) -> Any:
        for attempt in range(self.max_retries + 1):
            try:
                return await call()
            except APIError as exc:
                if exc.status != 429 or attempt == self.max_retries:
                    raise api_error_cause(exc) from exc
                await asyncio.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            chunks = [chunk async for chunk in self._astream(messages, stop, run_manager, **kwargs)]
            return _result_from_chunks(chunks)
        serving = await self._engines().aserving()
        request = self._request(messages, stop, False, **kwargs)
        response = await self._with_retries(lambda: serving.chat_completion(request))
        return _result(response)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        serving = await self._engines().aserving()
        request = self._request(messages, stop, True, **kwargs)
        chunks = await self._with_retries(lambda: serving.chat_completion_stream(request))
        tail = _Tail()
        try:
            async for raw in chunks:
                chunk = tail.take(_chunk(raw))
                if chunk is None:
                    continue
                if run_manager is not None and chunk.text:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            await chunks.aclose()  # a caller that stops early aborts the request
        last = tail.last()
        if last is not None:
            yield last

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            return _result_from_chunks(list(self._stream(messages, stop, run_manager, **kwargs)))
        serving = self._engines().serving()
        request = self._request(messages, stop, False, **kwargs)
        return _result(serving.llm._call_sync(self._with_retries, lambda: serving.chat_completion(request)))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # The async stream, awaited item by item on the engine's sync loop.
        for chunk in iterate_sync(self._engine(), self._astream(messages, stop, None, **kwargs)):
            if run_manager is not None and chunk.text:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    # -- tools and structured output ---------------------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: ToolChoice = None,
        strict: bool | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer ``tools`` (OpenAI's format, pydantic classes, functions or LangChain tools).

        ``tool_choice``: ``"auto"`` (default), ``"none"``, ``"any"``/``"required"``/``True`` (some
        tool must be called), a tool's name, or OpenAI's ``{"type": "function", "function": {"name"}}``.
        Forced calls are constrained by the engine's grammar, so their arguments match the schema.
        """
        formatted = [convert_to_openai_tool(tool, strict=strict) for tool in tools]
        choice: Any = tool_choice
        if tool_choice in ("any", True):
            choice = "required"
        elif isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "required"):
            choice = {"type": "function", "function": {"name": tool_choice}}
        elif tool_choice is False:
            choice = "none"
        if choice is not None:
            kwargs["tool_choice"] = choice
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return super().bind(tools=formatted, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """Answers as ``schema`` (a pydantic class, a JSON schema or an OpenAI tool dict).

        ``method``: ``"json_schema"`` (default: the engine's grammar makes the answer valid),
        ``"function_calling"`` (a forced call of a tool named after the schema), or
        ``"json_mode"`` (any JSON object; say the shape in the prompt).
        """
        if kwargs:
            raise ValueError(f"unexpected arguments: {sorted(kwargs)}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        parser: Runnable[Any, Any]
        # For tracing: LangChain takes it out of the call's arguments and reports it with the run.
        traced = {"kwargs": {"method": method}, "schema": schema}
        if method == "function_calling":
            if schema is None:
                raise ValueError("schema is needed with method='function_calling'")
            tool = convert_to_openai_tool(schema, strict=strict)
            name = tool["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, strict=strict, ls_structured_output_format=traced)
            if is_pydantic:
                parser = PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
            else:
                parser = JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
        elif method == "json_schema":
            if schema is None:
                raise ValueError("schema is needed with method='json_schema'")
            function = convert_to_openai_tool(schema)["function"]
            json_schema = {"name": function["name"], "schema": function.get("parameters", {}), "strict": True}
            llm = self.bind(
                response_format={"type": "json_schema", "json_schema": json_schema}, ls_structured_output_format=traced
            )
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()  # type: ignore[arg-type]
        elif method == "json_mode":
            llm = self.bind(response_format={"type": "json_object"}, ls_structured_output_format=traced)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()  # type: ignore[arg-type]
        else:
            raise ValueError(f"method must be json_schema, function_calling or json_mode, got {method!r}")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")


def _usage(usage: dict[str, Any] | None) -> UsageMetadata | None:
    if not usage:
        return None
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return UsageMetadata(
        input_tokens=usage["prompt_tokens"],
        output_tokens=usage["completion_tokens"],
        total_tokens=usage["total_tokens"],
        input_token_details={"cache_read": cached},
        output_token_details={},
    )


def _tool_calls(raw: list[dict[str, Any]] | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    calls, invalid = [], []
    for call in raw or []:
        function = call.get("function", {})
        arguments = function.get("arguments") or "{}"
        try:
            args = json.loads(arguments)
            if not isinstance(args, dict):
                raise ValueError("arguments are not a JSON object")
            calls.append({"name": function.get("name"), "args": args, "id": call.get("id"), "type": "tool_call"})
        except ValueError as exc:
            invalid.append({
                "name": function.get("name"), "args": arguments, "id": call.get("id"), "error": str(exc),
                "type": "invalid_tool_call",
            })  # fmt: skip
    return calls, invalid


def _result(response: dict[str, Any]) -> ChatResult:
    generations = []
    usage = _usage(response.get("usage"))
    for choice in response["choices"]:
        message = choice["message"]
        calls, invalid = _tool_calls(message.get("tool_calls"))
        metadata = {
            "finish_reason": choice.get("finish_reason"), "model_name": response.get("model"),
            "system_fingerprint": response.get("system_fingerprint"), "model_provider": "async_llm",
        }  # fmt: skip
        if choice.get("logprobs") is not None:
            metadata["logprobs"] = choice["logprobs"]
        ai = AIMessage(
            content=message.get("content") or "", tool_calls=calls, invalid_tool_calls=invalid,
            usage_metadata=usage, response_metadata=metadata, id=response.get("id"),
        )  # fmt: skip
        generations.append(ChatGeneration(message=ai, generation_info={"finish_reason": choice.get("finish_reason")}))
    return ChatResult(generations=generations, llm_output={"model_name": response.get("model")})


def _chunk(raw: dict[str, Any]) -> ChatGenerationChunk | None:
    """A LangChain chunk for one OpenAI stream chunk (None for the opening role-only chunk)."""
    if "error" in raw:
        error = raw["error"]
        raise (QueueFullError if error.get("code") == "rate_limit_exceeded" else AsyncLLMError)(error.get("message"))
    usage = _usage(raw.get("usage"))
    if not raw.get("choices"):
        if usage is None:
            return None
        return ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=usage, id=raw.get("id")))
    choice = raw["choices"][0]
    delta = choice.get("delta") or {}
    finish = choice.get("finish_reason")
    tool_chunks = [
        {
            "name": (call.get("function") or {}).get("name"),
            "args": (call.get("function") or {}).get("arguments"),
            "id": call.get("id"),
            "index": call.get("index"),
            "type": "tool_call_chunk",
        }  # fmt: skip
        for call in delta.get("tool_calls") or []
    ]
    content = delta.get("content") or ""
    if not content and not tool_chunks and finish is None and choice.get("logprobs") is None:
        return None
    metadata: dict[str, Any] = {}
    info: dict[str, Any] | None = None
    if finish is not None:
        metadata = {
            "finish_reason": finish, "model_name": raw.get("model"),
            "system_fingerprint": raw.get("system_fingerprint"), "model_provider": "async_llm",
        }  # fmt: skip
        info = {"finish_reason": finish}
    if choice.get("logprobs") is not None:
        metadata["logprobs"] = choice["logprobs"]
    message = AIMessageChunk(
        content=content, tool_call_chunks=tool_chunks, response_metadata=metadata, id=raw.get("id"),  # type: ignore[arg-type]
    )  # fmt: skip
    return ChatGenerationChunk(message=message, generation_info=info)


class _Tail:
    """Holds a stream's finish chunk until its usage chunk comes, and sends them as one last chunk
    (``chunk_position="last"``: LangChain then parses the tool-call chunks and adds no chunk of its own)."""

    def __init__(self) -> None:
        self._held: ChatGenerationChunk | None = None

    def take(self, chunk: ChatGenerationChunk | None) -> ChatGenerationChunk | None:
        """``chunk`` to send now, or None when it is held (or there is none)."""
        if chunk is None:
            return None
        message = chunk.message
        ending = chunk.generation_info is not None or (message.usage_metadata is not None and not message.content)  # type: ignore[attr-defined]
        if not ending:
            return chunk
        self._held = chunk if self._held is None else self._held + chunk
        return None

    def last(self) -> ChatGenerationChunk | None:
        held, self._held = self._held, None
        if held is not None:
            held.message.chunk_position = "last"  # type: ignore[attr-defined]
        return held


def _result_from_chunks(chunks: list[ChatGenerationChunk]) -> ChatResult:
    if not chunks:
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=""))])
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    message = total.message
    ai = AIMessage(
        content=message.content, tool_calls=message.tool_calls, invalid_tool_calls=message.invalid_tool_calls,  # type: ignore[attr-defined]
        usage_metadata=message.usage_metadata, response_metadata=message.response_metadata, id=message.id,  # type: ignore[attr-defined]
    )  # fmt: skip
    return ChatResult(generations=[ChatGeneration(message=ai, generation_info=total.generation_info)])
