"""A counter-based random number per row: uniform(seed, step), computed with torch integer ops.

No `torch.Generator`: the value is a pure function of (seed, step), so a replayed CUDA graph, an eager GPU run
and the CPU all produce the same stream, and nothing but the per-row step counter has to live on the device.

The hash is three rounds of MurmurHash3's 32-bit finaliser (fmix32), the step mixed in first and the seed's two
32-bit halves after it, so that two seeds give unrelated streams rather than the same stream in another order.
Every value is a 32-bit word held in an int64 tensor. A product of a 32-bit word with a 32-bit constant would
overflow int64, so each constant is used in its signed form (c or c - 2**32, whichever has magnitude < 2**31):
modulo 2**32 it is the same multiplier, and |word * constant| < 2**63, so int64 arithmetic never overflows;
`& MASK32` of the (possibly negative) product is then exactly the product modulo 2**32.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
FMIX_MUL_1 = 0x85EBCA6B  # MurmurHash3 fmix32 multipliers
FMIX_MUL_2 = 0xC2B2AE35
STEP_SALT = 0x9E3779B9  # so that step 0 does not start from the all-zero word
UNIFORM_BITS = 24  # a float32 holds 24 bits exactly: u = k / 2**24, k in [0, 2**24)


def signed32(constant: int) -> int:
    """The multiplier congruent to `constant` modulo 2**32 with the smallest magnitude (< 2**31)."""
    return constant - 2**32 if constant >= 2**31 else constant


_MUL_1 = signed32(FMIX_MUL_1)
_MUL_2 = signed32(FMIX_MUL_2)


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # h: [B] int64 holding values in [0, 2**32)
    h = h ^ (h >> 16)
    h = (h * _MUL_1) & MASK32
    h = h ^ (h >> 13)
    h = (h * _MUL_2) & MASK32
    return h ^ (h >> 16)


def counter_uniform(seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """uniform [B] float32 in [0, 1) from seed halves [B] int64 (each in [0, 2**32)) and step [B] int64 (>= 0).

    A fused kernel would do this in one launch; as separate torch ops it is ~35 launches on B elements.
    """
    h = _fmix32((step & MASK32) ^ STEP_SALT)
    h = _fmix32(h ^ seed_lo)
    h = _fmix32(h ^ seed_hi ^ (step >> 32))
    return (h >> (32 - UNIFORM_BITS)).to(torch.float32) * (1.0 / 2**UNIFORM_BITS)
