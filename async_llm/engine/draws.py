"""Counter-based uniform draws, computed on the device without a host sync.

Each sampled row needs one uniform number per step. Rather than a stateful generator (whose state
lives on the host, or differs between CPU and CUDA), a row's ``n``-th draw is a pure function of its
request's ``(seed, n)``: a stateless 32-bit integer hash of the seed's two words and the counter.
So a request's draws do not depend on what else is in the batch, a preempted request continues its
sequence from its counter, and the same ``(seed, n)`` gives the same value on every device (integer
arithmetic is exact everywhere).

Overflow: the hash works on 32-bit words held in int64 tensors. Every value is masked back to 32
bits after each multiplication, and both multipliers are below ``2**31``, so every intermediate
product is below ``2**32 * 2**31 = 2**63``: int64 never overflows, on any device.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
# Chris Wellons' improved "lowbias32" (hash-prospector): both multipliers are odd and below 2**31.
_MUL1 = 0x21F0AAAD
_MUL2 = 0x735A2D97
# Mixed into the seed's low word so that seed 0 does not start from the hash's fixed point (0 -> 0).
_SALT = 0x9E3779B9
_UNIFORM_BITS = 24  # a float32 holds 24-bit integers exactly, so the result is below 1.0 exactly


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective avalanche hash of 32-bit values ``x`` (int64, in ``[0, 2**32)``); same shape."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _MASK32  # x < 2**32, _MUL1 < 2**31: the product is below 2**63
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _MASK32
    return x ^ (x >> 15)


def hash32(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """32 random bits per row, a pure function of the row's ``(seed, counter)``.

    Args:
        seeds: ``[B]`` int64, each in ``[0, 2**63)`` (a request's seed; see ``SamplingParams.seed``).
        counters: ``[B]`` int64, non-negative: how many draws the row's request has made. Taken
            modulo ``2**32`` (a request draws once per token, far fewer times than that).

    Returns:
        ``[B]`` int64 in ``[0, 2**32)``, on the inputs' device. For one seed, distinct counters
        (below ``2**32``) give distinct values: every step of the chain is a bijection.
    """
    h = _mix32((seeds & _MASK32) ^ _SALT)
    h = _mix32(h ^ (seeds >> 32))  # seeds are non-negative, so the high word is below 2**31
    return _mix32(h ^ (counters & _MASK32))


def uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One uniform number in ``[0, 1)`` per row, from the row's ``(seed, counter)``.

    No host sync: only integer and float tensor ops on the inputs' device, whatever it is. The same
    ``(seed, counter)`` gives the bit-identical value on CPU and CUDA, whatever the batch around it.

    Args:
        seeds: ``[B]`` int64, each in ``[0, 2**63)``.
        counters: ``[B]`` int64, non-negative (see :func:`hash32`).

    Returns:
        ``[B]`` float32 multiples of ``2**-24`` in ``[0, 1 - 2**-24]``.
    """
    high = hash32(seeds, counters) >> (32 - _UNIFORM_BITS)  # [B] int64 in [0, 2**24)
    return high.to(torch.float32) * (1.0 / (1 << _UNIFORM_BITS))  # exact: a power-of-two scale
