"""Activation rows quantized in blocks of 32, for the integer-dot GEMVs (quant_matvec_q8): int8, or 16-bit.

Each block of 32 values gets one f32 scale, amax / QMAX, and quants round(x / scale) in [-QMAX, QMAX]; the exact
f32 sum of the block's original values is kept too (the Q4_K min term needs it). Two widths:

- int8 (QMAX = 127): one byte a value, ~1e-3 relative rounding; the opt-in fast path.
- 16-bit (QMAX = 32512 = 127 * 256): the default path's. Its rounding, at most 1.5e-5 of the block's largest
  value, is below f16's for all but the block's smallest values, so greedy output keeps to the f32
  reference's. A quant v is split into two signed bytes, v = 256 hi + lo with hi = floor((v + 128) / 256) in
  [-127, 127] and lo in [-128, 127], and each run of 4 quants is stored as 8 bytes, the 4 hi then the 4 lo
  (the int16 tensor holds these bytes, not the values; `wide_values` decodes them). The GEMVs read a run as
  one int64 word whose halves are the two byte planes, and multiply each with the int8 path's instructions:
  sum_i q_i v_i = 256 sum_i q_i hi_i + sum_i q_i lo_i, exact in integers.

The width is the quant tensor's dtype (int8 or int16). The block arithmetic is one Triton helper,
`_quantize_blocks`, shared by the standalone kernel here and by the kernels that produce an activation and
quantize it in the same launch (rmsnorm, silu_mul, the decode-attention merge), which read the width from the
pointer they are given: from the same values every path gives bit-identical quants and scales (the block sums
may differ in the order f32 additions take in each kernel's reduction). The attention merge quantizes its result
as it holds it in registers, which on an H100 differed from the f32 output it stores in the last bit of some
values, so its copy may be a quant step or a rounding of the scale away from quantize_activations(out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._tensor_checks import check_same_device, check_tensor
from .pdl import _pdl_wait, launch_options

ACTIVATION_BLOCK = 32
QMAX_INT8 = 127
QMAX_WIDE = 32512  # 127 * 256: the high byte of every 16-bit quant stays in [-127, 127]
_QUANT_DTYPES = (torch.int8, torch.int16)


@dataclass(frozen=True)
class QuantizedActivations:
    """B activation rows of K values quantized in blocks of 32: x ~ q * scale (for 16-bit quants, q's value as
    `wide_values` decodes it); `block_sum` is the exact sum of each block's original values (the Q4_K min term
    needs it)."""

    q: torch.Tensor  # [B, K] int8, or int16 (16-bit quants, split into two bytes: see the module docstring)
    scale: torch.Tensor  # [B, K / 32] f32
    block_sum: torch.Tensor  # [B, K / 32] f32

    @property
    def wide(self) -> bool:
        return self.q.dtype == torch.int16

    @classmethod
    def allocate(cls, batch: int, n_cols: int, device: torch.device | str, wide: bool = False) -> QuantizedActivations:
        if n_cols % ACTIVATION_BLOCK:
            raise ValueError(f"n_cols must be a multiple of {ACTIVATION_BLOCK}, got {n_cols}")
        blocks = n_cols // ACTIVATION_BLOCK
        return cls(torch.zeros(batch, n_cols, dtype=torch.int16 if wide else torch.int8, device=device),
                   torch.zeros(batch, blocks, dtype=torch.float32, device=device),
                   torch.zeros(batch, blocks, dtype=torch.float32, device=device))


def q8_launch_args(out_q8: QuantizedActivations | None, placeholder: torch.Tensor) -> tuple:
    """(q, scale, block_sum, q's row stride, scale's row stride) for a kernel that may also write an int8 copy:
    out_q8's, or `placeholder` five times over (never written: the kernel's QUANTIZE is off)."""
    if out_q8 is None:
        return placeholder, placeholder, placeholder, placeholder.stride(0), placeholder.stride(0)
    return out_q8.q, out_q8.scale, out_q8.block_sum, out_q8.q.stride(0), out_q8.scale.stride(0)


def q8_tensors(name: str, out_q8: QuantizedActivations | None) -> dict[str, torch.Tensor]:
    """out_q8's tensors by name, for check_same_device (none without out_q8)."""
    if out_q8 is None:
        return {}
    return {f"{name}.q": out_q8.q, f"{name}.scale": out_q8.scale, f"{name}.block_sum": out_q8.block_sum}


def check_activation_q8(name: str, xq: QuantizedActivations, batch: int, n_cols: int) -> None:
    """xq holds `batch` rows of `n_cols` values (contiguous, as `allocate` makes them)."""
    if n_cols % ACTIVATION_BLOCK:
        raise ValueError(f"{name}: int8 activations need a width that is a multiple of {ACTIVATION_BLOCK}, "
                         f"got {n_cols}")
    if xq.q.dtype not in _QUANT_DTYPES:
        raise ValueError(f"{name}.q must be int8 or int16 (16-bit quants), got {xq.q.dtype}")
    check_tensor(f"{name}.q", xq.q, xq.q.dtype, (batch, n_cols))
    check_tensor(f"{name}.scale", xq.scale, torch.float32, (batch, n_cols // ACTIVATION_BLOCK))
    check_tensor(f"{name}.block_sum", xq.block_sum, torch.float32, (batch, n_cols // ACTIVATION_BLOCK))


@triton.jit
def _quantize_blocks(x, q_ptrs, scale_ptrs, sum_ptrs, block_ok):
    """Quantize x [N, 32] f32 (N blocks) and store the quants at q_ptrs [N, 32] (int8, or int16: 16-bit quants in
    their two-byte form), the scales and the exact block sums at scale_ptrs, sum_ptrs [N]; blocks where block_ok
    [N] is false are not stored."""
    WIDE: tl.constexpr = q_ptrs.dtype.element_ty == tl.int16
    QMAX: tl.constexpr = 32512.0 if WIDE else 127.0
    amax = tl.max(tl.abs(x), axis=1)  # [N]
    # Both divisions rounded as IEEE (div_rn), not Triton's default approximation, whose rounding can differ
    # between the kernels that inline this helper: every path's scales are then bit-identical.
    inverse = tl.where(amax > 0.0, tl.math.div_rn(tl.zeros_like(amax) + QMAX, tl.maximum(amax, 1e-30)), 0.0)
    q = tl.floor(x * inverse[:, None] + 0.5)  # in [-QMAX, QMAX]
    if WIDE:
        v = q.to(tl.int32)
        hi = (v + 128) >> 8  # arithmetic shift: floor((v + 128) / 256), in [-127, 127]
        lo = v - hi * 256  # in [-128, 127]
        # Quant 4g + k (k < 4) of a block: its hi byte at byte 8g + k, its lo byte at 8g + 4 + k, so each run of 4
        # is one int64 word of two byte planes. Its int16 slot starts at byte 8g + 2k: k bytes past the hi byte.
        k = tl.arange(0, 32)[None, :] % 4
        hi_ptrs = q_ptrs.to(tl.pointer_type(tl.int8)) - k
        tl.store(hi_ptrs, hi.to(tl.int8), mask=block_ok[:, None])
        tl.store(hi_ptrs + 4, lo.to(tl.int8), mask=block_ok[:, None])
    else:
        tl.store(q_ptrs, q.to(tl.int8), mask=block_ok[:, None])
    tl.store(scale_ptrs, tl.math.div_rn(amax, tl.zeros_like(amax) + QMAX), mask=block_ok)
    tl.store(sum_ptrs, tl.sum(x, axis=1), mask=block_ok)


@triton.jit
def _store_quantized_row(values, first_block, end, q_row_ptr, scale_row_ptr, sum_row_ptr, N_BLOCKS: tl.constexpr):
    """The epilogue of a kernel that writes an activation and its int8 copy in one launch: values [N_BLOCKS * 32]
    f32 are blocks first_block.. of one row (zero past element `end`); q_row_ptr, scale_row_ptr, sum_row_ptr are
    that row's starts in the copy. Blocks that start at or past `end` are not stored."""
    blocks = first_block + tl.arange(0, N_BLOCKS)  # [N_BLOCKS]
    in_block = blocks[:, None] * 32 + tl.arange(0, 32)[None, :]  # [N_BLOCKS, 32]
    _quantize_blocks(tl.reshape(values, [N_BLOCKS, 32]), q_row_ptr + in_block, scale_row_ptr + blocks,
                     sum_row_ptr + blocks, blocks * 32 < end)


@triton.jit
def _quantize_activations_kernel(x_ptr, q_ptr, scale_ptr, sum_ptr, n_blocks, stride_x, stride_q, stride_s,
                                 BLOCKS: tl.constexpr, USE_PDL: tl.constexpr):
    _pdl_wait(USE_PDL)
    # One program: BLOCKS blocks of 32 values of one activation row.
    row = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)  # [BLOCKS]
    i = tl.arange(0, 32)[None, :]  # [1, 32]
    ok = b < n_blocks
    x = tl.load(x_ptr + row * stride_x + b[:, None] * 32 + i, mask=ok[:, None], other=0.0)  # [BLOCKS, 32]
    _quantize_blocks(x, q_ptr + row * stride_q + b[:, None] * 32 + i, scale_ptr + row * stride_s + b,
                     sum_ptr + row * stride_s + b, ok)


def quantize_activations(x: torch.Tensor, out: QuantizedActivations, *, pdl: bool = False) -> QuantizedActivations:
    """out = x [B, K] f32 quantized in blocks of 32 (see QuantizedActivations). One launch, graph-capturable."""
    check_tensor("x", x, torch.float32, (None, None), layout="rows")
    batch, n_cols = x.shape
    check_activation_q8("out", out, batch, n_cols)
    check_same_device(x=x, q=out.q, scale=out.scale, block_sum=out.block_sum)
    n_blocks = n_cols // ACTIVATION_BLOCK
    blocks = 16
    _quantize_activations_kernel[(batch, triton.cdiv(n_blocks, blocks))](
        x, out.q, out.scale, out.block_sum, n_blocks, x.stride(0), out.q.stride(0), out.scale.stride(0),
        BLOCKS=blocks, num_warps=4, **launch_options(pdl))
    return out


def quantize_activations_reference(x: torch.Tensor, wide: bool = False) -> QuantizedActivations:
    """What quantize_activations(x, QuantizedActivations.allocate(..., wide)) stores, in plain torch."""
    qmax = float(QMAX_WIDE if wide else QMAX_INT8)
    blocks = x.float().view(x.shape[0], -1, ACTIVATION_BLOCK)  # [B, K/32, 32]
    amax = blocks.abs().amax(dim=-1)
    inverse = torch.where(amax > 0, qmax / amax, torch.zeros_like(amax))
    q = torch.floor(blocks * inverse[..., None] + 0.5).view(x.shape)
    if wide:
        v = q.to(torch.int32).view(x.shape[0], -1, 1, 4)  # runs of 4 quants
        hi = torch.div(v + 128, 256, rounding_mode="floor")
        planes = torch.cat([hi, v - hi * 256], dim=2).to(torch.int8)  # [B, K/4, 2, 4]: hi bytes, then lo bytes
        q = planes.reshape(x.shape[0], -1).view(torch.int16)
    else:
        q = q.to(torch.int8)
    return QuantizedActivations(q, amax / qmax, blocks.sum(dim=-1))


def wide_values(q: torch.Tensor) -> torch.Tensor:
    """The quant values (int32, q's shape) of int8 quants, or of 16-bit quants in their byte-plane form
    [B, K] (runs of 4: 4 hi bytes, 4 lo bytes): 256 hi + lo."""
    if q.dtype == torch.int8:
        return q.to(torch.int32)
    planes = q.contiguous().view(torch.int8).view(*q.shape[:-1], -1, 2, 4).to(torch.int32)
    return (planes[..., 0, :] * 256 + planes[..., 1, :]).reshape(q.shape)
