"""JSON schemas as the grammar compiler gets them: objects closed unless they say otherwise, and
OpenAI's strict mode.

Why close objects by default: a schema without ``"additionalProperties": false`` (what every
pydantic model produces) lets the model add keys after the declared ones, and repeat them (a
grammar cannot keep free keys distinct), until ``max_tokens`` cuts the JSON off. vLLM's grammar
backends and OpenAI's strict mode close them; llguidance has no option for it (its ``x-guidance``
options cover separators, whitespace, ``oneOf`` and escapes only), so the schema is rewritten here.

The rules, for every subschema (``properties``, ``items``, ``anyOf``, ``$defs``...):

- an object schema that lists ``properties`` or ``patternProperties`` and says nothing of
  ``additionalProperties`` gets ``"additionalProperties": false``: a declared key is written once, in
  the order of ``properties``, and no other key is written. An explicit ``"additionalProperties":
  true`` (or a schema) is honoured; a bare ``{"type": "object"}`` (a free dict) stays free;
- a name in ``required`` that ``properties`` does not declare is declared (any value), so that
  closing the object cannot make it unsatisfiable;
- the members of an ``allOf`` are left open at their own level: closing each would forbid the keys
  the others declare (their nested objects are closed);
- ``strict`` (OpenAI's strict mode): every object is closed, a bare object included, and every
  declared property is required; an object that asks for additional properties is refused, as
  OpenAI refuses it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

from async_llm.errors import InvalidParameterError

# Keywords whose value is one subschema, a list of them, or a map of name -> subschema.
_ONE = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
        "additionalProperties", "unevaluatedProperties", "unevaluatedItems")  # fmt: skip
_LISTS = ("anyOf", "oneOf", "prefixItems", "items")  # "items" as a list: drafts 4-7's tuples
_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def close_objects(schema: Mapping[str, Any], *, strict: bool = False, param: str = "response_format") -> dict[str, Any]:
    """A copy of ``schema`` with its objects closed (see the module's rules); ``schema`` is untouched.

    Args:
        schema: A JSON schema (parts that are not schemas are left as they are: the grammar
            compiler judges them).
        strict: OpenAI's strict mode: every object closed and all its properties required.
        param: The parameter named in errors.

    Raises:
        InvalidParameterError: In strict mode, an object allows additional properties; or the
            schema is nested too deeply to walk.
    """
    copied = copy.deepcopy(dict(schema))
    try:
        _close(copied, strict, param, in_all_of=False)
    except RecursionError:
        raise InvalidParameterError(param, f"{param}: the schema is nested too deeply") from None
    return copied


def _close(schema: dict[str, Any], strict: bool, param: str, *, in_all_of: bool) -> None:
    for sub, member in _subschemas(schema):
        _close(sub, strict, param, in_all_of=member)
    if not in_all_of:
        _close_object(schema, strict, param)


def _subschemas(schema: dict[str, Any]) -> Iterator[tuple[dict[str, Any], bool]]:
    """``(subschema, is an allOf member)`` for each subschema directly under ``schema``."""
    for key in _ONE:
        value = schema.get(key)
        if isinstance(value, dict):
            yield value, False
    for key in (*_LISTS, "allOf"):
        value = schema.get(key)
        for item in value if isinstance(value, list) else ():
            if isinstance(item, dict):
                yield item, key == "allOf"
    for key in _MAPS:
        value = schema.get(key)
        for item in value.values() if isinstance(value, dict) else ():
            if isinstance(item, dict):
                yield item, False


def _close_object(schema: dict[str, Any], strict: bool, param: str) -> None:
    properties = schema.get("properties")
    declares = isinstance(properties, dict) or isinstance(schema.get("patternProperties"), dict)
    kind = schema.get("type")
    is_object = kind == "object" or (isinstance(kind, list) and "object" in kind) or declares
    if not is_object or not (declares or strict):
        return
    extra = schema.get("additionalProperties")
    if strict and extra not in (None, False):
        where = f" (properties {sorted(properties)[:5]})" if isinstance(properties, dict) else ""
        raise InvalidParameterError(
            param, f"{param}: strict mode takes closed objects only; an object{where} sets additionalProperties"
        )
    schema.setdefault("additionalProperties", False)
    required = schema.get("required")
    if isinstance(properties, dict) and isinstance(required, list):
        for name in required:  # closed, an undeclared required key could never be written
            if isinstance(name, str) and name not in properties:
                properties[name] = {}
    if strict:
        schema["properties"] = properties = properties if isinstance(properties, dict) else {}
        listed = [n for n in required if isinstance(n, str)] if isinstance(required, list) else []
        schema["required"] = [*listed, *(n for n in properties if n not in listed)]
