"""GGUF block decoding in Triton: the shared decoders, dequantize-to-f16 (prefill), row gather (embeddings).

Every kernel walks a row of a packed `QuantWeight` in *groups*: the smallest run of quant bytes whose weights
split into two contiguous runs of columns ("low" and "high" part), each sharing one scale (and min):

    type         group                      low part            high part              scale per part
    Q4_0, Q4_1   one 32-weight block        16 low nibbles      16 high nibbles        d (Q4_1: + m)
    Q8_0         one 32-weight block        bytes 0-15          bytes 16-31            d
    Q4_K, Q5_K   32 qs bytes = 64 weights   sub-block 2c (lo)   sub-block 2c+1 (hi)    d*sc, dmin*m
    Q6_K         16 ql bytes = 32 weights   16 low nibbles      16 high nibbles        d*sc (64 apart)
    F16/BF16/F32 2*W plain values           first W             next W                 none

A kernel step decodes `S` consecutive groups as one tile, so the quant bytes of a row are read as S runs of
16-32 contiguous bytes with one scale load per group. The decoders take broadcastable index tensors, so the
caller picks the tile's axis order ([S, rows, W] or [rows, S, W]). The last step masks off groups past the
end of the row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType

from .quant_weight import FLOAT_TYPES, QuantWeight
from .pdl import _pdl_wait, launch_options

T = GGMLQuantizationType

_F32: tl.constexpr = tl.constexpr(int(T.F32))
_F16: tl.constexpr = tl.constexpr(int(T.F16))
_BF16: tl.constexpr = tl.constexpr(int(T.BF16))
_Q4_0: tl.constexpr = tl.constexpr(int(T.Q4_0))
_Q4_1: tl.constexpr = tl.constexpr(int(T.Q4_1))
_Q8_0: tl.constexpr = tl.constexpr(int(T.Q8_0))
_Q4_K: tl.constexpr = tl.constexpr(int(T.Q4_K))
_Q5_K: tl.constexpr = tl.constexpr(int(T.Q5_K))
_Q6_K: tl.constexpr = tl.constexpr(int(T.Q6_K))

# Weights per part (W) for each type; for float types W is a free choice (64 contiguous bytes of f16).
_PART_WIDTH = {T.Q4_0: 16, T.Q4_1: 16, T.Q8_0: 16, T.Q4_K: 32, T.Q5_K: 32, T.Q6_K: 16,
               T.F16: 32, T.BF16: 32, T.F32: 32}


@dataclass(frozen=True)
class StepPlan:
    """How a kernel walks a row: `n_steps` steps of `groups` groups (of two parts of `width` weights each);
    the row has `n_groups` groups, the last step's groups past them are masked off."""

    groups: int
    width: int
    n_groups: int
    n_steps: int


def plan_steps(w: QuantWeight, max_groups: int) -> StepPlan:
    """Groups per step: the largest power of two <= max_groups, but no wider than the row needs."""
    width = _PART_WIDTH[w.ggml_type]
    n_groups = -(-w.n_cols // (2 * width))
    groups = 1
    while groups * 2 <= max_groups and groups < n_groups:
        groups *= 2
    return StepPlan(groups, width, n_groups, -(-n_groups // groups))


def weight_args(w: QuantWeight) -> tuple:
    """The pointer and stride arguments every decoding kernel takes, in order. A field the type lacks passes
    another of its tensors as a placeholder: the type's constexpr branch never reads it."""
    qs = w.qs
    qh = w.qh if w.qh is not None else qs
    sc = w.scales if w.scales is not None else qs
    # The min slot: Q4_1's f16 mins, or the K-quants' packed top bits of scale and min (quant_weight).
    mn = w.mins if w.mins is not None else w.scales_hi if w.scales_hi is not None else sc
    d = w.d if w.d is not None else qs
    dm = w.dmin if w.dmin is not None else d
    return qs, qh, sc, mn, d, dm, qs.stride(0), qh.stride(0), sc.stride(0), d.stride(0)


@triton.jit
def _kquant_scales(sc_ptr, hi_ptr, row_sc, row_hi, chunk, ok):
    """The 6-bit scales and mins (sc_lo, m_lo, sc_hi, m_hi; int32) of sub-blocks 2*chunk and 2*chunk + 1 of a
    Q4_K / Q5_K row, from the packed layout of quant_weight: `scales` bytes 2c, 2c+1 (low 4 bits of sc and m) and
    `scales_hi` byte c (their top 2 bits). row_sc, row_hi: the row's offsets in the two tensors."""
    lo0 = tl.load(sc_ptr + row_sc + 2 * chunk, mask=ok, other=0).to(tl.int32)
    lo1 = tl.load(sc_ptr + row_sc + 2 * chunk + 1, mask=ok, other=0).to(tl.int32)
    # Byte c, indexed as (2c + 1) >> 1 on purpose: an index that Triton sees contiguous along the group axis gets
    # this load a vectorized layout of its own, converted to the tile's through shared memory, with barriers
    # (the f32 GEMV's loop had 44 instead of 18 a step: benchmarks/gemv_sass.py, NOTES.md).
    hi = tl.load(hi_ptr + row_hi + ((2 * chunk + 1) >> 1), mask=ok, other=0).to(tl.int32)
    return ((lo0 & 0x0F) | ((hi & 0x03) << 4), (lo0 >> 4) | ((hi & 0x0C) << 2),
            (lo1 & 0x0F) | (hi & 0x30), (lo1 >> 4) | ((hi >> 6) << 4))


@triton.jit
def _decode_quant(gg, r, j, n_groups, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr,
                  stride_qs, stride_qh, stride_sc, stride_d, QTYPE: tl.constexpr):
    """Decode group(s) `gg` of rows `r`, weights j of each part: index tensors [S,1,1], [1,N,1], [1,1,W] (or
    the same axes in another order).

    Returns q_lo, q_hi (integers, [S,N,W]), scale_lo, scale_hi, min_lo, min_hi (f32, [S,N,1]), the first
    column of each part k_lo, k_hi ([S,1,1]), and `ok` (gg < n_groups): weight = q * scale - min (min is 0.0
    for types without one). Groups past the row's end decode as zeros.
    """
    ok = gg < n_groups
    qrow = qs_ptr + r * stride_qs
    if QTYPE == _Q4_0 or QTYPE == _Q4_1:
        b = tl.load(qrow + gg * 16 + j, mask=ok, other=0).to(tl.int32)
        scale_lo = tl.load(sc_ptr + r * stride_sc + gg, mask=ok, other=0).to(tl.float32)
        scale_hi = scale_lo
        if QTYPE == _Q4_0:
            q_lo = (b & 0xF) - 8
            q_hi = (b >> 4) - 8
            min_lo = 0.0
        else:
            q_lo = b & 0xF
            q_hi = b >> 4
            min_lo = -tl.load(mn_ptr + r * stride_sc + gg, mask=ok, other=0).to(tl.float32)
        min_hi = min_lo
        k_lo = gg * 32
        k_hi = k_lo + 16
    elif QTYPE == _Q8_0:
        q_lo = tl.load(qrow + gg * 32 + j, mask=ok, other=0)
        q_hi = tl.load(qrow + gg * 32 + 16 + j, mask=ok, other=0)
        scale_lo = tl.load(sc_ptr + r * stride_sc + gg, mask=ok, other=0).to(tl.float32)
        scale_hi = scale_lo
        min_lo = 0.0
        min_hi = 0.0
        k_lo = gg * 32
        k_hi = k_lo + 16
    elif QTYPE == _Q4_K or QTYPE == _Q5_K:
        # Group gg = chunk gg % 4 of super-block gg // 4: 32 bytes whose low nibbles are sub-block 2*gg and
        # high nibbles sub-block 2*gg + 1 (counting sub-blocks of 32 along the row).
        b = tl.load(qrow + gg * 32 + j, mask=ok, other=0).to(tl.int32)
        q_lo = b & 0xF
        q_hi = b >> 4
        if QTYPE == _Q5_K:  # bit i of qh byte l is the 5th bit of weight l of sub-block i of the super-block
            h = tl.load(qh_ptr + r * stride_qh + (gg // 4) * 32 + j, mask=ok, other=0).to(tl.int32)
            chunk = gg % 4
            q_lo = q_lo | (((h >> (2 * chunk)) & 1) << 4)
            q_hi = q_hi | (((h >> (2 * chunk + 1)) & 1) << 4)
        d = tl.load(d_ptr + r * stride_d + gg // 4, mask=ok, other=0).to(tl.float32)
        dmin = tl.load(dm_ptr + r * stride_d + gg // 4, mask=ok, other=0).to(tl.float32)
        # mn_ptr is the packed top bits (`scales_hi`, half as wide as `scales`).
        sc_lo, m_lo, sc_hi, m_hi = _kquant_scales(sc_ptr, mn_ptr, r * stride_sc, r * (stride_sc // 2), gg, ok)
        scale_lo = d * sc_lo.to(tl.float32)
        scale_hi = d * sc_hi.to(tl.float32)
        min_lo = dmin * m_lo.to(tl.float32)
        min_hi = dmin * m_hi.to(tl.float32)
        k_lo = gg * 64
        k_hi = k_lo + 32
    else:  # Q6_K
        # Group gg = c of super-block sb (c = gg % 8 = 4*half + 2*p + l16): ql bytes 16*c.. hold weights
        # half*128 + 32*p + 16*l16 + i (low nibble) and that + 64 (high nibble); their top 2 bits sit in qh
        # byte half*32 + 16*l16 + i at shift 2*p (low) and 4 + 2*p (high).
        sb = gg // 8
        c = gg % 8
        b = tl.load(qrow + gg * 16 + j, mask=ok, other=0).to(tl.int32)
        h = tl.load(qh_ptr + r * stride_qh + sb * 64 + (c // 4) * 32 + (c % 2) * 16 + j, mask=ok, other=0)
        h = h.to(tl.int32)
        shift = ((c // 2) % 2) * 2
        q_lo = ((b & 0xF) | (((h >> shift) & 3) << 4)) - 32
        q_hi = ((b >> 4) | (((h >> (shift + 4)) & 3) << 4)) - 32
        d = tl.load(d_ptr + r * stride_d + sb, mask=ok, other=0).to(tl.float32)
        sub = sb * 16 + (c // 4) * 8 + c % 4
        scale_lo = d * tl.load(sc_ptr + r * stride_sc + sub, mask=ok, other=0).to(tl.float32)
        scale_hi = d * tl.load(sc_ptr + r * stride_sc + sub + 4, mask=ok, other=0).to(tl.float32)
        min_lo = 0.0
        min_hi = 0.0
        k_lo = sb * 256 + (c // 4) * 128 + (c % 4) * 16
        k_hi = k_lo + 64
    return q_lo, q_hi, scale_lo, scale_hi, min_lo, min_hi, k_lo, k_hi, ok


@triton.jit
def _decode_float(gg, r, j, qs_ptr, stride_qs, n_cols, W: tl.constexpr):
    """Plain values of group(s) gg (2*W columns each), zero past n_cols: v_lo, v_hi in the stored dtype,
    k_lo, k_hi as in _decode_quant, and the column masks of both parts (the tail need not be a whole group)."""
    k_lo = gg * (2 * W)
    k_hi = k_lo + W
    mask_lo = k_lo + j < n_cols
    mask_hi = k_hi + j < n_cols
    v_lo = tl.load(qs_ptr + r * stride_qs + k_lo + j, mask=mask_lo, other=0.0)
    v_hi = tl.load(qs_ptr + r * stride_qs + k_hi + j, mask=mask_hi, other=0.0)
    return v_lo, v_hi, k_lo, k_hi, mask_lo, mask_hi


@triton.jit
def _small_int_to_f32(q):
    """The exact f32 value of integers |q| < 2**22, without the int-to-float conversion instruction, which
    runs at a quarter of the FMA rate and bounded the matvec kernels at decode. The bits of 1.5 * 2**23 plus q
    are the float 1.5 * 2**23 + q (q lands in the low mantissa bits; the 2**22 bit absorbs a negative q's
    borrow), and one exact subtraction leaves q: an integer add and a float add, both full rate."""
    return (q.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _dequant(q, scale, minv, QTYPE: tl.constexpr):
    """f32 weights from decoded quants. Each product q * scale is exact in f32 (at most 25 significant bits
    only for Q6_K, rounded once as in the reference), so results match the GGUF dequantizers bit for bit."""
    w = _small_int_to_f32(q) * scale
    if QTYPE == _Q4_1 or QTYPE == _Q4_K or QTYPE == _Q5_K:
        w = w - minv
    return w


@triton.jit
def _dequantize_rows_kernel(
    out_ptr, row_ids_ptr,
    qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, stride_qs, stride_qh, stride_sc, stride_d,
    n_rows, n_cols, n_groups, n_out, stride_out, row_start,
    QTYPE: tl.constexpr, IS_FLOAT: tl.constexpr, S: tl.constexpr, W: tl.constexpr,
    BLOCK_N: tl.constexpr, GATHER: tl.constexpr, USE_PDL: tl.constexpr,
):
    _pdl_wait(USE_PDL)
    # out[i, step's columns] = W[row_ids[i] if GATHER else row_start + i, same columns] for BLOCK_N output rows i.
    out_rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_ok = out_rows < n_out
    if GATHER:  # ids are not checked on the host (no sync): clamp so a bad id cannot read out of bounds
        src = tl.load(row_ids_ptr + tl.minimum(out_rows, n_out - 1)).to(tl.int64)
        src = tl.minimum(tl.maximum(src, 0), n_rows - 1)
    else:
        src = tl.minimum(row_start + out_rows, n_rows - 1).to(tl.int64)
    gg = tl.program_id(1) * S + tl.arange(0, S)[:, None, None]  # [S, 1, 1]
    r = src[None, :, None]  # [1, BLOCK_N, 1]
    j = tl.arange(0, W)[None, None, :]  # [1, 1, W]
    o = out_ptr + out_rows.to(tl.int64)[None, :, None] * stride_out + j  # [1, BLOCK_N, W]
    ok = row_ok[None, :, None]
    if IS_FLOAT:
        v_lo, v_hi, k_lo, k_hi, m_lo, m_hi = _decode_float(gg, r, j, qs_ptr, stride_qs, n_cols, W)
        tl.store(o + k_lo, v_lo.to(tl.float32), mask=ok & m_lo)
        tl.store(o + k_hi, v_hi.to(tl.float32), mask=ok & m_hi)
    else:
        q_lo, q_hi, s_lo, s_hi, mn_lo, mn_hi, k_lo, k_hi, g_ok = _decode_quant(
            gg, r, j, n_groups, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr,
            stride_qs, stride_qh, stride_sc, stride_d, QTYPE)
        tl.store(o + k_lo, _dequant(q_lo, s_lo, mn_lo, QTYPE), mask=ok & g_ok)
        tl.store(o + k_hi, _dequant(q_hi, s_hi, mn_hi, QTYPE), mask=ok & g_ok)


def _check_weight(w: QuantWeight, what: str) -> None:
    if not isinstance(w, QuantWeight):
        raise ValueError(f"{what}: w must be a QuantWeight, got {type(w).__name__}")


def _check_out(w: QuantWeight, out: torch.Tensor, dtype: torch.dtype, shape: tuple[int, int], what: str) -> None:
    if out.dtype != dtype or tuple(out.shape) != shape:
        raise ValueError(f"{what}: out must be {dtype} {list(shape)}, got {out.dtype} {list(out.shape)}")
    if out.stride(1) != 1:
        raise ValueError(f"{what}: out rows must be contiguous (stride(1) == 1), got strides {out.stride()}")
    if out.device != w.device:
        raise ValueError(f"{what}: out is on {out.device} but the weight is on {w.device}")


def _launch_dequantize(w: QuantWeight, out: torch.Tensor, row_ids: torch.Tensor | None, n_out: int,
                       block_n: int, max_groups: int, num_warps: int, row_start: int = 0,
                       pdl: bool = False) -> None:
    plan = plan_steps(w, max_groups)
    grid = (triton.cdiv(n_out, block_n), plan.n_steps)
    _dequantize_rows_kernel[grid](
        out, row_ids if row_ids is not None else out, *weight_args(w),
        w.n_rows, w.n_cols, plan.n_groups, n_out, out.stride(0), row_start,
        QTYPE=int(w.ggml_type), IS_FLOAT=w.ggml_type in FLOAT_TYPES, S=plan.groups, W=plan.width,
        BLOCK_N=block_n, GATHER=row_ids is not None, num_warps=num_warps, **launch_options(pdl))


def dequantize_into(w: QuantWeight, out: torch.Tensor, *, row_start: int = 0, block_n: int = 16,
                    max_groups: int = 4, num_warps: int = 4) -> torch.Tensor:
    """out [n, n_cols] f16 = rows row_start..row_start+n-1 of the weight, dequantized (rounded once from f32).
    For prefill: dequantize a weight, a slice of rows at a time, into a reused scratch buffer, then a vendor
    GEMM. Returns out."""
    _check_weight(w, "dequantize_into")
    n = out.shape[0] if out.dim() == 2 else -1
    if not isinstance(row_start, int) or row_start < 0 or n < 1 or row_start + n > w.n_rows:
        raise ValueError(f"dequantize_into: rows {row_start}..{row_start + n - 1} are outside the weight's "
                         f"{w.n_rows} rows (out shape {list(out.shape)})")
    _check_out(w, out, torch.float16, (n, w.n_cols), "dequantize_into")
    _launch_dequantize(w, out, None, n, block_n, max_groups, num_warps, row_start)
    return out


def gather_rows(w: QuantWeight, row_ids: torch.Tensor, out: torch.Tensor, *, block_n: int = 4,
                max_groups: int = 4, num_warps: int = 4, pdl: bool = False) -> torch.Tensor:
    """out [B, n_cols] f32 = rows `row_ids` [B] of the weight, dequantized: an embedding lookup straight from
    the quantized token_embd. Ids are not range-checked (that would need a host sync); out-of-range ids are
    clamped to [0, n_rows - 1]. Graph-capturable. Returns out."""
    _check_weight(w, "gather_rows")
    if row_ids.dim() != 1 or row_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"gather_rows: row_ids must be a 1-D int32/int64 tensor, got {row_ids.dtype} "
                         f"{list(row_ids.shape)}")
    _check_out(w, out, torch.float32, (row_ids.shape[0], w.n_cols), "gather_rows")
    if row_ids.device != w.device or row_ids.stride(0) != 1 and row_ids.shape[0] > 1:
        raise ValueError(f"gather_rows: row_ids must be contiguous and on {w.device}, got {row_ids.device} "
                         f"stride {row_ids.stride()}")
    if row_ids.shape[0] == 0:
        return out
    _launch_dequantize(w, out, row_ids, row_ids.shape[0], block_n, max_groups, num_warps, pdl=pdl)
    return out
