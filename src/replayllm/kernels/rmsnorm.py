"""RMSNorm of f32 rows: out = x / sqrt(mean(x^2) + eps) * weight, optionally after residual += x.

A row is held entirely in registers, so the same kernel serves the hidden state ([B, D], D up to a few
thousand) and qwen3's per-head QK norm (q viewed as [B * H, head_dim]). With `out_q8` the same launch also
writes the normalised row quantized in blocks of 32 (int8 or 16-bit: int8_activations), the input of the
integer-dot GEMVs, saving the decode step a launch per projection input.

Two ways to cut the work:
- one program a row: each element is read before the same thread writes it, so `out` may be `x` itself
  (in-place normalisation), and the residual add can be fused;
- at decode batch sizes (a few rows of thousands of values), one program would leave all but one SM idle:
  normalising and quantizing a 4,096-value row alone took ~8.6 us on an H100, 65 times a 7B step. There,
  each row is cut into slices of SLICE_COLS values, and each slice's program reads the whole row (16 KB from
  L2) for the mean square, then normalises and quantizes its slice alone. Every program of a row reduces the
  same values in the same order, so all of them get the same 1 / rms. Only when `out` does not overlap `x`
  and there is no residual to update: a slice's program would otherwise read values another program writes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tensor_checks import check_same_device, check_tensor, next_power_of_2
from .int8_activations import (ACTIVATION_BLOCK, QuantizedActivations, _store_quantized_row, check_activation_q8,
                               q8_launch_args, q8_tensors)
from .pdl import _pdl_wait, launch_options

MAX_ROW_SIZE = 32768  # one row lives in registers; larger rows would spill
SLICE_COLS = 256  # values a program normalises when a row is cut into slices (a multiple of 32: whole blocks)
SLICED_MAX_ROWS = 8  # rows up to which the rows are cut into slices (the decode batch sizes)
SLICED_MIN_ROW_SIZE = 2 * SLICE_COLS


@triton.jit
def _rmsnorm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, q_ptr, q_scale_ptr, q_sum_ptr, row_size, x_row_stride,
                    residual_row_stride, out_row_stride, q_row_stride, q_scale_row_stride, eps,
                    HAS_RESIDUAL: tl.constexpr, QUANTIZE: tl.constexpr, BLOCK_D: tl.constexpr, SLICE: tl.constexpr,
                    USE_PDL: tl.constexpr):
    _pdl_wait(USE_PDL)
    # x, residual, out: [R, row_size] f32, unit column stride; weight: [row_size] f32
    # q: [R, row_size] int8 or int16, q_scale, q_sum: [R, row_size / 32] f32 (QUANTIZE only)
    # SLICE == BLOCK_D: grid (R,), one program a row. SLICE < BLOCK_D (no residual, out not overlapping x):
    # grid (R, cdiv(row_size, SLICE)), program (r, s) writes values s * SLICE .. of row r.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < row_size
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)  # [BLOCK_D]
    if HAS_RESIDUAL:
        residual_ptrs = residual_ptr + row * residual_row_stride + cols
        x += tl.load(residual_ptrs, mask=mask, other=0.0)
        tl.store(residual_ptrs, x, mask=mask)
    mean_square = tl.sum(x * x, axis=0) / row_size
    inv_rms = 1.0 / tl.sqrt(mean_square + eps)
    if SLICE < BLOCK_D:
        first = tl.program_id(1) * SLICE
        cols = first + tl.arange(0, SLICE)
        mask = cols < row_size
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)  # [SLICE], from L1
    else:
        first = 0
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    y = x * inv_rms * weight  # zero past row_size
    tl.store(out_ptr + row * out_row_stride + cols, y, mask=mask)
    if QUANTIZE:
        _store_quantized_row(y, first // 32, row_size, q_ptr + row * q_row_stride,
                             q_scale_ptr + row * q_scale_row_stride, q_sum_ptr + row * q_scale_row_stride,
                             SLICE // 32)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor,
            out_q8: QuantizedActivations | None = None, *, pdl: bool = False) -> torch.Tensor:
    """out [R, D] f32 = rmsnorm(x [R, D] f32) * weight [D] f32. `out` may be `x`. With `out_q8` (D a multiple of
    32), also out quantized in blocks of 32 (int8 or 16-bit, as out_q8.q's dtype says), as
    quantize_activations(out) would. Returns `out`."""
    _launch(x, None, weight, eps, out, out_q8, pdl)
    return out


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                out: torch.Tensor, *, pdl: bool = False) -> torch.Tensor:
    """residual [R, D] += x [R, D] (in place), then out [R, D] = rmsnorm(residual) * weight. Returns `out`."""
    _launch(x, residual, weight, eps, out, None, pdl)
    return out


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            out: torch.Tensor, out_q8: QuantizedActivations | None = None, pdl: bool = False) -> None:
    check_tensor("x", x, torch.float32, (None, None), layout="rows")
    rows, row_size = x.shape
    check_tensor("weight", weight, torch.float32, (row_size,))
    check_tensor("out", out, torch.float32, (rows, row_size), layout="rows")
    tensors = {"x": x, "weight": weight, "out": out}
    if residual is not None:
        check_tensor("residual", residual, torch.float32, (rows, row_size), layout="rows")
        if residual.data_ptr() in (out.data_ptr(), x.data_ptr()):
            raise ValueError("residual must not share memory with x or out: it receives residual + x")
        tensors["residual"] = residual
    if out_q8 is not None:
        check_activation_q8("out_q8", out_q8, rows, row_size)
    check_same_device(**tensors, **q8_tensors("out_q8", out_q8))
    if not 0 < row_size <= MAX_ROW_SIZE:
        raise ValueError(f"x: row size must be in 1..{MAX_ROW_SIZE}, got {row_size}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if rows == 0:
        return
    block = max(next_power_of_2(row_size), ACTIVATION_BLOCK)
    has_residual = residual is not None
    residual_arg = residual if has_residual else x  # never read when HAS_RESIDUAL is False
    q, q_scale, q_sum, q_row_stride, q_scale_row_stride = q8_launch_args(out_q8, out)
    if sliced(rows, row_size, has_residual, _overlaps(x, out)):
        # enough warps that the whole-row load stays at <= 64 values a thread (no spills up to MAX_ROW_SIZE)
        grid, slice_cols, num_warps = (rows, triton.cdiv(row_size, SLICE_COLS)), SLICE_COLS, min(16, max(4, block // 2048))
    else:
        grid, slice_cols, num_warps = (rows,), block, min(16, max(1, block // 256))
    _rmsnorm_kernel[grid](
        x, residual_arg, weight, out, q, q_scale, q_sum, row_size, x.stride(0), residual_arg.stride(0),
        out.stride(0), q_row_stride, q_scale_row_stride, float(eps), HAS_RESIDUAL=has_residual,
        QUANTIZE=out_q8 is not None, BLOCK_D=block, SLICE=slice_cols, num_warps=num_warps, **launch_options(pdl))


def sliced(rows: int, row_size: int, has_residual: bool, out_overlaps_x: bool) -> bool:
    """Whether a launch cuts its rows into slices of SLICE_COLS values, one program each (module docstring)."""
    return (rows <= SLICED_MAX_ROWS and row_size >= SLICED_MIN_ROW_SIZE and not has_residual
            and not out_overlaps_x)


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of a and b (row-major views with unit column stride) overlap."""
    def span(t: torch.Tensor) -> tuple[int, int]:
        start = t.data_ptr()
        return start, start + ((t.shape[0] - 1) * t.stride(0) + t.shape[1]) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain-torch RMSNorm of each row of x [R, D], computed in float64; returns f32."""
    x64 = x.double()
    inv_rms = torch.rsqrt(x64.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (x64 * inv_rms * weight.double()).float()


def add_rmsnorm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rmsnorm(residual + x) * weight, residual + x), both f32; the inputs are not modified."""
    summed = residual.double() + x.double()
    return rmsnorm_reference(summed, weight, eps), summed.float()
