"""Generation settings as validated attributes and setters (the swarm_models BaseLLM surface).

Every sampling setting of an LLM lives in one validated :class:`SamplingParams` (its
``sampling_defaults``); the attributes and ``set_*`` methods below read and replace it, so a bad
value raises at once and a stored value always reaches generation.
"""

from __future__ import annotations

from typing import Any

from async_llm.sampling_params import ALIASES, SamplingParams

#: Settings of creative mode (see :meth:`SettingsMixin.toggle_creative_mode`).
CREATIVE_PRESET: dict[str, Any] = {"do_sample": True, "temperature": 0.9, "top_p": 0.95, "top_k": 0}


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
    """Attributes and setters for the sampling defaults of an LLM."""

    sampling_defaults: SamplingParams
    _before_creative: SamplingParams | None = None  # the settings to restore when creative mode ends

    max_tokens = SamplingField()
    temperature = SamplingField()
    top_k = SamplingField()
    top_p = SamplingField()
    min_p = SamplingField()
    repetition_penalty = SamplingField()
    repition_penalty = SamplingField()
    frequency_penalty = SamplingField()
    presence_penalty = SamplingField()
    seed = SamplingField()
    stop = SamplingField()
    stop_token = SamplingField()
    ignore_eos = SamplingField()
    do_sample = SamplingField()
    n = SamplingField()
    num_return_sequences = SamplingField()
    num_beams = SamplingField()
    beam_width = SamplingField()
    length_penalty = SamplingField()
    early_stopping = SamplingField()
    max_length = SamplingField()

    def set_temperature(self, temperature: float) -> None:
        """Set the default temperature (>= 0; 0 is greedy). Raises ValueError/TypeError."""
        self.temperature = temperature

    def set_max_tokens(self, max_tokens: int) -> None:
        """Set the default number of new tokens (>= 1)."""
        self.max_tokens = max_tokens

    def set_max_length(self, max_length: int | None) -> None:
        """Cap prompt plus output tokens (None removes the cap)."""
        self.max_length = max_length

    def set_frequency_penalty(self, frequency_penalty: float) -> None:
        """Set the default frequency penalty (-2..2)."""
        self.frequency_penalty = frequency_penalty

    def set_presence_penalty(self, presence_penalty: float) -> None:
        """Set the default presence penalty (-2..2)."""
        self.presence_penalty = presence_penalty

    def set_stop_token(self, stop_token: str | list[str] | None) -> None:
        """Set the default stop string(s); None clears them."""
        self.stop = stop_token

    def set_length_penalty(self, length_penalty: float) -> None:
        """Set the beam-search length penalty."""
        self.length_penalty = length_penalty

    def set_top_k(self, top_k: int) -> None:
        """Set top-k (0 or -1 off)."""
        self.top_k = top_k

    def set_top_p(self, top_p: float) -> None:
        """Set top-p (0 < p <= 1)."""
        self.top_p = top_p

    def set_num_beams(self, num_beams: int) -> None:
        """Set the beam width (1 turns beam search off)."""
        self.num_beams = num_beams

    def set_do_sample(self, do_sample: bool | None) -> None:
        """Force sampling (True), greedy (False), or follow the temperature (None)."""
        self.do_sample = do_sample

    def set_early_stopping(self, early_stopping: bool | str) -> None:
        """Beam search stopping rule: True, False or "never"."""
        self.early_stopping = early_stopping

    def set_seed(self, seed: int | None) -> None:
        """Seed every request (same prompt, same text) or None for fresh randomness."""
        self.seed = seed

    def toggle_creative_mode(self, enable: bool) -> None:
        """Turn creative mode on or off.

        On: sampling with ``temperature=0.9``, ``top_p=0.95`` and top-k off (:data:`CREATIVE_PRESET`),
        other settings unchanged. Off: the settings from just before it was turned on come back.
        Turning it on twice, or off when it is off, changes nothing.
        """
        saved = self._before_creative
        if enable and saved is None:
            self._before_creative = self.sampling_defaults
            self.sampling_defaults = self.sampling_defaults.merge(**CREATIVE_PRESET)
        elif not enable and saved is not None:
            self.sampling_defaults = saved
            self._before_creative = None

    @property
    def creative_mode(self) -> bool:
        return self._before_creative is not None
