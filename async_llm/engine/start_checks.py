"""Verdicts of the engine's start-up checks, kept across processes for a model's files.

The checks (does the fast runner, the packed prefill, a prefill after a prefix, give this model's
logits?) run the model on probe prompts at start-up. The loader of a model loaded from files hands
the engine a :class:`CheckStore` with it (``async_llm.loading.check_cache`` implements it; the engine
never imports ``loading``), and a later start with the same files, versions and hardware reuses the
verdicts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

import torch

from async_llm.log import get_logger

log = get_logger("async_llm.engine.start_checks")

# Bump when a start-up check changes what it decides: stored verdicts of older checks are then unused.
_CHECKS_VERSION = "2"  # 2: the fast check's tolerance scaled to the dtype; probe prompts mid-vocabulary

# A check's verdict: JSON, so that it can be stored.
Verdict = TypeVar("Verdict", bound="str | bool | None")


class CheckStore(Protocol):
    """Verdicts of start-up checks kept across processes for one model's files (see
    ``async_llm.loading.check_cache``). ``context`` says what else the verdict depends on."""

    def get(self, check: str, context: Mapping[str, str]) -> dict[str, Any] | None:
        """``{"verdict": value}`` when stored, else None."""

    def put(self, check: str, context: Mapping[str, str], verdict: str | bool | None) -> None:
        """Keep ``verdict`` for later starts."""


def remembered(
    store: CheckStore | None,
    model: Any,
    check: str,
    context: Mapping[str, str],
    run: Callable[[], Verdict],
    valid: Callable[[object], bool],
) -> Verdict:
    """The verdict of the start-up check ``check`` on ``model``: stored by an earlier start, else
    ``run()`` (which runs the model), then stored.

    Only a model that comes with a :class:`CheckStore` has stored verdicts (a model passed in as an
    object has none): any other runs the check every time. A stored value that ``valid`` refuses is
    ignored.

    Args:
        store: The verdicts of the model's files, or None.
        model: The causal LM.
        check: The check's name.
        context: What the verdict depends on besides the model files and where it runs
            (the check's own arguments).
        run: Runs the check; returns its verdict (JSON: a str, a bool or None).
        valid: Whether a stored value is a verdict this check can return.
    """
    if store is None:
        return run()
    context = {**_runtime_context(model), **context}
    found = store.get(check, context)
    if found is not None and valid(found["verdict"]):
        verdict: Verdict = found["verdict"]
        log.info("start-up check verdict reused", check=check, verdict=verdict)
        return verdict
    verdict = run()
    store.put(check, context, verdict)
    return verdict


def _runtime_context(model: Any) -> dict[str, str]:
    """What a check's verdict depends on besides the model files: the class, the weights' dtype, the
    attention implementation, the device and its kind of hardware, and this module's checks."""
    weight = next(model.parameters())
    device = weight.device
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        hardware = torch.backends.cpu.get_cpu_capability()
    else:
        hardware = device.type
    return {
        "class": type(model).__name__,
        "dtype": str(weight.dtype),
        "attention": str(getattr(model.config, "_attn_implementation", None)),
        "device": device.type,
        "hardware": hardware,
        "checks": _CHECKS_VERSION,
    }
