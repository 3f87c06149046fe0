"""The device an LLM runs on, as its caller spelled it.

The Zeta document stores the device string the caller gave (``llm.device == "cpu"``), and code
written from it compares strings; a ``torch.device`` never equals a str. :class:`DeviceName` is
that string, which also compares equal to the ``torch.device`` and has its ``type`` and ``index``,
so code written for either keeps working (the ``torch.device`` itself is ``llm.torch_device``).
"""

from __future__ import annotations

from typing import Any

import torch


class DeviceName(str):
    """A device's name as given (``"cpu"``, ``"cuda"``, ``"cuda:1"``), carrying the ``torch.device``.

    Args:
        name: The caller's spelling.
        device: The ``torch.device`` the model runs on (``cuda:0`` for a caller's ``"cuda"``).
    """

    torch_device: torch.device

    def __new__(cls, name: str, device: torch.device) -> DeviceName:
        self = super().__new__(cls, name)
        self.torch_device = device
        return self

    @property
    def type(self) -> str:
        """``"cpu"``, ``"cuda"``... as ``torch.device.type``."""
        return self.torch_device.type

    @property
    def index(self) -> int | None:  # type: ignore[override]
        """The device's index, as ``torch.device.index`` (which code written for the device as a
        ``torch.device`` reads; ``str.index``, the search, is not something a device name needs)."""
        return self.torch_device.index

    def __eq__(self, other: object) -> bool:
        if isinstance(other, torch.device):
            # "cuda" names the same device as cuda:0 here; torch.device("cuda") != cuda:0 in torch.
            return other == self.torch_device or other == torch.device(str(self))
        return str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = str.__hash__  # a dict keyed by the spelling finds it

    def __reduce__(self) -> tuple[Any, ...]:
        return (DeviceName, (str(self), self.torch_device))
