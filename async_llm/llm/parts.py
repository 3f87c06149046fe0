"""What the mixins of :class:`~async_llm.llm.base.BaseLLM` use of it, declared for the type checker.

``BaseLLM`` is assembled from mixins (settings, the seed documents' names, metrics, checkpoints,
chat); each reads a few attributes and calls a few methods that ``BaseLLM`` itself provides.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # metrics.py's mixin builds on this class: no import at run time
    from async_llm.llm.metrics import MetricsRecorder
    from async_llm.sampling_params import SamplingParams

_T = TypeVar("_T")


class LLMParts:
    """The attributes and methods of ``BaseLLM`` that its mixins use."""

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

        def validate(self, **overrides: Any) -> SamplingParams: ...

        def _call_sync(self, fn: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any) -> _T: ...

        def count_tokens(self, text: str) -> int: ...

        def stats(self) -> dict[str, Any]: ...

        def set_model_name(self, model_name: str) -> None: ...

        def _save_weights(self, folder: Path) -> None: ...
