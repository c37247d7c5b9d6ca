"""Experimental decode GEMV for Q4_K with int8 activations and integer dot products (not yet used by the engine).

The default GEMV (quant_matvec) dequantizes every weight to f32 and spends ~9 instructions a weight
(benchmarks/NOTES.md), so it is issue-bound near a quarter of the memory bandwidth. Here, as the reference C++
engine does for quantized weights, the activation vector is first quantized to int8 in blocks of 32 with one
f32 scale each (`quantize_activations`, once per input vector); then for each 32-bit word of Q4_K quant bits
(8 weights: 4 low nibbles of one sub-block, 4 high nibbles of the next) one mask gives 4 unsigned bytes, and
one `dp4a` multiplies them with 4 int8 activations and adds: about 3 instructions per 4 weights. The sub-block
scales are applied once per 32 weights:

    sum_i w_i x_i = sum_j [ d sc_j xs_j sum_{i in j} q_i xq_i  -  dmin m_j sum_{i in j} x_i ]

with q_i the 4-bit quants, xq_i = round(x_i / xs_j) the int8 activations, and sum x_i exact per block. The
result differs from the f32 product by the activation rounding only (~1e-3 relative).

Under Triton's interpreter (no PTX), `dp4a` is computed with shifts and multiplies instead: the same integers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType

from ..errors import UnsupportedError
from ._tensor_checks import check_same_device, check_tensor
from .quant_weight import QuantWeight

ACTIVATION_BLOCK = 32


@dataclass(frozen=True)
class ActivationQ8:
    """B activation rows of K values quantized in blocks of 32: x ~ q * scale; `block_sum` is the exact sum of
    each block's original values (the Q4_K min term needs it)."""

    q: torch.Tensor  # [B, K] int8
    scale: torch.Tensor  # [B, K / 32] f32
    block_sum: torch.Tensor  # [B, K / 32] f32

    @classmethod
    def allocate(cls, batch: int, n_cols: int, device: torch.device | str) -> ActivationQ8:
        if n_cols % ACTIVATION_BLOCK:
            raise ValueError(f"n_cols must be a multiple of {ACTIVATION_BLOCK}, got {n_cols}")
        blocks = n_cols // ACTIVATION_BLOCK
        return cls(torch.zeros(batch, n_cols, dtype=torch.int8, device=device),
                   torch.zeros(batch, blocks, dtype=torch.float32, device=device),
                   torch.zeros(batch, blocks, dtype=torch.float32, device=device))


@triton.jit
def _quantize_activations_kernel(x_ptr, q_ptr, scale_ptr, sum_ptr, n_blocks, stride_x, stride_q, stride_s,
                                 BLOCKS: tl.constexpr):
    # One program: BLOCKS blocks of 32 values of one activation row.
    row = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)  # [BLOCKS]
    i = tl.arange(0, 32)[None, :]  # [1, 32]
    ok = (b < n_blocks)[:, None]
    x = tl.load(x_ptr + row * stride_x + b[:, None] * 32 + i, mask=ok, other=0.0)  # [BLOCKS, 32]
    amax = tl.max(tl.abs(x), axis=1)  # [BLOCKS]
    scale = amax / 127.0
    inverse = tl.where(amax > 0.0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
    q = tl.floor(x * inverse[:, None] + 0.5)  # in [-127, 127]
    tl.store(q_ptr + row * stride_q + b[:, None] * 32 + i, q.to(tl.int8), mask=ok)
    tl.store(scale_ptr + row * stride_s + b, scale, mask=b < n_blocks)
    tl.store(sum_ptr + row * stride_s + b, tl.sum(x, axis=1), mask=b < n_blocks)


def quantize_activations(x: torch.Tensor, out: ActivationQ8) -> ActivationQ8:
    """out = x [B, K] f32 quantized in blocks of 32 (see ActivationQ8). One launch, graph-capturable."""
    check_tensor("x", x, torch.float32, (None, None), layout="rows")
    batch, n_cols = x.shape
    check_tensor("out.q", out.q, torch.int8, (batch, n_cols))
    check_tensor("out.scale", out.scale, torch.float32, (batch, n_cols // ACTIVATION_BLOCK))
    check_tensor("out.block_sum", out.block_sum, torch.float32, (batch, n_cols // ACTIVATION_BLOCK))
    check_same_device(x=x, q=out.q, scale=out.scale, block_sum=out.block_sum)
    n_blocks = n_cols // ACTIVATION_BLOCK
    blocks = 16
    _quantize_activations_kernel[(batch, triton.cdiv(n_blocks, blocks))](
        x, out.q, out.scale, out.block_sum, n_blocks, x.stride(0), out.q.stride(0), out.scale.stride(0),
        BLOCKS=blocks, num_warps=4)
    return out


def quantize_activations_reference(x: torch.Tensor) -> ActivationQ8:
    blocks = x.float().view(x.shape[0], -1, ACTIVATION_BLOCK)  # [B, K/32, 32]
    amax = blocks.abs().amax(dim=-1)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.floor(blocks * inverse[..., None] + 0.5).to(torch.int8).view(x.shape)
    return ActivationQ8(q, amax / 127.0, blocks.sum(dim=-1))


@triton.jit
def _dot4(a, b, USE_DP4A: tl.constexpr):
    """Per element: sum over the 4 bytes k of (unsigned byte k of a) * (signed byte k of b), as int32."""
    if USE_DP4A:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, 0;", "=r,r,r", [a, b], dtype=tl.int32,
                                         is_pure=True, pack=1)
    total = tl.zeros_like(a)
    for k in tl.static_range(4):
        total += ((a >> (8 * k)) & 0xFF) * ((b << (24 - 8 * k)) >> 24)
    return total


@triton.jit
def _q4k_matvec_q8_kernel(
    xq_ptr, xs_ptr, xsum_ptr, out_ptr, bias_ptr, qs_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr,
    stride_qw, stride_sc, stride_d, stride_xw, stride_xs, stride_ob, n_rows, n_chunks, n_batch, n_steps,
    C: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
    USE_DP4A: tl.constexpr,
):
    # qs and xq are read as int32 words. A row's chunk c (64 weights) is 8 words: the low nibbles of word t are
    # weights 4t..4t+3 of sub-block 2c, the high nibbles the same weights of sub-block 2c+1; the matching
    # activations are words 16c + t and 16c + 8 + t of the quantized row.
    batch = tl.program_id(0) % n_batch
    rows = (tl.program_id(0) // n_batch) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    src = tl.minimum(rows, n_rows - 1).to(tl.int64)[:, None]  # [BLOCK_N, 1]
    t = tl.arange(0, 8)[None, None, :]  # [1, 1, 8]
    xrow = batch.to(tl.int64) * stride_xw
    srow = batch.to(tl.int64) * stride_xs
    acc = tl.zeros([BLOCK_N, C, 8], dtype=tl.float32)  # reduced over chunks and words once, after the loop
    acc_min = tl.zeros([BLOCK_N, C], dtype=tl.float32)
    for step in range(n_steps):
        c = step * C + tl.arange(0, C)  # [C]
        c_ok = c < n_chunks
        c3 = c[None, :, None]
        ok3 = c_ok[None, :, None]
        w = tl.load(qs_ptr + src[:, :, None] * stride_qw + c3 * 8 + t, mask=ok3, other=0)  # [BLOCK_N, C, 8]
        # Loaded at the tile's full shape (each row's copy from L1), so they share the quant words' layout.
        x_lo = tl.load(xq_ptr + xrow + c3 * 16 + t + 0 * src[:, :, None], mask=ok3, other=0)  # [BLOCK_N, C, 8]
        x_hi = tl.load(xq_ptr + xrow + c3 * 16 + 8 + t + 0 * src[:, :, None], mask=ok3, other=0)
        dot_lo = _dot4(w & 0x0F0F0F0F, x_lo, USE_DP4A)  # [BLOCK_N, C, 8] int32
        dot_hi = _dot4((w >> 4) & 0x0F0F0F0F, x_hi, USE_DP4A)
        # Scales loaded straight in the tile's rank ([BLOCK_N, C, 1]), so they meet the products without a
        # layout change; the min term stays 2-D.
        src3 = src[:, :, None]
        sub = src3 * stride_sc + 2 * c3  # sub-block 2c of each row
        d = tl.load(d_ptr + src3 * stride_d + c3 // 4, mask=ok3, other=0.0).to(tl.float32)
        sc_lo = tl.load(sc_ptr + sub, mask=ok3, other=0).to(tl.float32)
        sc_hi = tl.load(sc_ptr + sub + 1, mask=ok3, other=0).to(tl.float32)
        xs_lo = tl.load(xs_ptr + srow + 2 * c3, mask=ok3, other=0.0)  # [1, C, 1]
        xs_hi = tl.load(xs_ptr + srow + 2 * c3 + 1, mask=ok3, other=0.0)
        acc += (d * sc_lo * xs_lo) * dot_lo.to(tl.float32) + (d * sc_hi * xs_hi) * dot_hi.to(tl.float32)
        ok2 = c_ok[None, :]
        sub2 = src * stride_sc + 2 * c[None, :]
        dmin = tl.load(dm_ptr + src * stride_d + c[None, :] // 4, mask=ok2, other=0.0).to(tl.float32)
        m_lo = tl.load(mn_ptr + sub2, mask=ok2, other=0).to(tl.float32)
        m_hi = tl.load(mn_ptr + sub2 + 1, mask=ok2, other=0).to(tl.float32)
        xsum_lo = tl.load(xsum_ptr + srow + 2 * c, mask=c_ok, other=0.0)[None, :]  # [1, C]
        xsum_hi = tl.load(xsum_ptr + srow + 2 * c + 1, mask=c_ok, other=0.0)[None, :]
        acc_min += dmin * (m_lo * xsum_lo + m_hi * xsum_hi)
    result = tl.sum(tl.sum(acc, axis=2), axis=1) - tl.sum(acc_min, axis=1)  # [BLOCK_N]
    row_ok = rows < n_rows
    o = out_ptr + batch.to(tl.int64) * stride_ob + rows
    if HAS_BIAS:
        result += tl.load(bias_ptr + rows, mask=row_ok, other=0.0)
    if ACCUMULATE:
        result += tl.load(o, mask=row_ok, other=0.0)
    tl.store(o, result, mask=row_ok)


def quant_matvec_q8(xq: ActivationQ8, w: QuantWeight, out: torch.Tensor, bias: torch.Tensor | None = None,
                    accumulate: bool = False, block_n: int = 8, chunks: int = 16, num_warps: int = 4) -> torch.Tensor:
    """out (+)= x @ W^T (+ bias) for a Q4_K weight and activations quantized by `quantize_activations`.

    out [B, n_rows] f32 (unit column stride); one launch, no host sync, graph-capturable."""
    if not isinstance(w, QuantWeight) or w.ggml_type != GGMLQuantizationType.Q4_K:
        got = w.ggml_type.name if isinstance(w, QuantWeight) else type(w).__name__
        raise UnsupportedError(f"quant_matvec_q8 supports Q4_K weights only, got {got}")
    batch = xq.q.shape[0]
    check_tensor("xq.q", xq.q, torch.int8, (None, w.n_cols))
    check_tensor("out", out, torch.float32, (batch, w.n_rows), layout="rows")
    if bias is not None:
        check_tensor("bias", bias, torch.float32, (w.n_rows,))
    check_same_device(xq=xq.q, out=out, weight=w.qs)
    n_chunks = w.n_cols // 64
    qs_words = w.qs.view(torch.int32)  # [n_rows, K / 8]
    xq_words = xq.q.view(torch.int32)  # [B, K / 4]
    use_dp4a = os.environ.get("TRITON_INTERPRET") != "1"
    _q4k_matvec_q8_kernel[(triton.cdiv(w.n_rows, block_n) * batch,)](
        xq_words, xq.scale, xq.block_sum, out, bias if bias is not None else out, qs_words, w.scales, w.mins,
        w.d, w.dmin, qs_words.stride(0), w.scales.stride(0), w.d.stride(0), xq_words.stride(0),
        xq.scale.stride(0), out.stride(0), w.n_rows, n_chunks, batch, triton.cdiv(n_chunks, chunks),
        C=chunks, BLOCK_N=block_n, HAS_BIAS=bias is not None, ACCUMULATE=accumulate, USE_DP4A=use_dp4a,
        num_warps=num_warps)
    return out


def quant_matvec_q8_reference(xq: ActivationQ8, w: QuantWeight) -> torch.Tensor:
    """What quant_matvec_q8 computes, in float64: the exact weights times the quantized activations, with the
    min term taken on the exact block sums. [B, n_rows]."""
    from .quant_weight import dequantize_reference

    B, K = xq.q.shape
    x_blocks = xq.q.double().view(B, -1, ACTIVATION_BLOCK) * xq.scale.double()[..., None]  # [B, K/32, 32]
    # Split each weight into its q * d * sc part and its min part, to apply the min to the exact sums.
    dmin = w.dmin.double().repeat_interleave(8, dim=1)  # [N, K/32]
    minimum = dmin * w.mins.double()  # [N, K/32]
    scaled = dequantize_reference(w).double().view(w.n_rows, -1, ACTIVATION_BLOCK) + minimum[..., None]
    dots = torch.einsum("nbi,zbi->zn", scaled, x_blocks)
    return dots - xq.block_sum.double() @ minimum.T
