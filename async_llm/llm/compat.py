"""The seed documents' names, on top of the library's own API.

Code written against the two documents this library follows runs unchanged: the swarm_models
``BaseLLM`` documentation (its settings' spellings such as ``repition_penalty``, the ``set_*``
setters, creative mode and the measuring methods) and the Zeta ``HuggingFaceLLM`` one
(``generate``/``generate_text``, ``model_name``). Each name here is a thin layer over the library's
own (``arun``, the settings' attributes, the requests' own stream timings), kept apart so that
:class:`~async_llm.llm.base.BaseLLM` and :class:`~async_llm.llm.huggingface.HuggingFaceLLM` show
what they do. ``tests/test_seed_documents.py`` runs the documents' examples verbatim.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from async_llm.llm.chat import Prompt, pop_prompt, pop_prompts
from async_llm.llm.measuring import MetricsMixin
from async_llm.llm.metrics import RequestMetrics, resource_utilization
from async_llm.llm.settings import SamplingField
from async_llm.sampling_params import SamplingParams

#: Settings of creative mode (see :meth:`SeedDocumentNames.toggle_creative_mode`).
CREATIVE_PRESET: dict[str, Any] = {"do_sample": True, "temperature": 0.9, "top_p": 0.95, "top_k": 0}


class SeedDocumentNames(MetricsMixin):
    """The swarm_models ``BaseLLM`` names and the Zeta ``generate``, for every LLM."""

    _before_creative: SamplingParams | None = None  # the settings to restore when creative mode ends

    # -- the documents' spellings of settings (see async_llm.param_names.ALIASES) ---------------------
    repition_penalty = SamplingField()
    stop_token = SamplingField()
    num_return_sequences = SamplingField()
    beam_width = SamplingField()

    # -- setters ------------------------------------------------------------------------------------------
    def set_temperature(self, temperature: float) -> None:
        """Set the default temperature (>= 0; 0 is greedy). Raises ValueError/TypeError."""
        self.sampling_defaults = self.sampling_defaults.merge(temperature=temperature)

    def set_max_tokens(self, max_tokens: int) -> None:
        """Set the default number of new tokens (>= 1)."""
        self.sampling_defaults = self.sampling_defaults.merge(max_tokens=max_tokens)

    def set_max_length(self, max_length: int | None) -> None:
        """Cap prompt plus output tokens (None removes the cap)."""
        self.sampling_defaults = self.sampling_defaults.merge(max_length=max_length)

    def set_frequency_penalty(self, frequency_penalty: float) -> None:
        """Set the default frequency penalty (-2..2)."""
        self.sampling_defaults = self.sampling_defaults.merge(frequency_penalty=frequency_penalty)

    def set_presence_penalty(self, presence_penalty: float) -> None:
        """Set the default presence penalty (-2..2)."""
        self.sampling_defaults = self.sampling_defaults.merge(presence_penalty=presence_penalty)

    def set_stop_token(self, stop_token: str | list[str] | None) -> None:
        """Set the default stop string(s); None clears them."""
        self.sampling_defaults = self.sampling_defaults.merge(stop=stop_token)

    def set_length_penalty(self, length_penalty: float) -> None:
        """Set the beam-search length penalty."""
        self.sampling_defaults = self.sampling_defaults.merge(length_penalty=length_penalty)

    def set_top_k(self, top_k: int) -> None:
        """Set top-k (0 or -1 off)."""
        self.sampling_defaults = self.sampling_defaults.merge(top_k=top_k)

    def set_top_p(self, top_p: float) -> None:
        """Set top-p (0 < p <= 1)."""
        self.sampling_defaults = self.sampling_defaults.merge(top_p=top_p)

    def set_num_beams(self, num_beams: int) -> None:
        """Set the beam width (1 turns beam search off)."""
        self.sampling_defaults = self.sampling_defaults.merge(num_beams=num_beams)

    def set_do_sample(self, do_sample: bool | None) -> None:
        """Force sampling (True), greedy (False), or follow the temperature (None)."""
        self.sampling_defaults = self.sampling_defaults.merge(do_sample=do_sample)

    def set_early_stopping(self, early_stopping: bool | str) -> None:
        """Beam search stopping rule: True, False or "never"."""
        self.sampling_defaults = self.sampling_defaults.merge(early_stopping=early_stopping)

    def set_seed(self, seed: int | None) -> None:
        """Seed every request (same prompt, same text) or None for fresh randomness."""
        self.sampling_defaults = self.sampling_defaults.merge(seed=seed)

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

    # -- the Zeta generate ----------------------------------------------------------------------------------
    async def agenerate(
        self, prompt_text: Prompt | None = None, max_length: int | None = None, *args: Any, **overrides: Any
    ) -> Any:
        """``arun`` with ``max_length`` capping prompt plus output tokens, as in transformers.

        The Zeta ``generate``: ``prompt_text`` is also taken as ``task=`` or ``prompt=``. Its
        ``max_length`` defaults to 20 there; here None leaves the cap at the model's context.
        """
        prompt = pop_prompt("agenerate", prompt_text, args, overrides, first_name="prompt_text")
        if max_length is not None:
            overrides["max_length"] = max_length
        return await self.arun(prompt, **overrides)

    agenerate_text = agenerate

    def generate(
        self, prompt_text: Prompt | None = None, max_length: int | None = None, *args: Any, **overrides: Any
    ) -> Any:
        """Blocking :meth:`agenerate` (``generate_text`` is the same method, the Zeta code's name)."""
        prompt = pop_prompt("generate", prompt_text, args, overrides, first_name="prompt_text")
        return self._call_sync(self.agenerate, prompt, max_length, **overrides)

    generate_text = generate

    # -- the swarm_models measuring methods: the requests' own stream timings -----------------------------
    def _num_tokens(self, text: str) -> int:
        """Tokens in ``text`` (this model's tokenizer)."""
        return self.count_tokens(text)

    def _tokens_per_second(self) -> float:
        """Output tokens per second of the last finished request (0.0 before any)."""
        last = self.metrics_recorder.last
        return last.tokens_per_second if last else 0.0

    async def _measure_one(self, task: Prompt, overrides: dict[str, Any]) -> RequestMetrics:
        measured = await self._measure(functools.partial(self.arun, task, **overrides))
        if measured:
            return measured[0][0]
        # A subclass whose own arun records nothing: the last request is the best there is.
        return self.metrics_recorder.last or RequestMetrics(0, 0, None, 0.0)

    def time_to_first_token(self, task: Prompt | None = None, *args: Any, **overrides: Any) -> float | None:
        """Run ``task`` once and return the seconds from its submission to its first token, as its
        stream measured them (None if it produced no token)."""
        prompt = pop_prompt("time_to_first_token", task, args, overrides)
        return self._call_sync(self._measure_one, prompt, overrides).time_to_first_token

    def generation_latency(self, task: Prompt | None = None, *args: Any, **overrides: Any) -> float:
        """Run ``task`` once and return the seconds from its submission to its last token."""
        prompt = pop_prompt("generation_latency", task, args, overrides)
        return self._call_sync(self._measure_one, prompt, overrides).latency

    def _time_for_generation(self, task: Prompt | None = None, *args: Any, **overrides: Any) -> float:
        """Run ``task`` and return the seconds it took (as :meth:`generation_latency`)."""
        return self.generation_latency(task, *args, **overrides)

    def throughput(self, tasks: Iterable[Prompt] | None = None, *args: Any, **overrides: Any) -> float:
        """Run ``tasks`` as one batch and return output tokens per second over it, from the first
        submission to the last token (each request as its stream timed it)."""
        prompts = list(pop_prompts("throughput", tasks, args, overrides))
        return self._call_sync(self._throughput, prompts, overrides)

    async def _throughput(self, prompts: list[Prompt], overrides: dict[str, Any]) -> float:
        measured = await self._measure(functools.partial(self.abatch_run, prompts, **overrides))
        if not measured:
            return 0.0
        span = max(end for _, end in measured) - min(end - m.latency for m, end in measured)
        return sum(m.output_tokens for m, _ in measured) / span if span > 0 else 0.0

    def _sec_to_first_token(self) -> float | None:
        """Seconds to the first token of the last finished request (:meth:`get_time_to_first_token`)."""
        return self.get_time_to_first_token()

    def get_generation_time(self) -> float:
        """Seconds the last finished request took, submission to last token (0.0 before any)."""
        last = self.metrics_recorder.last
        return last.latency if last else 0.0

    def get_time_to_first_token(self) -> float | None:
        """Seconds from submission to the first token of the last finished request."""
        last = self.metrics_recorder.last
        return last.time_to_first_token if last else None

    def track_resource_utilization(self) -> dict[str, Any]:
        """CPU and memory of this process, and allocated/reserved memory on a CUDA device."""
        device = getattr(self, "torch_device", None) or getattr(self, "device", None)
        if isinstance(device, str):  # a wrapper subclass's device name
            try:
                device = torch.device(device)
            except RuntimeError:
                device = None
        return resource_utilization(device)


class ModelNameAlias:
    """``model_name``, the documents' name of ``model_id``, for a backend that loads models: reading
    it gives ``model_id``, assigning it loads that model (``set_model_name``)."""

    model_id: str

    if TYPE_CHECKING:  # provided by the backend

        def set_model_name(self, model_name: str) -> None: ...

    @property
    def model_name(self) -> str:
        """Alias of ``model_id``; assigning it loads that model (see ``set_model_name``)."""
        return self.model_id

    @model_name.setter
    def model_name(self, model_name: str) -> None:
        self.set_model_name(model_name)
