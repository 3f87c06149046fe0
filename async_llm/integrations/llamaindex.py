"""LlamaIndex: :class:`AsyncLLM` (an LLM with function calling) and :class:`AsyncLLMEmbedding`, over
the in-process engine (no HTTP hop).

    from llama_index.core import Settings, VectorStoreIndex, Document
    from async_llm.integrations.llamaindex import AsyncLLM, AsyncLLMEmbedding

    Settings.llm = AsyncLLM(max_tokens=128)
    Settings.embed_model = AsyncLLMEmbedding()
    index = VectorStoreIndex.from_documents([Document(text="...")])
    print(await index.as_query_engine().aquery("..."))

Chat goes through the same serving layer as ``async-llm serve`` (tools, ``tool_choice``, usage and
finish reasons as over HTTP); completion runs the prompt as one user message of the chat template.
Streaming is native (``astream_chat`` yields as the engine produces). Structured prediction uses
function calling (a forced call, constrained by the engine's grammar). Engines are shared as in the
LangChain adapter: models built with the same ``model`` and ``engine_kwargs`` use one engine
(:func:`~async_llm.integrations.shared.aclose_shared_engines` closes them); ``llm=`` takes an engine
you own. Needs the ``llamaindex`` extra (``pip install 'async-llm[llamaindex]'``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Generator, Sequence
from typing import Any

try:
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from llama_index.core.base.llms.types import (
        ChatMessage,
        ChatResponse,
        ChatResponseAsyncGen,
        ChatResponseGen,
        CompletionResponse,
        CompletionResponseAsyncGen,
        CompletionResponseGen,
        LLMMetadata,
        MessageRole,
    )
    from llama_index.core.bridge.pydantic import Field, PrivateAttr
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
    from llama_index.core.llms.function_calling import FunctionCallingLLM
    from llama_index.core.llms.llm import ToolSelection
    from llama_index.core.tools import BaseTool
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the LlamaIndex adapter needs llama-index-core: pip install 'async-llm[llamaindex]'") from exc

from async_llm.errors import AsyncLLMError
from async_llm.integrations.shared import EngineRef, api_error_cause, iterate_sync
from async_llm.llm.huggingface import HuggingFaceLLM
from async_llm.serve.errors import APIError
from async_llm.serve.protocol import ChatCompletionRequest

__all__ = ["AsyncLLM", "AsyncLLMEmbedding"]

DEFAULT_CONTEXT = 2048


def _openai_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.role.value if isinstance(message.role, MessageRole) else str(message.role)
        role = {"developer": "system", "chatbot": "assistant", "model": "assistant", "function": "tool"}.get(role, role)
        item: dict[str, Any] = {"role": role, "content": message.content or ""}
        calls = message.additional_kwargs.get("tool_calls")
        if calls:
            item["tool_calls"] = [_plain_call(call) for call in calls]
            item["content"] = message.content or None
        if role == "tool":
            item["tool_call_id"] = message.additional_kwargs.get("tool_call_id", "")
        out.append(item)
    return out


def _plain_call(call: Any) -> dict[str, Any]:
    if isinstance(call, dict):
        return call
    dump = getattr(call, "model_dump", None)
    return dump() if callable(dump) else dict(call)


class AsyncLLM(FunctionCallingLLM):
    """A LlamaIndex LLM running an async_llm engine in this process (see the module docstring)."""

    model: str | None = Field(default=None, description="Model id, folder or GGUF file (None: the default model).")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="HuggingFaceLLM arguments of a loaded engine."
    )
    temperature: float | None = Field(default=None, description="Sampling temperature (None: the engine's).")
    max_tokens: int | None = Field(default=None, description="Most tokens per answer (None: the engine's).")
    top_p: float | None = Field(default=None)
    seed: int | None = Field(default=None)
    additional_kwargs: dict[str, Any] = Field(default_factory=dict, description="Other request fields (top_k, ...).")

    _engine: EngineRef = PrivateAttr()

    def __init__(self, llm: HuggingFaceLLM | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._engine = EngineRef(llm, self.model, self.engine_kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "AsyncLLM"

    @property
    def metadata(self) -> LLMMetadata:
        llm = self._engine.given
        context = (llm.max_context if llm is not None else None) or DEFAULT_CONTEXT
        name = str(llm.model_id) if llm is not None and llm.model_id else self.model or "SmolLM2-135M-Instruct"
        return LLMMetadata(
            context_window=context, num_output=self.max_tokens or 256, is_chat_model=True,
            is_function_calling_model=True, model_name=name,
        )  # fmt: skip

    # -- requests ------------------------------------------------------------------------------------------
    def _request(self, messages: Sequence[ChatMessage], stream: bool, **kwargs: Any) -> ChatCompletionRequest:
        body: dict[str, Any] = {"messages": _openai_messages(messages), "stream": stream}
        for name, value in (("temperature", self.temperature), ("max_tokens", self.max_tokens),
                            ("top_p", self.top_p), ("seed", self.seed)):  # fmt: skip
            if value is not None:
                body[name] = value
        if stream:
            body["stream_options"] = {"include_usage": True}
        body.update(self.additional_kwargs)
        body.update({k: v for k, v in kwargs.items() if v is not None and k in _REQUEST_FIELDS})
        return ChatCompletionRequest.model_validate(body)

    async def _achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        serving = await self._engine.aserving()
        try:
            answer = await serving.chat_completion(self._request(messages, False, **kwargs))
        except APIError as exc:
            raise api_error_cause(exc) from exc
        return _chat_response(answer)

    async def _astream(self, messages: Sequence[ChatMessage], **kwargs: Any) -> AsyncGenerator[ChatResponse, None]:
        serving = await self._engine.aserving()
        try:
            chunks = await serving.chat_completion_stream(self._request(messages, True, **kwargs))
        except APIError as exc:
            raise api_error_cause(exc) from exc
        text = ""
        calls: dict[int, dict[str, Any]] = {}
        try:
            async for chunk in chunks:
                if "error" in chunk:
                    raise AsyncLLMError(chunk["error"].get("message"))
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    content = delta.get("content") or ""
                    for call in delta.get("tool_calls") or []:
                        entry = calls.setdefault(
                            call.get("index", 0),
                            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
                        )
                        entry["id"] = entry["id"] or call.get("id")
                        function = call.get("function") or {}
                        entry["function"]["name"] += function.get("name") or ""
                        entry["function"]["arguments"] += function.get("arguments") or ""
                    if not content and not delta.get("tool_calls") and choice.get("finish_reason") is None:
                        continue
                    text += content
                    extra: dict[str, Any] = {"tool_calls": list(calls.values())} if calls else {}
                    message = ChatMessage(role=MessageRole.ASSISTANT, content=text, additional_kwargs=extra)
                    raw = {"finish_reason": choice.get("finish_reason")}
                    yield ChatResponse(message=message, delta=content, raw=raw)
        finally:
            await chunks.aclose()  # a caller that stops early aborts the request

    # -- chat and completion ------------------------------------------------------------------------------
    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await self._achat(messages, **kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return self._astream(messages, **kwargs)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._engine.engine()._call_sync(self._achat, messages, **kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return iterate_sync(self._engine.engine(), self._astream(messages, **kwargs))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        response = await self._achat([ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs)
        return CompletionResponse(text=response.message.content or "", raw=response.raw)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        stream = self._astream([ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs)

        async def gen() -> AsyncGenerator[CompletionResponse, None]:
            async for response in stream:
                yield CompletionResponse(text=response.message.content or "", delta=response.delta, raw=response.raw)

        return gen()

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        response = self.chat([ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs)
        return CompletionResponse(text=response.message.content or "", raw=response.raw)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        stream = self.stream_chat([ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs)

        def gen() -> Generator[CompletionResponse, None, None]:
            for response in stream:
                yield CompletionResponse(text=response.message.content or "", delta=response.delta, raw=response.raw)

        return gen()

    # -- function calling ---------------------------------------------------------------------------------
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(
                ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str) else user_msg
            )
        specs = [tool.metadata.to_openai_tool() for tool in tools]
        choice = kwargs.pop("tool_choice", None)
        if choice is None:
            choice = ("required" if tool_required else "auto") if specs else None
        elif isinstance(choice, str) and choice not in ("auto", "none", "required"):
            choice = {"type": "function", "function": {"name": choice}}  # a tool's name (FunctionAgent's)
        return {
            "messages": messages, "tools": specs or None, "tool_choice": choice,
            "parallel_tool_calls": allow_parallel_tool_calls if specs else None, **kwargs,
        }  # fmt: skip

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        calls = response.message.additional_kwargs.get("tool_calls") or []
        if not calls and error_on_no_tool_call:
            raise ValueError(f"Expected at least one tool call, but got {len(calls)} tool calls.")
        selections = []
        for call in calls:
            call = _plain_call(call)
            function = call.get("function") or {}
            try:
                arguments = json.loads(function.get("arguments") or "{}")
            except ValueError:
                arguments = {}
            selections.append(
                ToolSelection(tool_id=call.get("id") or "", tool_name=function.get("name") or "", tool_kwargs=arguments)
            )
        return selections


_REQUEST_FIELDS = frozenset(
    {
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "stop",
        "logprobs",
        "top_logprobs",
        "temperature",
        "max_tokens",
        "top_p",
        "seed",
        "top_k",
        "timeout",
        "priority",
    }
)


def _chat_response(answer: dict[str, Any]) -> ChatResponse:
    choice = answer["choices"][0]
    message = choice["message"]
    extra: dict[str, Any] = {"tool_calls": message["tool_calls"]} if message.get("tool_calls") else {}
    usage = answer.get("usage") or {}
    raw = {
        "finish_reason": choice.get("finish_reason"),
        "usage": usage,
        "model": answer.get("model"),
        "id": answer.get("id"),
    }
    counts = {"prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens")}
    return ChatResponse(
        message=ChatMessage(role=MessageRole.ASSISTANT, content=message.get("content") or "", additional_kwargs=extra),
        raw=raw, additional_kwargs=counts,
    )  # fmt: skip


class AsyncLLMEmbedding(BaseEmbedding):
    """LlamaIndex embeddings from the served causal LM (:meth:`HuggingFaceLLM.aembed`)."""

    model: str | None = Field(default=None, description="Model id, folder or GGUF file (None: the default model).")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    pooling: str | None = Field(default=None, description="last or mean (None: the model folder's, else last).")
    dimensions: int | None = Field(default=None)
    query_instruction: str | None = Field(
        default=None, description="Put before queries (Qwen3-Embedding's 'Instruct: ...\\nQuery:')."
    )

    _engine: EngineRef = PrivateAttr()

    def __init__(self, llm: HuggingFaceLLM | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("model_name", kwargs.get("model") or "async-llm")
        super().__init__(**kwargs)
        self._engine = EngineRef(llm, self.model, self.engine_kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "AsyncLLMEmbedding"

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        llm = await self._engine.aengine()
        return await llm.aembed(texts, pooling=self.pooling, dimensions=self.dimensions)

    def _query(self, query: str) -> str:
        return f"{self.query_instruction}{query}" if self.query_instruction else query

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return (await self._embed([self._query(query)]))[0]

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return (await self._embed([text]))[0]

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return await self._embed(texts)

    def _get_query_embedding(self, query: str) -> list[float]:
        llm = self._engine.engine()
        return llm.embed([self._query(query)], pooling=self.pooling, dimensions=self.dimensions)[0]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._get_text_embeddings([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        llm = self._engine.engine()
        return llm.embed(texts, pooling=self.pooling, dimensions=self.dimensions)
