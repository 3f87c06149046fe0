"""OpenAIServing: OpenAI's completions and chat completions over one engine, independent of HTTP.

The FastAPI app (:mod:`async_llm.serve.openai_app`) and the Ray Serve deployment's Python methods
(:mod:`async_llm.serve.ray`) both call this class, so they answer the same requests the same way.

Every request is submitted in full (all ``n`` choices of all prompts) before anything is returned,
so invalid input, a full queue or a closed engine surface as an :class:`APIError` while the HTTP
status can still say so; only failures during generation arrive inside a stream.
"""

from __future__ import annotations

import array
import asyncio
import base64
import functools
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

from async_llm import __version__
from async_llm.llm.base import Prompt
from async_llm.llm.concurrency import gather
from async_llm.llm.embeddings import embed
from async_llm.llm.huggingface import HuggingFaceLLM
from async_llm.log import get_logger
from async_llm.outputs import StreamDelta, TokenStream
from async_llm.sampling_params import choice_seed
from async_llm.serve.choices import ChoiceView
from async_llm.serve.errors import APIError, from_exception
from async_llm.serve.metrics import ServerMetrics
from async_llm.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    SamplingRequest,
    check_unsupported,
    usage,
)

log = get_logger("async_llm.serve")

Kind = Literal["completion", "chat"]
Chunk = dict[str, Any]
#: Unknown field names remembered so that each is logged once; past this many, no more are logged
#: (a client sending random names cannot grow the set without bound).
MAX_WARNED_FIELDS = 1000


class ChunkStream:
    """The chunks of one streaming request, as OpenAI-format dicts (the transport adds ``[DONE]``).

    Iterate it once. :meth:`aclose` aborts every choice still running; call it when the transport
    is done, even if iteration never started (a client that left before the first byte).
    """

    def __init__(self, chunks: AsyncIterator[Chunk], streams: Sequence[TokenStream]) -> None:
        self._chunks = chunks
        self._streams = streams

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._chunks

    async def aclose(self) -> None:
        """Abort what is still running and release the generator. Idempotent."""
        for stream in self._streams:
            stream.close()
        await self._chunks.aclose()  # type: ignore[attr-defined]


class OpenAIServing:
    """Answers OpenAI requests with one shared :class:`HuggingFaceLLM`.

    Args:
        llm: The engine every request goes to.
        model_name: The model id clients must send (``model``); defaults to ``llm.model_id``.
        server_id: Appended to ``system_fingerprint`` so clients can tell replicas apart.
        metrics: Where to record requests; a fresh :class:`ServerMetrics` by default.
        stream_interval_s: Send stream chunks at most this often after the first token (deltas in
            between are joined); 0 sends each step's delta at once.
        reject_unknown_fields: Answer a body field nobody knows (a typo such as ``temprature``)
            with a 400 naming it, as OpenAI does; by default it is ignored and logged once per name,
            as vLLM does.
    """

    def __init__(
        self,
        llm: HuggingFaceLLM,
        *,
        model_name: str | None = None,
        server_id: str | None = None,
        metrics: ServerMetrics | None = None,
        stream_interval_s: float = 0.0,
        reject_unknown_fields: bool = False,
    ) -> None:
        if stream_interval_s < 0:
            raise ValueError(f"stream_interval_s must be >= 0, got {stream_interval_s}")
        self.stream_interval_s = stream_interval_s
        self.reject_unknown_fields = reject_unknown_fields
        self._warned_fields: set[str] = set()
        self.llm = llm
        self.model_name = model_name or llm.model_id or "default"
        self.server_id = server_id
        self.fingerprint = f"async_llm-{__version__}" + (f"-{server_id}" if server_id else "")
        self.metrics = metrics if metrics is not None else ServerMetrics(llm.stats)
        self.created = int(time.time())

    # -- models -------------------------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        """``GET /v1/models``: the one model this server runs."""
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "async_llm"}

    def check_model(self, model: str | None) -> None:
        """Raises a 404 ``model_not_found`` for any model but the served one (``None`` means it)."""
        if model is not None and model != self.model_name:
            raise APIError(
                404, f"The model {model!r} does not exist; this server runs {self.model_name!r}", param="model"
            )

    # -- completions ----------------------------------------------------------------------------------
    async def completion(self, request: CompletionRequest) -> dict[str, Any]:
        """A non-streaming ``/v1/completions`` response.

        Raises:
            APIError: 400/404 for bad input, 429 for a full queue, 500/503 if generation failed.
        """
        return await self._respond("completion", request, _prompts(request), chat_template=False)

    async def completion_stream(self, request: CompletionRequest) -> ChunkStream:
        """Submit a streaming ``/v1/completions`` request; raises :class:`APIError` as :meth:`completion`."""
        return await self._open_stream("completion", request, _prompts(request), chat_template=False)

    async def chat_completion(self, request: ChatCompletionRequest) -> dict[str, Any]:
        """A non-streaming ``/v1/chat/completions`` response (raises as :meth:`completion`)."""
        return await self._respond("chat", request, [request.chat()], chat_template=True)

    async def chat_completion_stream(self, request: ChatCompletionRequest) -> ChunkStream:
        """Submit a streaming ``/v1/chat/completions`` request (raises as :meth:`completion`)."""
        return await self._open_stream("chat", request, [request.chat()], chat_template=True)

    # -- internals --------------------------------------------------------------------------------------
    async def _submit(self, request: SamplingRequest, prompts: list[Prompt], chat_template: bool) -> list[TokenStream]:
        """Submit every choice: prompt-major, ``n`` per prompt (seed + i when a seed is given)."""
        check_unsupported(request)
        self._check_unknown(request)
        self.check_model(request.model)
        kwargs = request.sampling_kwargs()
        streams: list[TokenStream] = []
        try:
            for prompt in prompts:
                for i in range(request.n):
                    choice_kwargs = kwargs if request.seed is None else {**kwargs, "seed": choice_seed(request.seed, i)}
                    streams.append(await self.llm.submit(prompt, chat_template=chat_template, **choice_kwargs))
        except Exception as exc:
            _close_all(streams)
            raise from_exception(exc, request.field_name) from exc
        except BaseException:
            _close_all(streams)
            raise
        return streams

    # -- embeddings ---------------------------------------------------------------------------------------
    async def embeddings(self, request: EmbeddingRequest) -> dict[str, Any]:
        """A ``/v1/embeddings`` response (OpenAI's shape; ``base64`` is little-endian float32).

        Raises:
            APIError: 400 naming the field (an input's index: ``input[3]``) or 404 for another model.
        """
        self._check_unknown(request)
        self.check_model(request.model)
        try:
            result = await embed(
                self.llm, request.input, pooling=request.pooling, normalize=request.normalize,
                dimensions=request.dimensions,
            )  # fmt: skip
        except Exception as exc:
            raise from_exception(exc) from exc
        data = []
        for index, vector in enumerate(result.vectors):
            value: Any = vector
            if request.encoding_format == "base64":
                value = base64.b64encode(array.array("f", vector).tobytes()).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": value})
        tokens = result.prompt_tokens
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": self.model_name, "usage": usage}

    def _check_unknown(self, request: SamplingRequest | EmbeddingRequest) -> None:
        """Refuse (``reject_unknown_fields``) or log the body's unknown fields.

        Raises:
            APIError: 400 naming them, when refused.
        """
        unknown = request.unknown_fields()
        if not unknown:
            return
        if self.reject_unknown_fields:
            names = ", ".join(unknown)
            raise APIError(400, f"Unrecognized request argument supplied: {names}", param=unknown[0])
        for name in unknown:
            if name not in self._warned_fields and len(self._warned_fields) < MAX_WARNED_FIELDS:
                self._warned_fields.add(name)
                log.warning("unknown request field ignored (logged once per name)", field=name)

    async def _respond(
        self, kind: Kind, request: SamplingRequest, prompts: list[Prompt], chat_template: bool
    ) -> dict[str, Any]:
        streams = await self._submit(request, prompts, chat_template)
        try:
            # One task group: the first choice that fails cancels the others (their streams abort).
            texts = await gather([functools.partial(_drain, s) for s in streams])
        except Exception as exc:
            raise from_exception(exc, request.field_name) from exc
        finally:
            _close_all(streams)  # aborts the others if one failed or this task was cancelled
            self._record(streams)
        body = self._envelope(kind, f"{_ID_PREFIX[kind]}{uuid.uuid4().hex}", int(time.time()))
        view = ChoiceView(kind, request, prompts)
        body["choices"] = [view.choice(i, text, s) for i, (text, s) in enumerate(zip(texts, streams, strict=True))]
        body["usage"] = _usage(streams, request.n)
        return body

    async def _open_stream(
        self, kind: Kind, request: SamplingRequest, prompts: list[Prompt], chat_template: bool
    ) -> ChunkStream:
        streams = await self._submit(request, prompts, chat_template)
        chunks = self._chunks(kind, streams, ChoiceView(kind, request, prompts))
        return ChunkStream(chunks, streams)

    async def _chunks(self, kind: Kind, streams: list[TokenStream], view: ChoiceView) -> AsyncIterator[Chunk]:
        envelope = self._envelope(kind, f"{_ID_PREFIX[kind]}{uuid.uuid4().hex}", int(time.time()), chunk=True)
        parsers = [view.stream_parser(s) for s in streams]
        started = [False] * len(streams)
        try:
            if kind == "chat":  # OpenAI opens each choice with the role, before any token
                yield {
                    **envelope,
                    "choices": [_delta(kind, i, {"role": "assistant", "content": ""}) for i in range(len(streams))],
                }
            async for index, delta in _merge(streams, self.stream_interval_s):
                stream, parser = streams[index], parsers[index]
                if delta is None:
                    for event in view.tool_events(parser, None):
                        yield {**envelope, "choices": [_delta(kind, index, event)]}
                    finish = view.finish_reason(stream, parser)
                    yield {**envelope, "choices": [_delta(kind, index, None, finish)]}
                    continue
                first, started[index] = not started[index], True
                logprobs = view.delta_logprobs(index, delta, stream, first)
                if parser is None:
                    text = view.echo(index) + delta.text if first else delta.text
                    yield {**envelope, "choices": [_delta(kind, index, text, logprobs=logprobs)]}
                    continue
                events = view.tool_events(parser, delta.text) or ([{}] if logprobs else [])
                for e, event in enumerate(events):  # the logprobs ride on the last event of the delta
                    last = e == len(events) - 1
                    yield {**envelope, "choices": [_delta(kind, index, event, logprobs=logprobs if last else None)]}
            if view.request.include_usage():
                yield {**envelope, "choices": [], "usage": _usage(streams, view.request.n)}
        except Exception as exc:  # noqa: BLE001  # headers are sent: any error can only travel in the stream
            log.warning("stream failed", error=repr(exc))
            yield from_exception(exc).body()
        finally:
            _close_all(streams)
            self._record(streams)

    def _envelope(self, kind: Kind, request_id: str, created: int, *, chunk: bool = False) -> dict[str, Any]:
        obj = "text_completion" if kind == "completion" else "chat.completion.chunk" if chunk else "chat.completion"
        return {
            "id": request_id, "object": obj, "created": created, "model": self.model_name,
            "system_fingerprint": self.fingerprint,
        }  # fmt: skip

    def _record(self, streams: Sequence[TokenStream]) -> None:
        for s in streams:
            if s.finished_at is None:
                continue  # aborted before the engine answered: nothing to measure
            ttft = None if s.first_token_at is None else s.first_token_at - s.created_at
            latency = s.finished_at - s.created_at
            self.metrics.observe_generation(len(s.prompt_token_ids), ttft, latency, len(s.token_ids))


_ID_PREFIX: dict[Kind, str] = {"completion": "cmpl-", "chat": "chatcmpl-"}


def _prompts(request: CompletionRequest) -> list[Prompt]:
    prompts: list[Prompt] = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
    if not prompts:
        raise APIError(400, "prompt must be a string or a non-empty list of strings", param="prompt")
    return prompts


async def _drain(stream: TokenStream) -> str:
    return "".join([delta async for delta in stream])


def _close_all(streams: Sequence[TokenStream]) -> None:
    for stream in streams:
        stream.close()  # idempotent; aborts the request only if it is still running


async def _merge(
    streams: Sequence[TokenStream], interval: float = 0.0
) -> AsyncIterator[tuple[int, StreamDelta | None]]:
    """``(choice, delta)`` from every stream as they arrive, then ``(choice, None)`` when one ends.

    With ``interval > 0``, after each yield the next read waits that long so the deltas arriving
    meanwhile go out as one chunk (fewer, larger messages through a proxy such as Ray Serve's);
    the first token is never held back. The streams are read without a task each: every stream
    wakes one event when an output reaches it (:meth:`TokenStream.listen`), and the ready ones are
    read with :meth:`TokenStream.poll` (each stream coalesces what arrived since its last read).
    A stream's error is raised here, after its text.
    """
    wake = asyncio.Event()
    for stream in streams:
        stream.listen(wake.set)
    remaining = list(range(len(streams)))
    while remaining:
        wake.clear()  # before polling: an output that arrives after a poll sets it again
        ready: list[tuple[int, StreamDelta | None]] = []
        for index in remaining:
            try:
                delta = streams[index].poll()
            except StopAsyncIteration:
                ready.append((index, None))
                continue
            if delta is not None:
                ready.append((index, delta))
        if not ready:
            await wake.wait()
            continue
        for index, delta in ready:
            if delta is None:
                remaining.remove(index)
            yield index, delta
        if interval and remaining:
            await asyncio.sleep(interval)


def _delta(
    kind: Kind,
    index: int,
    content: str | dict[str, Any] | None,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> Chunk:
    if kind == "completion":
        text = content if isinstance(content, str) else ""
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    delta = content if isinstance(content, dict) else {} if content is None else {"content": content}
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def _usage(streams: Sequence[TokenStream], n: int) -> dict[str, Any]:
    # A prompt is counted once however many choices (n) it has.
    prompts = [s for i, s in enumerate(streams) if i % n == 0]
    prompt_tokens = sum(len(s.prompt_token_ids) for s in prompts)
    return usage(prompt_tokens, sum(len(s.token_ids) for s in streams), sum(s.cached_tokens for s in prompts))
