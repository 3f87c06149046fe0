"""The static runner's KV store, sized before anything is allocated: bytes per token, the longest
row, the memory budget and the slots it holds.

The static runner preallocates its keys and values once, as ``rows`` fixed slots of ``columns``
(``max_model_len``) tokens each: a running request owns one slot and never moves. Everything here is
arithmetic on a model's config and the device's memory figures, so a budget that cannot work raises
a typed error naming the option to change before a byte is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psutil
import torch

from async_llm.errors import InvalidParameterError

#: ``max_model_len`` when None: the model's context, capped here (every slot costs this many tokens).
MAX_DEFAULT_MODEL_LEN = 8192

#: The share of the device's memory the process may use when ``gpu_memory_utilization`` is None.
DEFAULT_UTILIZATION = {"cuda": 0.9, "cpu": 0.5}

#: Rows of the static runner when ``max_batch_size`` is None (fewer when the budget holds fewer).
DEFAULT_STATIC_ROWS = 256


@dataclass(frozen=True)
class SlotPlan:
    """The static KV store's shape: ``rows`` slots of ``columns`` tokens, ``bytes`` in all (keys and
    values of every layer: per layer, keys and values are each ``[rows, kv_heads, columns, head_dim]``).

    Args:
        rows: Slots, one per running request (the engine's ``max_batch_size``).
        columns: Tokens per slot (``max_model_len``).
        bytes: ``rows * columns * bytes_per_token``.
    """

    rows: int
    columns: int
    bytes: int


def format_bytes(size: float) -> str:
    """``size`` for people: ``"1.50 GiB"``, ``"24.0 MiB"``, ``"512 B"``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}" if unit == "GiB" else f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


def _text_config(model_config: Any) -> Any:
    """The language model's part of a config (a multimodal model nests it)."""
    get = getattr(model_config, "get_text_config", None)
    return get() if callable(get) else model_config


def kv_geometry(model_config: Any) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a transformers config (its text config when it has one):
    ``num_key_value_heads`` falls back to ``num_attention_heads``, ``head_dim`` to
    ``hidden_size // num_attention_heads``."""
    config = _text_config(model_config)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return int(config.num_hidden_layers), kv_heads, head_dim


def kv_bytes_per_token(model_config: Any, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token takes across all layers.

    ``layers * 2 * kv_heads * head_dim * itemsize``: a Llama-3.2-1B (16 layers, 8 KV heads of 64)
    in bfloat16 takes 32 KiB a token.

    Args:
        model_config: A transformers ``PretrainedConfig`` (see :func:`kv_geometry`).
        dtype: The KV store's dtype (the model's).

    Returns:
        The bytes per token.
    """
    layers, kv_heads, head_dim = kv_geometry(model_config)
    return layers * 2 * kv_heads * head_dim * dtype.itemsize


def default_max_model_len(model_config: Any, max_model_len: int | None) -> int:
    """The longest context one slot holds.

    Args:
        model_config: A transformers config (its text config when it has one).
        max_model_len: The caller's value (already checked >= 1 by ``EngineConfig``), or None: the
            model's ``max_position_embeddings`` capped at :data:`MAX_DEFAULT_MODEL_LEN` (the cap
            alone when the config has no such field).

    Returns:
        Tokens per slot.

    Raises:
        InvalidParameterError: ``max_model_len`` exceeds the model's ``max_position_embeddings``
            (``.param`` is ``"max_model_len"``).
    """
    limit = getattr(_text_config(model_config), "max_position_embeddings", None)
    if max_model_len is None:
        return MAX_DEFAULT_MODEL_LEN if limit is None else min(int(limit), MAX_DEFAULT_MODEL_LEN)
    if limit is not None and max_model_len > limit:
        raise InvalidParameterError(
            "max_model_len",
            f"max_model_len={max_model_len} exceeds the model's context (max_position_embeddings={limit})",
        )
    return max_model_len


def _memory(device: torch.device) -> tuple[int, int]:
    """The device's memory and the part already in use, in bytes. On a CPU the memory is what the
    system has available now, none of it counted as used: a host's memory is shared with every
    other process, and a share of its total minus what they hold could be nothing at all."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(total), int(total - free)
    return int(psutil.virtual_memory().available), 0


def kv_budget_bytes(
    device: torch.device,
    gpu_memory_utilization: float | None,
    kv_cache_bytes: int | None,
    *,
    total_bytes: int | None = None,
    used_bytes: int | None = None,
    activation_bytes: int = 0,
) -> int:
    """The bytes the static KV store may take, measured once the weights are loaded.

    With ``kv_cache_bytes``, that; otherwise ``utilization * total - used - activation_bytes``: the
    process's share of the device, less what is in use (the weights, other processes) and what
    the forward's activations will need.

    Args:
        device: Where the store goes: on CUDA the figures come from ``torch.cuda.mem_get_info``; on
            another device the total is the system's memory available now (``psutil``) and none
            of it counts as used (see :func:`_memory`).
        gpu_memory_utilization: The share of the device's total memory to use, in (0, 1] (checked
            by ``EngineConfig``). None: 0.9 on CUDA, 0.5 elsewhere.
        kv_cache_bytes: The store's size, given outright (>= 1).
        total_bytes: The device's total memory, instead of asking the device (tests).
        used_bytes: The memory in use now, instead of asking the device (tests).
        activation_bytes: Kept back for activations (the peak of a forward, measured by the caller).

    Returns:
        The budget in bytes, > 0.

    Raises:
        InvalidParameterError: ``kv_cache_bytes`` is larger than the device's memory (``.param``
            ``"kv_cache_bytes"``), or nothing is left for the store (``"gpu_memory_utilization"``).
    """
    if total_bytes is None or used_bytes is None:
        total, used = _memory(device)
        total_bytes = total if total_bytes is None else total_bytes
        used_bytes = used if used_bytes is None else used_bytes
    if kv_cache_bytes is not None:
        if kv_cache_bytes > total_bytes:
            raise InvalidParameterError(
                "kv_cache_bytes",
                f"kv_cache_bytes={kv_cache_bytes} ({format_bytes(kv_cache_bytes)}) is more than the "
                f"{format_bytes(total_bytes)} of {device}",
            )
        return kv_cache_bytes
    utilization = gpu_memory_utilization
    if utilization is None:
        utilization = DEFAULT_UTILIZATION["cuda" if device.type == "cuda" else "cpu"]
    allowed = int(utilization * total_bytes)
    budget = allowed - used_bytes - activation_bytes
    if budget <= 0:
        raise InvalidParameterError(
            "gpu_memory_utilization",
            f"gpu_memory_utilization={utilization} allows {format_bytes(allowed)} of the {format_bytes(total_bytes)} "
            f"of {device}, but {format_bytes(used_bytes)} is already in use (weights, other processes) and "
            f"{format_bytes(activation_bytes)} is kept for activations: the KV budget would be "
            f"{format_bytes(budget)}; raise gpu_memory_utilization or give kv_cache_bytes",
        )
    return budget


def plan_slots(
    bytes_per_token: int,
    budget_bytes: int,
    max_model_len: int,
    max_batch_size: int | None,
    default_rows: int = DEFAULT_STATIC_ROWS,
) -> SlotPlan:
    """The slots a budget holds: one row per running request, ``max_model_len`` tokens each.

    Args:
        bytes_per_token: From :func:`kv_bytes_per_token` (>= 1).
        budget_bytes: From :func:`kv_budget_bytes` (>= 1).
        max_model_len: From :func:`default_max_model_len` (>= 1): the columns of every row.
        max_batch_size: Rows asked for; None: as many as fit, up to ``default_rows``.
        default_rows: The most rows when ``max_batch_size`` is None.

    Returns:
        The :class:`SlotPlan`; its ``bytes`` is at most ``budget_bytes``.

    Raises:
        InvalidParameterError: Not one row fits (``.param`` ``"max_model_len"``), or fewer rows than
            ``max_batch_size`` asks for (``"max_batch_size"``).
    """
    columns = max_model_len
    row_bytes = columns * bytes_per_token
    fit = budget_bytes // row_bytes
    if fit == 0:
        raise InvalidParameterError(
            "max_model_len",
            f"the KV budget of {format_bytes(budget_bytes)} holds {budget_bytes // bytes_per_token} tokens "
            f"({format_bytes(bytes_per_token)} each), less than one row of max_model_len={max_model_len}; "
            "lower max_model_len or raise gpu_memory_utilization / kv_cache_bytes",
        )
    if max_batch_size is None:
        rows = min(default_rows, fit)
    elif max_batch_size > fit:
        raise InvalidParameterError(
            "max_batch_size",
            f"max_batch_size={max_batch_size}, but the KV budget of {format_bytes(budget_bytes)} holds only {fit} "
            f"rows of {columns} tokens ({format_bytes(row_bytes)} a row); lower max_batch_size or max_model_len, "
            "or raise gpu_memory_utilization / kv_cache_bytes",
        )
    else:
        rows = max_batch_size
    return SlotPlan(rows=rows, columns=columns, bytes=rows * row_bytes)


def check_cuda_graphs(cuda_graphs: bool | None, device: torch.device) -> None:
    """Refuse CUDA graphs asked for on a device that has none.

    Args:
        cuda_graphs: The caller's option (None: the engine decides).
        device: Where the model will run.

    Raises:
        InvalidParameterError: ``cuda_graphs`` is True and ``device`` is not CUDA (``.param``
            ``"cuda_graphs"``).
    """
    if cuda_graphs and device.type != "cuda":
        raise InvalidParameterError(
            "cuda_graphs", f"cuda_graphs=True needs a CUDA device, but the model runs on {device}"
        )
