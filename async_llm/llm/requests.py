"""The one path from a call of the Python API to engine requests and their streams.

    check_call     at the call, synchronously: the prompt, the call options and the sampling
                   parameters checked once (typed errors naming the parameter, nothing queued yet)
    open_streams   encode the prompt (in a worker thread when long), fit it to the context, build
                   the rows' controls, expand ``n`` into rows, and queue the engine requests with
                   their streams (registered with the event loop's sink first)
    collect        a finished stream as a :class:`~async_llm.outputs.Completion`

Every entry point (``submit``, ``submit_many``, ``astream``, ``acomplete`` and so ``arun``) goes
through these, so a call is validated once and every request is built the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import torch

from async_llm.engine.beam import BeamJob
from async_llm.engine.controls import RowControls
from async_llm.engine.detokenizer import Detokenizer
from async_llm.engine.finish import end_ids
from async_llm.engine.request import Request
from async_llm.errors import ContextLengthError, InvalidParameterError
from async_llm.llm.backend import Backend
from async_llm.llm.chat import TRANSCRIPT_STOP, Message, Prompt, check_prompt, render_transcript, template_messages
from async_llm.llm.controls import build_controls
from async_llm.llm.tool_use import ToolUse, check_template_kwargs, finish_reason, render_chat, tool_use
from async_llm.outputs import Completion, TokenStream
from async_llm.response_model import parse_output
from async_llm.sampling_params import SamplingParams, choice_seed

#: Keyword arguments of a call that are not sampling parameters: how the prompt is rendered, a
#: transformers streamer, tools.
CALL_OPTIONS = frozenset({"chat_template", "system_prompt", "streamer", "tools", "tool_choice", "chat_template_kwargs"})

#: Prompts up to this many characters are tokenised on the event loop, where a fast tokenizer
#: takes less time than a thread hop would (and a burst of submits is not spread over several
#: milliseconds); longer ones in a worker thread.
INLINE_TOKENIZE_CHARS = 2048


@dataclass(frozen=True)
class Call:
    """One call's arguments, checked: the prompt, its rendering options and its sampling parameters."""

    prompt: Prompt
    params: SamplingParams
    chat_template: bool | None = None
    system_prompt: str | None = None
    streamer: Any = None
    tool_use: ToolUse | None = None
    template_kwargs: dict[str, Any] | None = None

    def one_choice(self, method: str) -> Call:
        """This call, for a method that returns one stream.

        Raises:
            InvalidParameterError: ``n`` > 1 (names ``n``).
        """
        if self.params.n != 1:
            raise InvalidParameterError("n", f"{method} returns one sequence: use n=1, or arun/submit_many for n > 1")
        return self


def check_call(defaults: SamplingParams, prompt: Any, kwargs: dict[str, Any], has_template: bool) -> Call:
    """Check a call once: ``kwargs`` are call options (:data:`CALL_OPTIONS`) and sampling
    parameters merged over ``defaults``.

    Raises:
        TypeError, ValueError: The prompt, an option or a parameter is invalid (a
            :class:`~async_llm.errors.ParameterError` naming it).
    """
    check_prompt(prompt)
    overrides = {key: value for key, value in kwargs.items() if key not in CALL_OPTIONS}
    tools = tool_use(kwargs.get("tools"), kwargs.get("tool_choice"), overrides)  # may add guided_json
    template_kwargs = check_template_kwargs(kwargs.get("chat_template_kwargs"))
    params = defaults.merge(**overrides)
    if not isinstance(prompt, str) and not has_template:
        # A chat rendered as a transcript: the reply ends where the model starts the user's next turn.
        params = dataclasses.replace(params, stop=(*params.stop, TRANSCRIPT_STOP))
    streamer = kwargs.get("streamer")
    if streamer is not None and params.n > 1:
        raise InvalidParameterError("streamer", "a transformers streamer follows one sequence: use n=1 with streamer=")
    return Call(
        prompt, params, kwargs.get("chat_template"), kwargs.get("system_prompt"), streamer, tools, template_kwargs
    )


def encode_prompt(
    tokenizer: Any,
    prompt: Prompt,
    *,
    use_template: bool,
    system_prompt: str | None,
    role: str,
    bos_token_id: int | None,
    tools: ToolUse | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Token ids of ``prompt`` (see :meth:`HuggingFaceLLM.encode
    <async_llm.llm.huggingface.HuggingFaceLLM.encode>`, which gives the LLM's settings).

    Raises:
        ValueError: The prompt encodes to no tokens, or tools with a tokenizer that has no template.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if (tools or template_kwargs) and not has_template:
        name = "tools" if tools else "chat_template_kwargs"
        raise InvalidParameterError(name, f"{name} needs a chat template, and this tokenizer has none")
    if isinstance(prompt, str) and not ((use_template or tools) and has_template):
        ids = _raw_ids(tokenizer, prompt, bos_token_id)
    else:
        messages: list[Message] = [{"role": role, "content": prompt}] if isinstance(prompt, str) else list(prompt)
        messages = template_messages(messages)
        if not has_template:
            return _raw_ids(tokenizer, render_transcript(messages, system_prompt), bos_token_id)
        if system_prompt and messages[0].get("role") != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        text = render_chat(tokenizer, messages, tools, template_kwargs)
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    if not ids:
        raise InvalidParameterError(
            "prompt", "prompt is empty: it encodes to no tokens (pass chat_template=True or some text)"
        )
    return ids


def _raw_ids(tokenizer: Any, text: str, bos_token_id: int | None) -> list[int]:
    ids = list(tokenizer(text).input_ids)
    if bos_token_id is not None and ids[:1] != [bos_token_id]:
        ids.insert(0, bos_token_id)
    return ids


def fit_to_context(prompt_ids: list[int], params: SamplingParams, context: int | None) -> SamplingParams:
    """Apply ``max_length`` and the model's ``context`` to ``max_tokens``.

    A ``max_tokens`` that was not given becomes what fits after the prompt (at most its default),
    as vLLM does; a given one that does not fit is an error naming it.

    Raises:
        ContextLengthError: The prompt alone fills the context (``prompt``), or the ``max_tokens``
            given does not fit after it (``max_tokens``).
        InvalidParameterError: The prompt alone reaches ``max_length``.
    """
    n = len(prompt_ids)
    if params.max_length is not None:
        room = params.max_length - n
        if room < 1:
            raise InvalidParameterError(
                "max_length", f"max_length is {params.max_length} but the prompt alone is {n} tokens"
            )
        if room < params.max_tokens:
            params = dataclasses.replace(params, max_tokens=room)
    if context is None or n + params.max_tokens <= context:
        return params
    if n >= context:
        raise ContextLengthError(
            "prompt", f"prompt is {n} tokens: it fills the model's context of {context} tokens; shorten it"
        )
    if params.max_tokens_explicit:
        raise ContextLengthError(
            "max_tokens",
            f"max_tokens is {params.max_tokens} but the prompt is {n} tokens and the model's context {context}: "
            f"at most {context - n} new tokens fit; lower max_tokens or shorten the prompt",
        )
    return dataclasses.replace(params, max_tokens=context - n)


def choice_params(params: SamplingParams) -> list[SamplingParams]:
    """The parameters of each of the request's ``n`` rows. Sampled choices are ``n`` rows of the
    batch, one sequence each, seeded by :func:`~async_llm.sampling_params.choice_seed`; beam search
    hands the whole request (its ``n`` best beams) to the beam runner as it is."""
    if params.n == 1 or params.beam_search:
        return [params] * params.n
    return [dataclasses.replace(params, n=1, seed=choice_seed(params.seed, i)) for i in range(params.n)]


async def row_controls(backend: Backend, params: SamplingParams) -> list[RowControls | None]:
    """Each row's controls: built (and their words tokenized) once, each row with its own grammar matcher.

    Raises:
        InvalidParameterError: A token id outside the vocabulary, or a grammar that does not compile.
    """
    matchers: list[Any] = [None] * params.n
    if params.grammar is not None:
        matchers = await backend.grammars.matchers(params.grammar, params.n)
    base = build_controls(params, backend.tokenizer, backend.engine.vocab_size, backend.eos_token_ids)
    return [base if base is None else dataclasses.replace(base, matcher=m) for m in matchers]


async def open_streams(backend: Backend, call: Call, encode: Callable[[], list[int]]) -> list[TokenStream]:
    """Build the call's requests and queue them; their streams, one per choice.

    Args:
        backend: The model and workers that serve the call.
        call: The checked call (:func:`check_call`).
        encode: The prompt's token ids (run on the loop when the prompt is short, else in a thread).

    Raises:
        ValueError: The prompt does not fit, or a control is invalid. QueueFullError,
            EngineClosedError: nothing of the call was left queued.
    """
    short = _prompt_chars(call.prompt) <= INLINE_TOKENIZE_CHARS
    prompt_ids = encode() if short else await anyio.to_thread.run_sync(encode)
    params = fit_to_context(prompt_ids, call.params, backend.max_context)
    controls = await row_controls(backend, params)
    worker = backend.beams if params.beam_search else backend.engine
    sink = backend.sinks.for_running_loop()
    loop = asyncio.get_running_loop()
    requests, streams = [], []
    for row_params, row_controls_ in zip(choice_params(params), controls, strict=True):
        request_id = uuid.uuid4().hex[:16]
        detokenizer = Detokenizer(
            backend.tokenizer,
            prompt_ids,
            params.stop,
            include_stop=params.include_stop_str_in_output,
            skip_special_tokens=params.skip_special_tokens,
        )
        requests.append(
            Request(
                request_id=request_id,
                prompt_ids=prompt_ids,
                params=row_params,
                sink=sink,
                detokenizer=detokenizer,
                eos_token_ids=backend.eos_token_ids,
                controls=row_controls_,
            )
        )
        stream = TokenStream(request_id, loop, worker.abort, prompt_ids, backend.token_text)
        stream.tool_use = call.tool_use
        streams.append(stream)
    if call.streamer is not None:
        # As in `generate`: the prompt goes first (the streamer drops it itself when skip_prompt=True).
        call.streamer.put(torch.tensor([prompt_ids]))
    hidden = end_ids(backend.eos_token_ids, params)  # the finish rule's ids: they end the text, never shown
    for stream in streams:
        sink.register(stream, call.streamer, hidden)
    try:
        if params.beam_search:
            backend.beams.submit(BeamJob(requests))
        else:
            for request in requests:
                backend.engine.submit(request)
    except BaseException:
        for request in requests:  # the ones already queued are aborted; none is left routed
            worker.abort(request.request_id)
        for stream in streams:
            sink.unregister(stream.request_id)
        raise
    return streams


async def collect(stream: TokenStream, call: Call) -> Completion:
    """Read ``stream`` to its end: the request's :class:`Completion` (tool calls and the parsed
    response model included when the call asked for them).

    Raises:
        GenerationError, EngineClosedError, RequestAbortedError: The request failed.
    """
    text = "".join([delta async for delta in stream])
    assert stream.finish_reason is not None and stream.finished_at is not None  # the stream ended
    first = stream.first_token_at
    reason = stream.finish_reason.value
    content: str | None = text
    calls = None
    if call.tool_use is not None:
        content, parsed_calls = call.tool_use.parse(text)
        calls = parsed_calls or None
        reason = finish_reason(reason, bool(parsed_calls)) or reason
    model = call.params.response_model
    return Completion(
        text=text,
        prompt_token_ids=stream.prompt_token_ids,
        token_ids=list(stream.token_ids),
        finish_reason=reason,
        time_to_first_token=None if first is None else first - stream.created_at,
        latency=stream.finished_at - stream.created_at,
        logprobs=stream.logprobs,
        prompt_logprobs=stream.prompt_logprobs,
        tool_calls=calls,
        content=content,
        parsed=None if model is None else parse_output(model, text),
        cached_tokens=stream.cached_tokens,
    )


def _prompt_chars(prompt: Prompt) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(message.get("content") or "") for message in prompt)
