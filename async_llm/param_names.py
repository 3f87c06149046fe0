"""The names a sampling parameter goes by, and one value for each when a call gives several.

The seed documents and the other libraries this one follows spell some parameters differently
(``repition_penalty``, ``stop_token``, ``num_return_sequences``...): :data:`ALIASES` maps each
spelling to the field of :class:`~async_llm.sampling_params.SamplingParams` it sets.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from async_llm.errors import ParameterTypeError
from async_llm.token_params import is_int

# Spellings accepted for a field, mapped to the field's name. `repition_penalty` is the spelling
# of the swarm_models interface this library implements; `stop_token` is its name for `stop`, and
# `freq_penalty` / `stop_token_id` are the names its BaseLLM constructor also takes.
ALIASES: Mapping[str, str] = {
    "repition_penalty": "repetition_penalty",
    "stop_token": "stop",
    "max_new_tokens": "max_tokens",
    "num_return_sequences": "n",
    "beam_width": "num_beams",
    "freq_penalty": "frequency_penalty",
    "stop_token_id": "stop_token_ids",
}


def by_field(overrides: Mapping[str, Any], fields: Collection[str]) -> dict[str, Any]:
    """``overrides`` keyed by field name: aliases resolved, one value per field.

    Args:
        overrides: The call's parameters, under any accepted spelling.
        fields: The field names that may be set.

    Raises:
        ParameterTypeError: An unknown name, or a field given under two spellings with different
            values (the message names both).
    """
    given: dict[str, list[tuple[str, Any]]] = {}  # field -> (spelling, value) pairs
    for key, value in overrides.items():
        name = ALIASES.get(key, key)
        if name not in fields:
            raise ParameterTypeError(key, f"unknown sampling parameter {key!r}")
        if key == "stop_token_id" and is_int(value):  # the swarm_models spelling takes one id
            value = (value,)
        given.setdefault(name, []).append((key, value))
    return {name: _one_value(name, pairs) for name, pairs in given.items()}


def _one_value(name: str, pairs: list[tuple[str, Any]]) -> Any:
    """The value of a field given under one or more spellings: the non-None one(s), which must agree."""
    values = [(key, value) for key, value in pairs if value is not None]
    for key, value in values[1:]:
        first_key, first = values[0]
        if not (value == first or _as_tuple(value) == _as_tuple(first)):
            raise ParameterTypeError(
                name,
                f"sampling parameter {name!r} given twice with different values: {first_key}={first!r} and "
                f"{key}={value!r} (one is an alias of the other); give one",
            )
    return values[0][1] if values else None


def _as_tuple(value: Any) -> Any:
    """``"a"``, ``["a"]`` and ``("a",)`` compare equal as stop strings (and lists as tuples)."""
    if isinstance(value, str):
        return (value,)
    return tuple(value) if isinstance(value, (list, tuple)) else value


def one_value(name: str, value: Any, alias: str, alias_value: Any) -> Any:
    """The value of a parameter given under its name, its alias, or both (then they must agree).

    Raises:
        ParameterTypeError: Both are given and differ (``.param`` is the alias).
    """
    if alias_value is None:
        return value
    if value is not None and value != alias_value:
        raise ParameterTypeError(
            alias, f"{name}={value!r} and {alias}={alias_value!r} (an alias) differ: give one, not both"
        )
    return alias_value


#: The weight quantizations the engine applies itself (``quantize=``; ``True`` is bitsandbytes').
QUANTIZE_MODES = ("int8",)
