"""No progress bars from transformers while the library loads or converts a model.

transformers draws tqdm bars on stderr while it reads weights ("Loading weights"), saves them
("Writing model shards") and dequantizes a GGUF file. A library must not write to the terminal of
the program that uses it (the ``async-llm`` command prints one line of its own instead), so loads go
through :func:`quiet_progress`.

Only bars created by a thread that is inside the block are silenced: an application loading its own
models in other threads at the same time keeps its bars. The hooks are installed when the first
thread enters and removed when the last one leaves, so nothing of transformers stays changed.
Download bars of huggingface_hub are not transformers' and stay as they are.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["GGUF_READER_MODULE", "quiet_progress"]

#: The transformers module that dequantizes GGUF files (its tqdm bar is silenced too).
GGUF_READER_MODULE = "transformers.modeling_gguf_pytorch_utils"

_lock = threading.Lock()
# Thread ids inside quiet_progress, each with its depth (the block may nest: GGUF conversion in a load).
_quiet: dict[int, int] = {}
# How to undo what the first thread in installed; empty while no thread is inside.
_undo: list[Callable[[], None]] = []


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Silence transformers' progress bars created by this thread for the duration of the block."""
    me = threading.get_ident()
    with _lock:
        if not _quiet:
            _install()
        _quiet[me] = _quiet.get(me, 0) + 1
    try:
        yield
    finally:
        with _lock:
            _quiet[me] -= 1
            if not _quiet[me]:
                del _quiet[me]
            if not _quiet:
                while _undo:
                    _undo.pop()()


def _silenced() -> bool:
    return threading.get_ident() in _quiet


def _install() -> None:
    """Hook transformers' bars and the GGUF reader's (caller holds ``_lock``)."""
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is not None:

        def hook(factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if _silenced():
                kwargs = {**kwargs, "disable": True}
            return previous(factory, args, kwargs) if previous is not None else factory(*args, **kwargs)

        previous = set_hook(hook)
        _undo.append(lambda: set_hook(previous))
    elif hf_logging.is_progress_bar_enabled():  # transformers without the hook (before 5.2x): all threads
        hf_logging.disable_progress_bar()
        _undo.append(hf_logging.enable_progress_bar)
    _patch_gguf_reader()


def _patch_gguf_reader() -> None:
    """The GGUF dequantizer draws its bar with tqdm itself, not through transformers' switch: wrap
    the name it calls for the duration. Only when its module is imported already (the GGUF
    conversion imports it before it enters :func:`quiet_progress`): importing it here would make
    every load pay for it."""
    gguf_utils = sys.modules.get(GGUF_READER_MODULE)
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        return

    def tqdm(*args: Any, **kwargs: Any) -> Any:
        if _silenced():
            kwargs["disable"] = True
        return original(*args, **kwargs)

    setattr(gguf_utils, "tqdm", tqdm)  # noqa: B010  # a module found at run time: no static attribute
    _undo.append(lambda: setattr(gguf_utils, "tqdm", original))
