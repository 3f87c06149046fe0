"""Host values onto the engine's device without making the host wait for it.

``torch.tensor(values, device="cuda")`` copies from pageable memory, and such a copy first waits
for the device's stream: with steps overlapped (the next one queued before this one's tokens are
handled), every row that joins or leaves would make the host wait for the queued step and lose the
overlap. :func:`device_tensor` stages the values in pinned memory and copies them without blocking;
torch's pinned-memory allocator keeps the staging block until the copy has run, so it is safe to
drop at once. On any other device it is ``torch.tensor``.
"""

from __future__ import annotations

from typing import Any

import torch


def device_tensor(data: Any, *, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.tensor(data, dtype=dtype, device=device)``, queued on CUDA instead of waited for.

    Args:
        data: Python numbers (nested lists of them), as ``torch.tensor`` takes.
        device: Where the tensor goes.
        dtype: Its dtype; None: inferred from ``data`` as ``torch.tensor`` does.
    """
    if device.type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
