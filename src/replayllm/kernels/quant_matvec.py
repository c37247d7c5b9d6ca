"""out = x @ W^T for a few activation rows against a GGUF-quantized W: the decode step's every projection.

At decode batch sizes the product is bound by reading W, so each program owns BLOCK_N output rows and walks
their whole K, and the weights cross the memory bus once per step whatever B is. Accumulation is in f32.

Two paths, picked by the batch size (MatvecConfig.block_b):
- B <= 4: CUDA cores, one activation row per program. The programs of one row block are adjacent in launch
  order and run side by side, so the weights come from DRAM once and from L2 for the other rows. Weights
  are dequantized to f32 in registers and multiplied into a [S, BLOCK_N, W] accumulator that is reduced
  once at the end, so the loop body is loads, bit ops and FMAs.
- B > 4: tensor cores, BLOCK_B activation rows per program. A step's weights are dequantized to f32 as a
  [BLOCK_N, S, W] tile, flattened to [BLOCK_N, S*W], and meet the [S*W, BLOCK_B] activations in tl.dot.
  f16 alone would lose accuracy (~1e-3), so both operands are split into two f16 halves
  (v ~ hi * 64 + lo / 32) and three dots keep ~22 bits: the result matches an f32 product to ~1e-6, for
  |x| up to 4e6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._tensor_checks import check_powers_of_two
from .quant_dequant import (
    _F16,
    _decode_float,
    _decode_quant,
    _dequant,
    plan_steps,
    weight_args,
)
from .quant_weight import FLOAT_TYPES, QuantWeight
from .pdl import _pdl_wait, launch_options


@dataclass(frozen=True)
class MatvecConfig:
    """Launch shape of quant_matvec. block_b == 1 selects the CUDA-core path (one activation row per
    program), block_b >= 16 the tensor-core path (tl.dot needs 16 rows per operand). max_groups bounds the
    groups decoded per K step (see quant_dequant); num_stages is Triton's software-pipelining depth."""

    block_n: int
    block_b: int
    max_groups: int = 8
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        check_powers_of_two("MatvecConfig", block_n=self.block_n, block_b=self.block_b,
                            max_groups=self.max_groups, num_warps=self.num_warps)
        if self.block_b != 1 and (self.block_b < 16 or self.block_n < 16):
            raise ValueError(f"MatvecConfig: the tensor-core path (block_b > 1) needs block_b >= 16 and "
                             f"block_n >= 16, got block_b={self.block_b}, block_n={self.block_n}")
        if self.num_stages < 1:
            raise ValueError(f"MatvecConfig.num_stages must be >= 1, got {self.num_stages}")


def default_config(w: QuantWeight, batch: int) -> MatvecConfig:
    """A reasonable launch shape; a tuning pass may replace it per (type, shape, batch)."""
    if batch <= 4:  # CUDA cores, one batch row per program; block shape from a small sweep on H100
        return MatvecConfig(block_n=8, block_b=1, max_groups=16, num_warps=4)
    return MatvecConfig(block_n=32, block_b=16 if batch <= 16 else 32, max_groups=4, num_warps=4)


@triton.jit
def _split_f16(v):
    """f32 v -> (hi, lo) f16 with v ~ hi * 64 + lo / 32: hi holds the top 11 bits, lo the next 11. The
    2^-6 prescale keeps |v| up to 4e6 in f16 range; the 2^5 rescale keeps lo out of f16's subnormals."""
    hi = (v * 0.015625).to(tl.float16)
    lo = ((v - hi.to(tl.float32) * 64.0) * 32.0).to(tl.float16)
    return hi, lo


@triton.jit
def _dot_f32(a, b, A_IS_F16: tl.constexpr):
    """a [M, K] f32 @ b [K, N] f32 -> f32 [M, N] on tensor cores, to ~1e-6: both sides split into f16
    halves and the three products that matter summed (hi*hi, hi*lo, lo*hi). When a's values are already
    f16 (F16 weights) its lo half is zero and that dot is skipped."""
    b_hi, b_lo = _split_f16(b)
    if A_IS_F16:
        a16 = a.to(tl.float16)
        return tl.dot(a16, b_hi) * 64.0 + tl.dot(a16, b_lo) * 0.03125
    a_hi, a_lo = _split_f16(a)
    return tl.dot(a_hi, b_hi) * 4096.0 + (tl.dot(a_hi, b_lo) + tl.dot(a_lo, b_hi)) * 2.0


@triton.jit
def _weight_parts(gg, r3, j, n_cols, n_groups, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr,
                  stride_qs, stride_qh, stride_sc, stride_d, QTYPE: tl.constexpr, IS_FLOAT: tl.constexpr,
                  W: tl.constexpr):
    """The f32 weights of groups gg of rows r3 (broadcastable index tensors, as in _decode_quant): both parts
    w_lo, w_hi, their first columns k_lo, k_hi, and masks m_lo, m_hi of the columns that exist (per column for
    the float types, whose tail need not fill a group; per group for the quantized ones)."""
    if IS_FLOAT:
        v_lo, v_hi, k_lo, k_hi, m_lo, m_hi = _decode_float(gg, r3, j, qs_ptr, stride_qs, n_cols, W)
        w_lo = v_lo.to(tl.float32)
        w_hi = v_hi.to(tl.float32)
    else:
        q_lo, q_hi, s_lo, s_hi, mn_lo, mn_hi, k_lo, k_hi, g_ok = _decode_quant(
            gg, r3, j, n_groups, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr,
            stride_qs, stride_qh, stride_sc, stride_d, QTYPE)
        m_lo = g_ok
        m_hi = g_ok
        w_lo = _dequant(q_lo, s_lo, mn_lo, QTYPE)
        w_hi = _dequant(q_hi, s_hi, mn_hi, QTYPE)
    return w_lo, w_hi, k_lo, k_hi, m_lo, m_hi


@triton.jit
def _rows_dot_x_fma(x_ptr, r, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr,
                    stride_qs, stride_qh, stride_sc, stride_d, n_cols, n_groups, n_steps,
                    QTYPE: tl.constexpr, IS_FLOAT: tl.constexpr, S: tl.constexpr, W: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """sum_k W[r, k] * x[k] for rows r [BLOCK_N] (int64) and one activation row x: -> f32 [BLOCK_N]."""
    r3 = r[None, :, None]  # [1, BLOCK_N, 1]
    j = tl.arange(0, W)[None, None, :]  # [1, 1, W]
    acc = tl.zeros([S, BLOCK_N, W], dtype=tl.float32)
    for step in range(n_steps):
        gg = step * S + tl.arange(0, S)[:, None, None]  # [S, 1, 1]
        w_lo, w_hi, k_lo, k_hi, m_lo, m_hi = _weight_parts(  # w: [S, BLOCK_N, W]; m: [S, 1, 1] or [S, 1, W]
            gg, r3, j, n_cols, n_groups, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr,
            stride_qs, stride_qh, stride_sc, stride_d, QTYPE, IS_FLOAT, W)
        x_lo = tl.load(x_ptr + k_lo + j, mask=m_lo, other=0.0).to(tl.float32)  # [S, 1, W]
        x_hi = tl.load(x_ptr + k_hi + j, mask=m_hi, other=0.0).to(tl.float32)
        acc += w_lo * x_lo + w_hi * x_hi
    return tl.sum(tl.sum(acc, axis=2), axis=0)


@triton.jit
def _rows_dot_x_tc(x_ptr, stride_xb, batch, n_batch, r, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr,
                   stride_qs, stride_qh, stride_sc, stride_d, n_cols, n_groups, n_steps,
                   QTYPE: tl.constexpr, IS_FLOAT: tl.constexpr, S: tl.constexpr, W: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, F16_PRODUCT: tl.constexpr):
    """sum_k W[r, k] * x[b, k] for rows r [BLOCK_N] and batch rows b [BLOCK_B]: -> f32 [BLOCK_N, BLOCK_B].
    F16_PRODUCT: both operands rounded to f16, one dot (prefill's GEMM); otherwise f32 accuracy (_dot_f32).

    A step's parts are decoded as [BLOCK_N, S, W] tiles (one scale per group) and flattened to
    [BLOCK_N, S*W] for the dot. Those columns are not in x's order; x is gathered with the same per-column
    indices, which leaves the dot product unchanged.
    """
    r3 = r[:, None, None]  # [BLOCK_N, 1, 1]
    j = tl.arange(0, W)[None, None, :]  # [1, 1, W]
    xrow = x_ptr + batch[:, None] * stride_xb  # [BLOCK_B, 1]
    b_ok = (batch < n_batch)[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
    for step in range(n_steps):
        gg = step * S + tl.arange(0, S)[None, :, None]  # [1, S, 1]
        w_lo, w_hi, k_lo, k_hi, m_lo, m_hi = _weight_parts(  # w: [BLOCK_N, S, W]
            gg, r3, j, n_cols, n_groups, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr,
            stride_qs, stride_qh, stride_sc, stride_d, QTYPE, IS_FLOAT, W)
        m_lo = m_lo & (j < W)  # [1, S, W]: the dot flattens the masks with the tile
        m_hi = m_hi & (j < W)
        acc += _part_dot(w_lo, k_lo + j, m_lo, xrow, b_ok, QTYPE == _F16, BLOCK_N, S, W, F16_PRODUCT)
        acc += _part_dot(w_hi, k_hi + j, m_hi, xrow, b_ok, QTYPE == _F16, BLOCK_N, S, W, F16_PRODUCT)
    return acc


@triton.jit
def _part_dot(w, cols, col_ok, xrow, b_ok, W_IS_F16: tl.constexpr, BLOCK_N: tl.constexpr, S: tl.constexpr,
              W: tl.constexpr, F16_PRODUCT: tl.constexpr):
    """w [BLOCK_N, S, W] f32 against x at columns `cols` [1, S, W] of the rows xrow [BLOCK_B, 1]:
    -> f32 [BLOCK_N, BLOCK_B]."""
    cols2 = tl.reshape(cols, [1, S * W])
    ok2 = tl.reshape(col_ok, [1, S * W])
    x = tl.load(xrow + cols2, mask=b_ok & ok2, other=0.0)  # [BLOCK_B, S*W]
    if F16_PRODUCT:
        return tl.dot(tl.reshape(w, [BLOCK_N, S * W]).to(tl.float16), tl.trans(x.to(tl.float16)))
    return _dot_f32(tl.reshape(w, [BLOCK_N, S * W]), tl.trans(x.to(tl.float32)), W_IS_F16)


@triton.jit
def _quant_matvec_kernel(
    x_ptr, out_ptr, bias_ptr,
    qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, stride_qs, stride_qh, stride_sc, stride_d,
    n_rows, n_cols, n_groups, n_batch, n_steps, stride_xb, stride_ob,
    QTYPE: tl.constexpr, IS_FLOAT: tl.constexpr, S: tl.constexpr, W: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
    F16_PRODUCT: tl.constexpr, USE_PDL: tl.constexpr,
):
    _pdl_wait(USE_PDL)
    # out[b, n] (+)= sum_k x[b, k] * W[n, k] (+ bias[n]) for this program's BLOCK_N rows n and BLOCK_B rows b.
    # F16_PRODUCT (tensor-core path only): one f16 dot a part, for prefill's GEMM (kernels/quant_matmul).
    # Batch tiles vary fastest in launch order: the programs sharing a row block run side by side, so when
    # there are several (CUDA-core path, B > 1) all but the first find the weights in L2.
    n_batch_tiles = tl.cdiv(n_batch, BLOCK_B)
    row_block = tl.program_id(0) // n_batch_tiles
    batch_tile = tl.program_id(0) % n_batch_tiles
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    # The tail program re-reads the last row instead of masking every load; those results are not stored.
    src = tl.minimum(rows, n_rows - 1).to(tl.int64)
    batch = batch_tile * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    if BLOCK_B == 1:
        acc = _rows_dot_x_fma(x_ptr + batch_tile * stride_xb, src, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr,
                              dm_ptr, stride_qs, stride_qh, stride_sc, stride_d, n_cols, n_groups,
                              n_steps, QTYPE, IS_FLOAT, S, W, BLOCK_N)[:, None]  # [BLOCK_N, 1]
    else:
        acc = _rows_dot_x_tc(x_ptr, stride_xb, batch, n_batch, src, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr,
                             dm_ptr, stride_qs, stride_qh, stride_sc, stride_d, n_cols, n_groups,
                             n_steps, QTYPE, IS_FLOAT, S, W, BLOCK_N, BLOCK_B, F16_PRODUCT)  # [BLOCK_N, BLOCK_B]
    _store_tile(acc, rows, batch, n_rows, n_batch, out_ptr, stride_ob, bias_ptr, HAS_BIAS, ACCUMULATE)


@triton.jit
def _store_tile(acc, rows, batch, n_rows, n_batch, out_ptr, stride_ob, bias_ptr, HAS_BIAS: tl.constexpr,
                ACCUMULATE: tl.constexpr):
    """out[batch, rows] (+)= acc [BLOCK_N, BLOCK_B] (+ bias[rows]); rows and batch rows past the ends masked."""
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (batch < n_batch)[None, :]
    o = out_ptr + batch.to(tl.int64)[None, :] * stride_ob + rows[:, None]  # [BLOCK_N, BLOCK_B]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0)[:, None]
    if ACCUMULATE:
        acc += tl.load(o, mask=mask, other=0.0)
    tl.store(o, acc, mask=mask)


def quant_matvec(x: torch.Tensor, w: QuantWeight, out: torch.Tensor, bias: torch.Tensor | None = None,
                 accumulate: bool = False, config: MatvecConfig | None = None, *, pdl: bool = False) -> torch.Tensor:
    """out = x @ W^T (+ bias); with accumulate=True, out += x @ W^T (+ bias) (a fused residual add).

    x [B, n_cols] f32/f16, out [B, n_rows] f32, bias [n_rows] f32; x and out need unit column stride but
    may have any row stride (out can be a column slice of a wider buffer). out must not overlap x.
    Launches one kernel: no allocation, no host sync, so it can be captured in a CUDA graph.
    """
    _check_args(x, w, out, bias)
    cfg = config or default_config(w, x.shape[0])
    launch_rows_kernel(x, w, out, bias, accumulate, cfg.block_n, cfg.block_b, cfg.max_groups, cfg.num_warps,
                       cfg.num_stages, f16_product=False, pdl=pdl)
    return out


def launch_rows_kernel(x: torch.Tensor, w: QuantWeight, out: torch.Tensor, bias: torch.Tensor | None,
                       accumulate: bool, block_n: int, block_b: int, max_groups: int, num_warps: int,
                       num_stages: int, *, f16_product: bool, pdl: bool) -> None:
    """The launch shared by quant_matvec and prefill's quant_matmul (arguments already checked): block_n weight
    rows x block_b activation rows a program; f16_product only on the tensor-core path (block_b >= 16)."""
    plan = plan_steps(w, max_groups)
    batch = x.shape[0]
    grid = (triton.cdiv(w.n_rows, block_n) * triton.cdiv(batch, block_b),)
    _quant_matvec_kernel[grid](
        x, out, bias if bias is not None else out, *weight_args(w),
        w.n_rows, w.n_cols, plan.n_groups, batch, plan.n_steps, x.stride(0), out.stride(0),
        QTYPE=int(w.ggml_type), IS_FLOAT=w.ggml_type in FLOAT_TYPES, S=plan.groups, W=plan.width,
        BLOCK_N=block_n, BLOCK_B=block_b, HAS_BIAS=bias is not None, ACCUMULATE=accumulate,
        F16_PRODUCT=f16_product, num_warps=num_warps, num_stages=num_stages, **launch_options(pdl))


def _check_args(x: torch.Tensor, w: QuantWeight, out: torch.Tensor, bias: torch.Tensor | None) -> None:
    if not isinstance(w, QuantWeight):
        raise ValueError(f"quant_matvec: w must be a QuantWeight, got {type(w).__name__}")
    if x.dim() != 2 or x.shape[1] != w.n_cols or x.shape[0] < 1 or x.dtype not in (torch.float32, torch.float16):
        raise ValueError(f"quant_matvec: x must be f32/f16 [B >= 1, {w.n_cols}], got {x.dtype} {list(x.shape)}")
    if out.dim() != 2 or tuple(out.shape) != (x.shape[0], w.n_rows) or out.dtype != torch.float32:
        raise ValueError(f"quant_matvec: out must be f32 [{x.shape[0]}, {w.n_rows}], got {out.dtype} "
                         f"{list(out.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != w.n_rows or bias.dtype != torch.float32
                             or not bias.is_contiguous()):
        raise ValueError(f"quant_matvec: bias must be a contiguous f32 [{w.n_rows}], got {bias.dtype} "
                         f"{list(bias.shape)} strides {bias.stride()}")
    for name, t in (("x", x), ("out", out)):
        if t.stride(1) != 1:
            raise ValueError(f"quant_matvec: {name} needs unit column stride, got strides {t.stride()}")
    for name, t in (("x", x), ("out", out), ("bias", bias)):
        if t is not None and t.device != w.device:
            raise ValueError(f"quant_matvec: {name} is on {t.device} but the weight is on {w.device}")
