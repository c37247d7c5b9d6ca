"""Argument checks shared by the kernel launchers (dtype, shape, memory layout and device), and whether they run
under Triton's interpreter.

A Triton kernel trusts the pointers and strides it is given; a wrong dtype or a transposed view would make it
read the wrong bytes without any error. The launchers therefore check every tensor on the host (metadata only:
no device synchronisation) and raise ValueError naming the argument and what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch


def check_tensor(name: str, t: torch.Tensor, dtype: torch.dtype, shape: Sequence[int | None],
                 *, layout: str = "contiguous") -> None:
    """Check `t` has `dtype` and `shape` (None matches any size).

    layout: "contiguous" (dense, row-major) or "rows" (the last dimension has stride 1; the other strides are
    passed to the kernel, so views such as column slices of a wider matrix are accepted).
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if t.dim() != len(shape) or any(want is not None and want != got for want, got in zip(shape, t.shape)):
        wanted = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {wanted}, got {list(t.shape)}")
    if layout == "contiguous":
        if not t.is_contiguous():
            raise ValueError(f"{name}: must be contiguous (got strides {t.stride()}); pass .contiguous()")
    elif layout == "rows":
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name}: the last dimension must have stride 1 (got strides {t.stride()})")
    else:
        raise ValueError(f"unknown layout {layout!r}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; returns it."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return first


def under_interpreter() -> bool:
    """Whether Triton runs kernels under its interpreter (TRITON_INTERPRET=1: no PTX, programs one by one), where
    the launchers drop what only a GPU has (dp4a, fences, prefetches, IEEE-rounding asm)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def check_powers_of_two(owner: str, **values: int) -> None:
    """Each value a positive power of two (launch-shape fields); ValueError naming `owner.field` otherwise."""
    for name, value in values.items():
        if not isinstance(value, int) or value < 1 or value & (value - 1):
            raise ValueError(f"{owner}.{name} must be a positive power of two, got {value!r}")
