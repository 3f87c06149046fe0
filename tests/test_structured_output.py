"""Structured output on the tiny random-weight model, which writes garbage unless constrained: every
constrained output must parse and validate against its schema, match its regex, be one of the
choices or follow the grammar, alone and mixed with unconstrained rows, streamed, with ``n`` > 1,
seeds, penalties, stop strings and the prefix cache."""

from __future__ import annotations

import asyncio
import json
import re

import anyio
import jsonschema
import pytest

from async_llm import HuggingFaceLLM, InvalidParameterError, ParameterError
from async_llm.errors import GenerationError
from async_llm.llm.controls import GrammarCompiler
from tests.conftest import PROMPTS, reference_ids

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
ROOM = 120  # tokens: enough for the bounded schema above on a byte-level tokenizer


def check_person(text: str) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, PERSON)
    return value


async def test_json_schema_outputs_parse_and_validate(llm):
    with anyio.fail_after(60):
        results = await asyncio.gather(*(llm.acomplete(p, guided_json=PERSON, max_tokens=ROOM) for p in PROMPTS))
    for result in results:
        check_person(result.text)
        assert result.finish_reason == "stop"  # the complete grammar ended the request


async def test_response_format_json_schema_and_json_object(llm):
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    with anyio.fail_after(60):
        person = await llm.arun("Hello", response_format=schema_format, max_tokens=ROOM)
        obj = await llm.acomplete("Hello", response_format={"type": "json_object"}, max_tokens=200)
    check_person(person)
    if obj.finish_reason == "stop":  # a free object may be cut by max_tokens; a finished one parses
        assert isinstance(json.loads(obj.text), dict)
    else:
        assert obj.text.startswith("{")


async def test_regex_choice_and_grammars(llm):
    regex = r"[a-z]{3}-[0-9]{2}"
    choices = ["yes", "no", "maybe so"]
    lark = 'start: greeting " " name\ngreeting: "hi" | "hello"\nname: /[A-Z][a-z]{1,5}/'
    gbnf = 'root ::= ("up" | "down") " " [0-9] [0-9]?'
    with anyio.fail_after(60):
        texts = await asyncio.gather(
            llm.arun("Hello", guided_regex=regex),
            *(llm.arun(p, guided_choice=choices) for p in PROMPTS),
            llm.arun("Hello", guided_grammar=lark),
            llm.arun("Hello", guided_grammar=gbnf),
        )
    assert re.fullmatch(regex, texts[0])
    assert all(t in choices for t in texts[1:-2])
    assert re.fullmatch(r"(hi|hello) [A-Z][a-z]{1,5}", texts[-2])
    assert re.fullmatch(r"(up|down) [0-9][0-9]?", texts[-1])


async def test_mixed_batch_constrained_valid_and_unconstrained_unchanged(llm, tiny_model):
    """8 constrained and 8 unconstrained greedy requests in one batch: the constrained ones are valid,
    the others are exactly what they are alone (the masks touch only their own rows)."""
    plain = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(8)]
    with anyio.fail_after(90):
        results = await asyncio.gather(
            *(llm.acomplete(p, guided_json=PERSON, max_tokens=ROOM) for p in plain),
            *(llm.acomplete(p, max_tokens=16, ignore_eos=True) for p in plain),
        )
    for constrained in results[:8]:
        check_person(constrained.text)
    for unconstrained in results[8:]:
        assert unconstrained.token_ids == reference_ids(tiny_model, unconstrained.prompt_token_ids, 16)


async def test_streaming_n_seeds_penalties_and_prefix_cache(llm):
    kwargs = dict(guided_json=PERSON, max_tokens=ROOM, temperature=1.0, seed=3, repetition_penalty=1.3)
    with anyio.fail_after(90):
        streamed = "".join([d async for d in llm.astream("Hello", **kwargs)])
        again = await llm.arun("Hello", **kwargs)  # the prompt's blocks are cached by now
        several = await llm.arun("Hello", n=3, **{**kwargs, "seed": 11})
        reseeded = await llm.arun("Hello", n=3, **{**kwargs, "seed": 11})
    check_person(streamed)
    assert again == streamed  # same seed, same text, with or without the cache
    assert len(several) == 3 and several == reseeded
    for text in several:
        check_person(text)


async def test_a_stop_string_still_cuts_constrained_text(llm):
    with anyio.fail_after(30):
        text = await llm.arun("Hello", guided_choice=["alpha beta", "alpha gamma"], stop=[" "])
    assert text == "alpha"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"guided_json": {"type": "nonsense"}}, "guided_json"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_regex": "[a-"}, "guided_regex"),
        ({"guided_grammar": "start: missing_rule"}, "guided_grammar"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_choice": "yes"}, "guided_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"guided_regex": "a", "guided_json": {"type": "object"}}, "guided_regex"),
        ({"guided_regex": "a", "num_beams": 2}, "guided_regex"),  # beam search refuses it clearly
    ],
)
async def test_bad_constraints_are_typed_errors_before_queueing(llm, kwargs, param):
    with pytest.raises(ParameterError) as info:
        await llm.arun("Hello", **kwargs)
    assert info.value.param == param and param in str(info.value)
    stats = llm.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0


async def test_a_grammar_past_the_limits_or_the_time_is_refused(llm, tiny_tokenizer):
    small = GrammarCompiler(tiny_tokenizer, llm.engine.vocab_size, max_grammar_size=50)
    spec = llm.validate(guided_choice=[f"choice number {i}" for i in range(200)]).grammar
    assert spec is not None
    with pytest.raises(InvalidParameterError, match="guided_choice"):
        await small.matchers(spec, 1)
    slow = GrammarCompiler(tiny_tokenizer, llm.engine.vocab_size, timeout_s=0)
    with pytest.raises(InvalidParameterError, match="longer than"):
        await slow.matchers(llm.validate(guided_regex="[a-z]+").grammar, 1)  # type: ignore[arg-type]


async def test_compiled_grammars_are_cached_by_their_text(llm):
    compiler = llm._backend.grammars
    spec = llm.validate(guided_json=PERSON).grammar
    first = await compiler.matchers(spec, 2)
    assert first[0] is not first[1]  # a matcher per row
    size = len(compiler._cache)
    await compiler.matchers(llm.validate(guided_json=json.loads(json.dumps(PERSON))).grammar, 1)
    assert len(compiler._cache) == size


class _BreakingMatcher:
    """A matcher that works for a few tokens and then fails, as a matcher error mid-request would."""

    def __init__(self, inner, after: int) -> None:
        self._inner, self._left = inner, after

    def consume_token(self, token: int) -> bool:
        self._left -= 1
        return self._inner.consume_token(token) and self._left > 0

    def __getattr__(self, name):
        return getattr(self._inner, name)


async def test_a_matcher_failure_fails_only_its_request(llm, tiny_model, monkeypatch):
    compiler = llm._backend.grammars
    real = compiler.matchers

    async def breaking(spec, count):
        return [_BreakingMatcher(m, after=3) for m in await real(spec, count)]

    with anyio.fail_after(60):
        plain = asyncio.ensure_future(llm.acomplete(PROMPTS[1], max_tokens=16, ignore_eos=True))
        monkeypatch.setattr(compiler, "matchers", breaking)
        with pytest.raises(GenerationError, match="structured output"):
            await llm.arun("Hello", guided_json=PERSON, max_tokens=ROOM)
        monkeypatch.setattr(compiler, "matchers", real)
        result = await plain
        after = await llm.arun("Hello", guided_json=PERSON, max_tokens=ROOM)
    assert result.token_ids == reference_ids(tiny_model, result.prompt_token_ids, 16)
    check_person(after)
    assert llm.stats()["num_running"] == 0


async def test_structured_output_with_the_transformers_forward(plain_llm: HuggingFaceLLM):
    with anyio.fail_after(60):
        texts = await asyncio.gather(*(plain_llm.arun(p, guided_json=PERSON, max_tokens=ROOM) for p in PROMPTS[:3]))
    for text in texts:
        check_person(text)
