"""An LLM's sampling settings as attributes, and what it was told about its model.

Every sampling setting of an LLM lives in one validated :class:`SamplingParams` (its
``sampling_defaults``); the attributes of :class:`SettingsMixin` read and replace it, so a bad value
raises at once and a stored value always reaches generation. (The seed documents' spellings of
these attributes and their ``set_*`` setters are in :mod:`async_llm.llm.compat`.)
"""

from __future__ import annotations

from typing import Any

from async_llm.errors import ParameterTypeError
from async_llm.param_names import ALIASES
from async_llm.sampling_params import SamplingParams


def describe_model(obj: Any, model_name: Any, model_id: Any, **ids: Any) -> None:
    """Keep what an LLM was told about its model (the swarm_models constructor's ``model_name``,
    ``model_id``, ``device``, ``pad_token_id``, ``eos_token_id``, ``bos_token_id``) as attributes.

    A backend that serves these as properties of its own (``HuggingFaceLLM``) takes them itself:
    a class attribute of that name is left alone when the value is None.

    Raises:
        TypeError: ``model_name`` and ``model_id`` (an alias) both given, and different.
    """
    if model_name is not None and model_id is not None and str(model_name) != str(model_id):
        raise ParameterTypeError(
            "model_name",
            f"model_id={model_id!r} and model_name={model_name!r} name the model twice (an alias): give one, not both",
        )
    name = model_name if model_name is not None else model_id
    for attr, value in {"model_name": name, "model_id": name, **ids}.items():
        if value is not None or not hasattr(type(obj), attr):
            setattr(obj, attr, value)


class SamplingField:
    """An attribute backed by a field of ``obj.sampling_defaults`` (aliases accepted)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.field = ALIASES.get(name, name)

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(obj.sampling_defaults, self.field)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.sampling_defaults = obj.sampling_defaults.merge(**{self.field: value})


class SettingsMixin:
    """The sampling defaults of an LLM as attributes (``llm.temperature = 0.5``), validated on every change."""

    sampling_defaults: SamplingParams

    max_tokens = SamplingField()
    temperature = SamplingField()
    top_k = SamplingField()
    top_p = SamplingField()
    min_p = SamplingField()
    repetition_penalty = SamplingField()
    frequency_penalty = SamplingField()
    presence_penalty = SamplingField()
    seed = SamplingField()
    stop = SamplingField()
    ignore_eos = SamplingField()
    do_sample = SamplingField()
    n = SamplingField()
    num_beams = SamplingField()
    length_penalty = SamplingField()
    early_stopping = SamplingField()
    max_length = SamplingField()
