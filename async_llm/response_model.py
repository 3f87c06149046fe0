"""A pydantic class as ``response_format``, as the openai and LiteLLM clients take it.

The class's JSON schema becomes OpenAI's ``{"type": "json_schema", "json_schema": {"name": <the
class's name>, "schema": ...}}`` (so the output is constrained like any other schema), and the
finished text is validated back into an instance of the class. Pydantic is recognised by its
methods, not imported: the library does not load it for callers that never pass a class.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from async_llm.errors import InvalidParameterError


def is_response_model(value: Any) -> bool:
    """Whether ``value`` is a pydantic model class (v2: ``model_json_schema``/``model_validate_json``)."""
    return (
        isinstance(value, type)
        and callable(getattr(value, "model_json_schema", None))
        and callable(getattr(value, "model_validate_json", None))
    )


@functools.lru_cache(maxsize=256)
def response_format_of(model: type) -> Mapping[str, Any]:
    """OpenAI's ``response_format`` for a pydantic model class: its JSON schema, named after it.

    The same dict is returned for the same class (cached): a parameter set copied with
    ``dataclasses.replace`` keeps it, which is how :class:`~async_llm.sampling_params.SamplingParams`
    knows its format still comes from the class. Treat it as read-only.

    Raises:
        InvalidParameterError: Pydantic cannot build the class's JSON schema (names ``response_format``).
    """
    try:
        schema = model.model_json_schema()  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001  # pydantic's own error types, not imported here
        raise InvalidParameterError(
            "response_format", f"response_format: no JSON schema for {model.__name__}: {exc}"
        ) from None
    return {"type": "json_schema", "json_schema": {"name": model.__name__, "schema": schema}}


def parse_output(model: type, text: str) -> Any:
    """``text`` validated into an instance of ``model``, or None when it does not validate (an
    output cut off by ``max_tokens``, or one that breaks a constraint the grammar could not express)."""
    try:
        return model.model_validate_json(text)  # type: ignore[attr-defined]
    except ValueError:  # pydantic's ValidationError is a ValueError
        return None
