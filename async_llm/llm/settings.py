"""The swarm_models BaseLLM surface around generation: settings, measurements and checkpoints.

Every sampling setting of an LLM lives in one validated :class:`SamplingParams` (its
``sampling_defaults``); the attributes and ``set_*`` methods of :class:`SettingsMixin` read and
replace it, so a bad value raises at once and a stored value always reaches generation.
:class:`MeasurementsMixin` reports requests as their streams timed them (it never re-runs a prompt
to time it), and :class:`CheckpointMixin` saves and restores the settings, history and metric totals.
"""

from __future__ import annotations

import contextvars
import functools
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import torch

from async_llm.errors import ParameterTypeError
from async_llm.llm import checkpoint
from async_llm.llm.chat import ROLES, Prompt, pop_prompt, pop_prompts
from async_llm.llm.metrics import MetricsRecorder, RequestMetrics, resource_utilization
from async_llm.sampling_params import ALIASES, SamplingParams

_T = TypeVar("_T")
# The requests a measuring method (time_to_first_token, throughput...) made, as (metrics,
# perf_counter time it finished): tasks started inside the measurement inherit the list.
_MEASURED: contextvars.ContextVar[list[tuple[RequestMetrics, float]] | None] = contextvars.ContextVar(
    "async_llm_measured", default=None
)

#: Settings of creative mode (see :meth:`SettingsMixin.toggle_creative_mode`).
CREATIVE_PRESET: dict[str, Any] = {"do_sample": True, "temperature": 0.9, "top_p": 0.95, "top_k": 0}


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


class _LLMParts:
    """What the mixins below use of :class:`~async_llm.llm.base.BaseLLM` (for the type checker)."""

    sampling_defaults: SamplingParams
    metrics_recorder: MetricsRecorder
    system_prompt: str | None
    role: str
    chat_template: bool
    history: list[dict[str, str]]
    start_time: float | None
    end_time: float | None
    abatch_run: Callable[..., Awaitable[list[Any]]]

    if TYPE_CHECKING:

        async def arun(self, task: Any = None, *args: Any, **overrides: Any) -> Any: ...

        def _call_sync(self, fn: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any) -> _T: ...

        def count_tokens(self, text: str) -> int: ...

        def stats(self) -> dict[str, Any]: ...

        def set_model_name(self, model_name: str) -> None: ...

        def _save_weights(self, folder: Path) -> None: ...


class MeasurementsMixin(_LLMParts):
    """Per-request measurements (the swarm_models names), from the requests' own stream timings."""

    def _num_tokens(self, text: str) -> int:
        """Tokens in ``text`` (this model's tokenizer)."""
        return self.count_tokens(text)

    def _tokens_per_second(self) -> float:
        """Output tokens per second of the last finished request (0.0 before any)."""
        last = self.metrics_recorder.last
        return last.tokens_per_second if last else 0.0

    def _record(self, metrics: RequestMetrics, finished_at: float | None = None) -> None:
        """Record a finished request (``finished_at``: its ``perf_counter`` time, default now) and set
        :attr:`start_time`/:attr:`end_time` to its wall-clock submission and finish."""
        self.metrics_recorder.record(metrics)
        now = time.perf_counter()
        finished = now if finished_at is None else finished_at
        self.end_time = time.time() - (now - finished)
        self.start_time = self.end_time - metrics.latency
        measured = _MEASURED.get()
        if measured is not None:
            measured.append((metrics, finished))

    async def _measure(self, call: Callable[[], Awaitable[Any]]) -> list[tuple[RequestMetrics, float]]:
        """Run ``call()``; the metrics of the requests it made, as their streams timed them."""
        measured: list[tuple[RequestMetrics, float]] = []
        token = _MEASURED.set(measured)
        try:
            await call()
        finally:
            _MEASURED.reset(token)
        return measured

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

    def metrics(self) -> dict[str, Any]:
        """Per-request aggregates (totals, tokens/s, time to first token and latency percentiles)
        and the engine's counters."""
        return {**self.metrics_recorder.summary(), "engine": self.stats()}

    def track_resource_utilization(self) -> dict[str, Any]:
        """CPU and memory of this process, and allocated/reserved memory on a CUDA device."""
        device = getattr(self, "device", None)
        if isinstance(device, str):  # a wrapper subclass's device name
            try:
                device = torch.device(device)
            except RuntimeError:
                device = None
        return resource_utilization(device)


class CheckpointMixin(_LLMParts):
    """Settings, history and metric totals saved as JSON and restored (and optionally the weights)."""

    async def asave_checkpoint(
        self, checkpoint_dir: str | os.PathLike[str] = "checkpoints", save_weights: bool = False
    ) -> Path:
        """Save settings, history and metric totals as JSON (atomically), and optionally the weights.

        Returns:
            The path of ``checkpoint.json``.
        """
        folder = Path(checkpoint_dir)
        weights = None
        if save_weights:
            await anyio.to_thread.run_sync(self._save_weights, folder / checkpoint.WEIGHTS_DIR)
            weights = checkpoint.WEIGHTS_DIR
        payload = {
            "model_name": getattr(self, "model_name", None),
            "settings": {
                "sampling": self.sampling_defaults.to_dict(),
                "system_prompt": self.system_prompt,
                "role": self.role,
                "chat_template": self.chat_template,
            },
            "history": list(self.history),
            "metrics": self.metrics_recorder.summary(),
            "weights": weights,
        }
        return await checkpoint.write(folder, payload)

    async def aload_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore a checkpoint written by :meth:`asave_checkpoint` (and its weights, if saved).

        Raises:
            FileNotFoundError: Nothing there. :class:`CheckpointError`: corrupt or invalid; in both
            cases nothing is changed.
        """
        data = await checkpoint.read(path)
        settings = data["settings"]
        role = settings.get("role") or "user"
        if role not in ROLES:
            raise checkpoint.CheckpointError(f"invalid checkpoint {str(path)!r}: unknown role {role!r}")
        if data["weights"] is not None:
            await anyio.to_thread.run_sync(self.set_model_name, str(data["weights"]))
        self.sampling_defaults = data["params"]
        self.system_prompt = settings.get("system_prompt")
        self.role = role
        self.chat_template = bool(settings.get("chat_template", True))
        self.history = [dict(m) for m in data["history"]]
        self.metrics_recorder.restore(data["metrics"])

    def save_checkpoint(
        self, checkpoint_dir: str | os.PathLike[str] = "checkpoints", save_weights: bool = False
    ) -> Path:
        """Blocking :meth:`asave_checkpoint`."""
        return self._call_sync(self.asave_checkpoint, checkpoint_dir, save_weights)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Blocking :meth:`aload_checkpoint`."""
        self._call_sync(self.aload_checkpoint, path)
