"""Checks of the token-control, logprob and structured-output parameters of
:class:`~async_llm.sampling_params.SamplingParams`, and :class:`GrammarSpec`, the normalised form of a
structured-output constraint."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from async_llm.errors import InvalidParameterError, ParameterTypeError
from async_llm.json_schema import close_objects

#: The structured-output parameters (OpenAI's ``response_format`` and vLLM's ``guided_*``).
STRUCTURED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
#: Most alternatives per token in ``top_logprobs`` / ``prompt_logprobs`` (OpenAI allows 20).
MAX_TOP_LOGPROBS = 20


def is_int(value: Any) -> bool:
    """An int that is not a bool (``max_tokens=True`` is a bug in the caller, not the number 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def number(name: str, value: Any) -> float:
    """``value`` as a finite float, or a typed error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParameterTypeError(name, f"{name} must be a number, got {type(value).__name__}")
    result = float(value)
    if not math.isfinite(result):
        raise InvalidParameterError(name, f"{name} must be a finite number, got {result}")
    return result


def int_tuple(name: str, value: Any, *, empty_ok: bool = True) -> tuple[int, ...]:
    """A list of token ids, each an int >= 0 (the upper bound, the vocabulary, is checked with the model)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ParameterTypeError(name, f"{name} must be a list of token ids, got {type(value).__name__}")
    ids = tuple(value)
    for i in ids:
        if not is_int(i):
            raise ParameterTypeError(name, f"{name} must be a list of int token ids, got an item {i!r}")
        if i < 0:
            raise InvalidParameterError(name, f"{name} holds a negative token id {i}")
    if not ids and not empty_ok:
        raise InvalidParameterError(name, f"{name} must not be empty (no token could be generated)")
    return ids


def logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias``: ``{token_id: bias}`` (ids may be str, as JSON keys are), bias in [-100, 100]."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise ParameterTypeError(
            "logit_bias", f"logit_bias must be a dict of token id to bias, got {type(value).__name__}"
        )
    pairs: dict[int, float] = {}
    for item in items:
        if not isinstance(item, Sequence) or len(item) != 2:
            raise ParameterTypeError("logit_bias", "logit_bias must be a dict of token id to bias")
        key, bias = item
        token = int(key) if isinstance(key, str) and key.strip().lstrip("-").isdigit() else key
        if not is_int(token) or token < 0:
            raise InvalidParameterError("logit_bias", f"logit_bias keys must be token ids (int >= 0), got {key!r}")
        value = number("logit_bias", bias)
        if not -100.0 <= value <= 100.0:
            raise InvalidParameterError("logit_bias", f"logit_bias must be in [-100.0, 100.0], got {value}")
        pairs[token] = value
    return tuple(sorted(pairs.items()))


class GrammarSpec(NamedTuple):
    """What a request's output must follow: ``kind`` is ``json_schema``, ``json_object``, ``regex``,
    ``choice`` or ``grammar`` (Lark or GBNF); ``source`` its text (a schema as JSON text, its keys
    in the given order and its objects closed by :func:`~async_llm.json_schema.close_objects`, the
    choices as a JSON list); ``param`` the parameter it came from (named in errors)."""

    kind: str
    source: str
    param: str


def grammar_spec(params: Any) -> GrammarSpec | None:
    """Check the structured-output fields (at most one set) and normalise the one given."""
    given = [(name, getattr(params, name)) for name in STRUCTURED_FIELDS if getattr(params, name) is not None]
    if len(given) > 1:
        names = ", ".join(name for name, _ in given)
        raise InvalidParameterError(given[1][0], f"give one structured-output constraint at most, got {names}")
    if not given:
        return None
    name, value = given[0]
    if name == "response_format":
        if not isinstance(value, Mapping) or not isinstance(value.get("type"), str):
            raise ParameterTypeError(name, 'response_format must be a dict with a "type"')
        kind = value["type"]
        if kind == "text":
            return None
        if kind == "json_object":
            return GrammarSpec("json_object", "{}", name)
        if kind != "json_schema":
            raise InvalidParameterError(
                name, f'response_format type must be "text", "json_object" or "json_schema", got {kind!r}'
            )
        spec = value.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
            raise ParameterTypeError(name, 'response_format json_schema must be {"name": ..., "schema": {...}}')
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise ParameterTypeError(name, f"response_format json_schema strict must be a bool, got {strict!r}")
        schema = close_objects(spec.get("schema", {}), strict=bool(strict), param=name)
        return GrammarSpec("json_schema", _schema_text(name, schema), name)
    if name == "guided_json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise InvalidParameterError(name, f"guided_json is not valid JSON: {exc}") from None
        if not isinstance(value, Mapping):
            raise ParameterTypeError(
                name, f"guided_json must be a JSON schema (dict or JSON text), got {type(value).__name__}"
            )
        return GrammarSpec("json_schema", _schema_text(name, close_objects(value, param=name)), name)
    if name == "guided_choice":
        if isinstance(value, str) or not isinstance(value, Sequence) or not value:
            raise ParameterTypeError(name, "guided_choice must be a non-empty list of str")
        if not all(isinstance(c, str) and c for c in value):
            raise InvalidParameterError(name, "guided_choice must hold non-empty strings")
        return GrammarSpec("choice", json.dumps(list(value), ensure_ascii=False), name)
    if not isinstance(value, str) or not value:
        raise ParameterTypeError(name, f"{name} must be a non-empty str, got {type(value).__name__}")
    return GrammarSpec("regex" if name == "guided_regex" else "grammar", value, name)


def _schema_text(name: str, schema: Any) -> str:
    try:
        return json.dumps(schema, ensure_ascii=False)  # key order kept: it is the order properties are written in
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(name, f"{name}: the schema is not JSON: {exc}") from None
