"""Decode GEMVs for Q4_0, Q4_1, Q4_K, Q5_K, Q6_K and Q8_0 with integer dot products, on activations quantized
to 16 bits (the decode step's default) or to int8 (opt-in: faster, coarser).

The f32-activation GEMV (quant_matvec) dequantizes every weight to f32 and spends ~9 instructions a weight
(benchmarks/NOTES.md), so it is issue-bound near a quarter of the memory bandwidth. Here, as the reference C++
engine does for quantized weights, the activation vector is first quantized to int8 in blocks of 32 with one
f32 scale each (`quantize_activations`, once per input vector); then each 32-bit word of quant bits gives the
bytes of 4 weights (as stored for Q8_0; a few masks and shifts for the K-quants), and one `dp4a` multiplies
them with 4 int8 activations and adds. The weights' scales are applied once per 16 or 32 weights, to integer
sums:

    Q4_0  sum_j   d_j xs_j sum_{i in j} (q_i - 8) xq_i                                  (j: 32 weights)
    Q4_1  sum_j [ d_j xs_j sum_{i in j} q_i xq_i  +  m_j sum_{i in j} x_i ]             (j: 32 weights)
    Q4_K  sum_j [ d sc_j xs_j sum_{i in j} q_i xq_i  -  dmin m_j sum_{i in j} x_i ]     (j: 32 weights)
    Q5_K  the same as Q4_K, q_i with its 5th bit                                        (j: 32 weights)
    Q6_K  sum_j   d sc_j xs_j sum_{i in j} (q_i - 32) xq_i                              (j: 16 weights)
    Q8_0  sum_j   d_j xs_j sum_{i in j} q_i xq_i                                        (j: 32 weights)

with q_i the quants (4, 5 or 6 bits, int8), xq_i = round(x_i / xs) the int8 activations with xs their block's
scale, and sum x_i the exact block sum. The integer sums are exact (the Q4_0 and Q6_K offsets too: one more
dp4a of each activation word against bytes -8 or -32); the result differs from the f32 product by the
activation rounding only (~1e-3 relative).

Each kernel walks a row in chunks, `chunks` of them a step (the launcher's argument): a chunk is the smallest
run of quant words whose weights use whole activation blocks:

    type   chunk          quant words per chunk (int32)                      dp4a operands
    Q4_0   32 weights     4 qs (low nibbles: weights 0-15, high: 16-31)      u8 x s8, then xq x -8
    Q4_1   32 weights     4 qs (as Q4_0)                                     u8 x s8
    Q4_K   64 weights     8 qs (low nibbles: sub-block 2c, high: 2c+1)        u8 x s8
    Q5_K   64 weights     8 qs (as Q4_K) + 8 qh (one bit of each byte each)   u8 x s8
    Q6_K   128 weights    16 ql (4 runs of 32 weights) + 8 qh (2 bits each)   (u8 - 32) x s8
    Q8_0   32 weights     8 qs                                               s8 x s8

16-bit activations (`QuantizedActivations.wide`) are two planes of signed bytes, v = 256 hi + lo, each word of 4
activations an int64 whose halves are the planes: every dp4a above runs once per plane and the two integer
sums combine as 256 coarse + fine (int8_activations).

Under Triton's interpreter (no PTX), `dp4a` is computed with shifts and multiplies instead: the same integers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType

from ..errors import UnsupportedError
from ._tensor_checks import check_same_device, check_tensor, under_interpreter
from .int8_activations import ACTIVATION_BLOCK, QuantizedActivations, wide_values
from .quant_dequant import _kquant_scales
from .quant_weight import QuantWeight
from .pdl import _pdl_wait, launch_options
from .row_tiles import _prefetch_rows_l2, _program_rows, _store_row_tiles, _store_rows, _sum_tile, _tile_sources

T = GGMLQuantizationType

# How _dot4 reads the bytes of its first operand.
_U8: tl.constexpr = tl.constexpr(0)  # unsigned (Q4_K nibbles)
_S8: tl.constexpr = tl.constexpr(1)  # signed (Q8_0 quants)
_U8_MINUS_32: tl.constexpr = tl.constexpr(2)  # unsigned minus 32 (Q6_K's 6-bit quants, stored with offset 32)


@triton.jit
def _dot4(a, b, USE_DP4A: tl.constexpr, A_BYTES: tl.constexpr = _U8):
    """Per element: sum over the 4 bytes k of (byte k of a, read as A_BYTES says) * (signed byte k of b), as
    int32. For _U8_MINUS_32 a second dp4a of b with bytes -32 (0xE0) starts the sum: two instructions, exact."""
    if USE_DP4A:
        if A_BYTES == _S8:
            asm: tl.constexpr = "dp4a.s32.s32 $0, $1, $2, 0;"
        elif A_BYTES == _U8_MINUS_32:
            asm: tl.constexpr = "{ .reg .s32 t; dp4a.s32.s32 t, $2, 0xE0E0E0E0, 0; dp4a.u32.s32 $0, $1, $2, t; }"
        else:
            asm: tl.constexpr = "dp4a.u32.s32 $0, $1, $2, 0;"
        return tl.inline_asm_elementwise(asm, "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1)
    total = tl.zeros_like(a)
    for k in tl.static_range(4):
        if A_BYTES == _S8:
            a_k = (a << (24 - 8 * k)) >> 24
        else:
            a_k = (a >> (8 * k)) & 0xFF
        if A_BYTES == _U8_MINUS_32:
            a_k -= 32
        total += a_k * ((b << (24 - 8 * k)) >> 24)
    return total


@triton.jit
def _byte_planes(words):
    """16-bit activation quants, a run of 4 to an int64 word in their byte-plane form (int8_activations: the 4
    high bytes, then the 4 low ones) -> (coarse, fine): the two int32 halves. Each plane then meets the weights
    exactly as int8 activations do, and sum q v = 256 (q . coarse) + (q . fine). No instruction: the halves are
    the word's two registers."""
    return words.to(tl.int32), (words >> 32).to(tl.int32)


@triton.jit
def _dot4_add(a, b, acc, USE_DP4A: tl.constexpr):
    """acc + _dot4(a, b) for unsigned bytes of a: one dp4a, whose accumulator does the add."""
    if USE_DP4A:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, acc], dtype=tl.int32,
                                         is_pure=True, pack=1)
    return acc + _dot4(a, b, USE_DP4A)


@triton.jit
def _minus8_sum(x_lo, x_hi, USE_DP4A: tl.constexpr):
    """-8 * (sum of the 8 signed bytes of x_lo and x_hi), per element: two dp4a against bytes -8 (0xF8). Q4_0's
    offset, exact; it depends on the activations only, so the rows a thread holds share it."""
    if USE_DP4A:
        return tl.inline_asm_elementwise(
            "{ .reg .s32 t; dp4a.s32.s32 t, $1, 0xF8F8F8F8, 0; dp4a.s32.s32 $0, $2, 0xF8F8F8F8, t; }",
            "=r,r,r", [x_lo, x_hi], dtype=tl.int32, is_pure=True, pack=1)
    total = tl.zeros_like(x_lo)
    for k in tl.static_range(4):
        total += ((x_lo << (24 - 8 * k)) >> 24) + ((x_hi << (24 - 8 * k)) >> 24)
    return -8 * total


@triton.jit
def _fifth_bits(qh, bit, USE_DP4A: tl.constexpr):
    """Bit `bit` (0..7, broadcast) of each byte of qh moved to bit 4 of that byte, the other bits cleared: one
    rotate (a funnel shift; the bits it wraps around fall outside the mask) and one AND."""
    if USE_DP4A:
        rotated = tl.inline_asm_elementwise("shf.l.wrap.b32 $0, $1, $1, $2;", "=r,r,r", [qh, (4 - bit) & 31],
                                            dtype=tl.int32, is_pure=True, pack=1)
        return rotated & 0x10101010
    return ((qh >> bit) & 0x01010101) << 4


@triton.jit
def _row_block(n_rows, n_batch, BLOCK_N: tl.constexpr):
    """This program's batch row and BLOCK_N weight rows (batch rows vary fastest, so the programs sharing a
    weight block run side by side), and the rows to read: past n_rows, the last row again (never stored)."""
    batch = tl.program_id(0) % n_batch
    rows = (tl.program_id(0) // n_batch) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    return batch, rows, tl.minimum(rows, n_rows - 1).to(tl.int64)


@triton.jit
def _step_chunks(step, n_chunks, C: tl.constexpr):
    """The C chunks of a step: `ok` [1, C] (inside the row), and their indices as [1, C] and [1, C, 1], clamped to
    the last chunk: chunks past the row's end re-read it (no masked loads, no zero fills), and the caller zeroes
    their scales with `ok`."""
    c = step * C + tl.arange(0, C)  # [C]
    ok = (c < n_chunks)[None, :]
    c = tl.minimum(c, n_chunks - 1)
    return ok, c[None, :], c[None, :, None]


@triton.jit
def _nibble_dots(w, x_lo, x_hi, start, USE_DP4A: tl.constexpr):
    """Per word of a Q4_0/Q4_1 tile: start + (low nibbles of w) . x_lo + (high nibbles of w) . x_hi, int32."""
    lo = _dot4_add(w & 0x0F0F0F0F, x_lo, start, USE_DP4A)
    return _dot4_add((w >> 4) & 0x0F0F0F0F, x_hi, lo, USE_DP4A)


@triton.jit
def _q4_sums(w, x_lo, x_hi, HAS_MIN: tl.constexpr, USE_DP4A: tl.constexpr):
    """sum (q [- 8]) xq per block of a Q4_0 / Q4_1 tile [BLOCK_N, C, 4] of quant words: int32 [BLOCK_N, C]."""
    start = tl.zeros_like(w) if HAS_MIN else _minus8_sum(x_lo, x_hi, USE_DP4A)
    return tl.sum(_nibble_dots(w, x_lo, x_hi, start, USE_DP4A), axis=2)


@triton.jit
def _q4_matvec_q8_kernel(
    xq_ptr, xs_ptr, xsum_ptr, out_ptr, bias_ptr, qs_ptr, d_ptr, m_ptr,
    stride_qw, stride_d, stride_xw, stride_xs, stride_ob, n_rows, n_chunks, n_batch, n_steps,
    C: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACCUMULATE: tl.constexpr, WIDE: tl.constexpr, USE_DP4A: tl.constexpr, USE_PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    if PREFETCH:  # before the PDL wait (row_tiles._prefetch_rows_l2)
        if tl.program_id(0) % n_batch == 0:  # batch row 0's programs, once a weight row
            _prefetch_rows_l2(qs_ptr, (tl.program_id(0) // n_batch) * BLOCK_N, n_rows, stride_qw, BLOCK_N)
    _pdl_wait(USE_PDL)
    # Q4_0 (weight = (q - 8) d), and Q4_1 with HAS_MIN (weight = q d + m, the min m times the block's exact
    # activation sum). qs and xq are read as int32 words. Chunk c is block c (32 weights, one scale d): qs word
    # 4c + u (u < 4) holds weights 4u..4u+3 in its low nibbles and 16 + 4u..16 + 4u + 3 in its high nibbles,
    # times xq words 8c + u and 8c + 4 + u. The tile is [BLOCK_N, C, 4] (a row's block is one 16-byte load of a
    # thread), so the integer sums over u stay inside a thread and the [BLOCK_N, C] scale tiles have their
    # layout: no layout conversion, no barrier in the loop.
    batch, rows, src = _row_block(n_rows, n_batch, BLOCK_N)
    src2 = src[:, None]  # [BLOCK_N, 1]
    src3 = src[:, None, None]  # [BLOCK_N, 1, 1]
    u = tl.arange(0, 4)[None, None, :]  # [1, 1, 4]
    xrow = xq_ptr + batch.to(tl.int64) * stride_xw
    srow = batch.to(tl.int64) * stride_xs
    acc = tl.zeros([BLOCK_N, C], dtype=tl.float32)  # reduced over blocks once, after the loop
    for step in range(n_steps):
        # Blocks past the row's end get d = m = 0.
        ok, c2, c3 = _step_chunks(step, n_chunks, C)  # [1, C], [1, C], [1, C, 1]
        w = tl.load(qs_ptr + src3 * stride_qw + 4 * c3 + u)  # [BLOCK_N, C, 4]
        x = xrow + 8 * c3 + u + 0 * src3  # at the tile's full shape, so it takes the quant words' layout
        if WIDE:  # [BLOCK_N, C]: sum (q [- 8]) xq over both byte planes
            coarse_lo, fine_lo = _byte_planes(tl.load(x))
            coarse_hi, fine_hi = _byte_planes(tl.load(x + 4))
            s = (_q4_sums(w, coarse_lo, coarse_hi, HAS_MIN, USE_DP4A).to(tl.float32) * 256.0
                 + _q4_sums(w, fine_lo, fine_hi, HAS_MIN, USE_DP4A).to(tl.float32))
        else:
            s = _q4_sums(w, tl.load(x), tl.load(x + 4), HAS_MIN, USE_DP4A).to(tl.float32)
        d = tl.where(ok, tl.load(d_ptr + src2 * stride_d + c2).to(tl.float32), 0.0)  # [BLOCK_N, C]
        xs = tl.load(xs_ptr + srow + c2 + 0 * src2)
        acc += (d * xs) * s
        if HAS_MIN:
            m = tl.where(ok, tl.load(m_ptr + src2 * stride_d + c2).to(tl.float32), 0.0)
            acc += m * tl.load(xsum_ptr + srow + c2 + 0 * src2)
    result = tl.sum(acc, axis=1)  # [BLOCK_N]
    _store_rows(result, rows, batch, out_ptr, bias_ptr, stride_ob, n_rows, HAS_BIAS, ACCUMULATE)


@triton.jit
def _kquant_half_chunk(qs, qh, x_lo, x_hi, bit, s_lo, s_hi, HAS_QH: tl.constexpr, USE_DP4A: tl.constexpr):
    """s_lo, s_hi plus the dot products of one half of a Q4_K / Q5_K chunk: qs, x_lo, x_hi are its 4 quant words
    and the matching activation words of sub-blocks 2c and 2c + 1; for Q5_K (HAS_QH) qh are its 4 qh words and
    `bit` the qh bit of 2c. For Q4_K the second product is 16 times the true one (the nibbles read in place)."""
    q_lo = qs & 0x0F0F0F0F
    if HAS_QH:
        q_lo = q_lo | _fifth_bits(qh, bit, USE_DP4A)
        q_hi = ((qs >> 4) & 0x0F0F0F0F) | _fifth_bits(qh, bit + 1, USE_DP4A)
    else:
        # Q4_K: the high nibbles in place (0xF0F0F0F0 as a signed int32), one AND instead of a shift and an
        # AND; their sums come out 16 times too large, which _kquant_row_step folds into the scale (exactly).
        q_hi = qs & -0x0F0F0F10
    return _dot4_add(q_lo, x_lo, s_lo, USE_DP4A), _dot4_add(q_hi, x_hi, s_hi, USE_DP4A)


@triton.jit
def _kquant_plane_sums(qs0, qs1, qh0, qh1, x0, x4, x8, x12, bit, HAS_QH: tl.constexpr, USE_DP4A: tl.constexpr):
    """The integer sums q . xq of sub-blocks 2c and 2c + 1 of a Q4_K / Q5_K tile against one plane of int8
    activation words (x_t: word 16c + t + u): f32 [BLOCK_N, C] each, exact."""
    s_lo, s_hi = _kquant_half_chunk(qs0, qh0, x0, x8, bit, 0, 0, HAS_QH, USE_DP4A)
    s_lo, s_hi = _kquant_half_chunk(qs1, qh1, x4, x12, bit, s_lo, s_hi, HAS_QH, USE_DP4A)
    return tl.sum(s_lo, axis=2).to(tl.float32), tl.sum(s_hi, axis=2).to(tl.float32)


@triton.jit
def _kquant_chunk_sums(qs0, qs1, qh0, qh1, words, bit, HAS_QH: tl.constexpr, WIDE: tl.constexpr,
                       USE_DP4A: tl.constexpr):
    """The sums q . xq of sub-blocks 2c and 2c + 1 (qs0, qs1: the tile's quant words t < 4 and t >= 4; words: the
    activation words 16c + t for t < 4, t + 4, t + 8 and t + 12, loaded): f32 [BLOCK_N, C] each, exact; 16-bit
    quants (WIDE) as 256 x the coarse plane's sums plus the fine plane's."""
    if WIDE:
        c0, f0 = _byte_planes(words[0])
        c4, f4 = _byte_planes(words[1])
        c8, f8 = _byte_planes(words[2])
        c12, f12 = _byte_planes(words[3])
        coarse_lo, coarse_hi = _kquant_plane_sums(qs0, qs1, qh0, qh1, c0, c4, c8, c12, bit, HAS_QH, USE_DP4A)
        fine_lo, fine_hi = _kquant_plane_sums(qs0, qs1, qh0, qh1, f0, f4, f8, f12, bit, HAS_QH, USE_DP4A)
        sum_lo = coarse_lo * 256.0 + fine_lo
        sum_hi = coarse_hi * 256.0 + fine_hi
    else:  # (an else, not code after a return: Triton compiles what follows a constexpr if's return too)
        sum_lo, sum_hi = _kquant_plane_sums(qs0, qs1, qh0, qh1, words[0], words[1], words[2], words[3], bit,
                                            HAS_QH, USE_DP4A)
    return sum_lo, sum_hi


@triton.jit
def _kquant_row_step(src, words, xs_lo, xs_hi, xsum_lo, xsum_hi, ok, c2, c3, u, bit,
                     qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, stride_qw, stride_qh, stride_sc, stride_d,
                     HAS_QH: tl.constexpr, WIDE: tl.constexpr, USE_DP4A: tl.constexpr):
    """One step's contribution [BLOCK_N, C] of rows `src` ([BLOCK_N]) of a Q4_K / Q5_K matrix, against activation
    words, scales and block sums already loaded (shared by every row a thread holds)."""
    src2 = src[:, None]  # [BLOCK_N, 1]
    src3 = src[:, None, None]  # [BLOCK_N, 1, 1]
    qs = qs_ptr + src3 * stride_qw + 8 * c3 + u  # [BLOCK_N, C, 4]
    if HAS_QH:
        qh = qh_ptr + tl.multiple_of(src * stride_qh, 8)[:, None, None] + 8 * (c3 // 4) + u  # 16-byte loads
        qh0, qh1 = tl.load(qh), tl.load(qh + 4)
    else:
        qh0, qh1 = 0, 0
    s_lo, s_hi = _kquant_chunk_sums(tl.load(qs), tl.load(qs + 4), qh0, qh1, words, bit, HAS_QH, WIDE, USE_DP4A)
    # Sub-blocks 2c and 2c + 1 of each row [BLOCK_N, C]; mn_ptr holds the scales' packed top bits.
    sc_lo, m_lo, sc_hi, m_hi = _kquant_scales(sc_ptr, mn_ptr, src2 * stride_sc, src2 * (stride_sc // 2), c2, ok)
    # The 6-bit scale times the sum, exact for int8 activations (|sum * sc| < 32 * 31 * 127 * 63 < 2**23).
    s_lo = s_lo * sc_lo.to(tl.float32)
    if HAS_QH:
        s_hi = s_hi * sc_hi.to(tl.float32)
    else:  # 16 x the sums of Q4_K's high nibbles (_kquant_half_chunk); every factor a power of two: exact
        s_hi = s_hi * (sc_hi.to(tl.float32) * 0.0625)
    mins = m_lo.to(tl.float32) * xsum_lo + m_hi.to(tl.float32) * xsum_hi
    d = tl.where(ok, tl.load(d_ptr + src2 * stride_d + c2 // 4).to(tl.float32), 0.0)  # [BLOCK_N, C]
    dmin = tl.where(ok, tl.load(dm_ptr + src2 * stride_d + c2 // 4).to(tl.float32), 0.0)
    return d * (s_lo * xs_lo + s_hi * xs_hi) - dmin * mins


@triton.jit
def _kquant_matvec_q8_kernel(
    xq_ptr, xs_ptr, xsum_ptr, out_ptr, bias_ptr, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr,
    stride_qw, stride_qh, stride_sc, stride_d, stride_xw, stride_xs, stride_ob, n_rows, n_chunks, n_batch, n_steps,
    C: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, HAS_QH: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACCUMULATE: tl.constexpr, WIDE: tl.constexpr, USE_DP4A: tl.constexpr, USE_PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    batch, first = _program_rows(n_batch, BLOCK_N, ROWS)
    if PREFETCH:  # before the PDL wait (row_tiles._prefetch_rows_l2); batch row 0's programs, once a weight row
        if batch == 0:
            _prefetch_rows_l2(qs_ptr, first, n_rows, stride_qw, BLOCK_N * ROWS)
            if HAS_QH:
                _prefetch_rows_l2(qh_ptr, first, n_rows, stride_qh, BLOCK_N * ROWS)
    _pdl_wait(USE_PDL)
    # Q4_K, and Q5_K with HAS_QH. qs, qh and xq are read as int32 words. A row's chunk c (64 weights) is 8 qs
    # words: the low nibbles of word t are weights 4t..4t+3 of sub-block 2c, the high nibbles those of 2c + 1,
    # times activation words 16c + t and 16c + 8 + t. Q5_K's 5th bits are in qh word 8s + t of super-block
    # s = c // 4 (all 8 sub-blocks of s, sub-block i at bit i of each byte): bits 2 (c % 4) and 2 (c % 4) + 1. The tiles
    # are [BLOCK_N, C, 4], loaded twice a step (words t = u and 4 + u): a thread holds whole chunks, so the
    # integer sums, the [BLOCK_N, C] scale tiles and the min term share one layout, a chunk's scales are
    # loaded once, and nothing is converted between layouts (no barrier in the loop).
    # A program has ROWS tiles of BLOCK_N rows (1, 2 or 4): each thread then holds the same chunk of ROWS rows,
    # and the activation words, their scales and block sums it loads for one serve all of them (a 16-bit
    # activation word is twice the bytes of the quant words it meets, so these loads outnumber the weights').
    src0, src1, src2, src3 = _tile_sources(first, n_rows, BLOCK_N)
    zero3 = 0 * src0[:, None, None]  # [BLOCK_N, 1, 1]: shared loads at the tile's full shape (its layout)
    zero2 = 0 * src0[:, None]
    u = tl.arange(0, 4)[None, None, :]  # [1, 1, 4]
    xrow = xq_ptr + batch.to(tl.int64) * stride_xw
    srow = batch.to(tl.int64) * stride_xs
    # Reduced over chunks once, after the loop; the accumulators of tiles past ROWS stay unused.
    acc0 = tl.zeros([BLOCK_N, C], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, C], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, C], dtype=tl.float32)
    for step in range(n_steps):
        # Chunks past the row's end get d = dmin = 0.
        ok, c2, c3 = _step_chunks(step, n_chunks, C)  # [1, C], [1, C], [1, C, 1]
        x = xrow + 16 * c3 + u + zero3  # at the tile's full shape, so it takes the quant words' layout
        words = (tl.load(x), tl.load(x + 4), tl.load(x + 8), tl.load(x + 12))
        bit = 2 * (c3 % 4)  # [1, C, 1]
        xs = xs_ptr + srow + 2 * c2 + zero2
        xsum = xsum_ptr + srow + 2 * c2 + zero2
        xs_lo, xs_hi, xsum_lo, xsum_hi = tl.load(xs), tl.load(xs + 1), tl.load(xsum), tl.load(xsum + 1)
        acc0 += _kquant_row_step(src0, words, xs_lo, xs_hi, xsum_lo, xsum_hi, ok, c2, c3, u, bit, qs_ptr, qh_ptr,
                                 sc_ptr, mn_ptr, d_ptr, dm_ptr, stride_qw, stride_qh, stride_sc, stride_d, HAS_QH,
                                 WIDE, USE_DP4A)
        if ROWS > 1:
            acc1 += _kquant_row_step(src1, words, xs_lo, xs_hi, xsum_lo, xsum_hi, ok, c2, c3, u, bit, qs_ptr,
                                     qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, stride_qw, stride_qh, stride_sc,
                                     stride_d, HAS_QH, WIDE, USE_DP4A)
        if ROWS > 2:
            acc2 += _kquant_row_step(src2, words, xs_lo, xs_hi, xsum_lo, xsum_hi, ok, c2, c3, u, bit, qs_ptr,
                                     qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, stride_qw, stride_qh, stride_sc,
                                     stride_d, HAS_QH, WIDE, USE_DP4A)
            acc3 += _kquant_row_step(src3, words, xs_lo, xs_hi, xsum_lo, xsum_hi, ok, c2, c3, u, bit, qs_ptr,
                                     qh_ptr, sc_ptr, mn_ptr, d_ptr, dm_ptr, stride_qw, stride_qh, stride_sc,
                                     stride_d, HAS_QH, WIDE, USE_DP4A)
    _store_row_tiles(tl.sum(acc0, axis=1), tl.sum(acc1, axis=1), tl.sum(acc2, axis=1), tl.sum(acc3, axis=1), first,
                     batch, out_ptr, bias_ptr, stride_ob, n_rows, BLOCK_N, ROWS, HAS_BIAS, ACCUMULATE)


@triton.jit
def _q6k_quants(ql, qh, RUN: tl.constexpr):
    """The 6-bit quants (0..63) of run RUN of a Q6_K chunk, 4 to an int32 word: the low (RUN < 2) or high nibbles
    of the ql words, with bits 2 RUN and 2 RUN + 1 of the matching qh bytes on top."""
    nibbles = (ql >> (4 * (RUN // 2))) & 0x0F0F0F0F
    return nibbles | (((qh >> (2 * RUN)) & 0x03030303) << 4)


@triton.jit
def _q6k_row_step(acc, src, xw, xs, ok, c, g, t, ql_ptr, qh_ptr, sc_ptr, d_ptr, stride_ql, stride_qh, stride_sc,
                  stride_d, WIDE: tl.constexpr, USE_DP4A: tl.constexpr):
    """acc [BLOCK_N, C, 2, 1] plus one step's products of rows `src` ([BLOCK_N]) of a Q6_K matrix, against the 4
    runs' activation words `xw` and scales `xs`, already loaded (shared by every row a thread holds)."""
    src = src[:, None, None, None]  # [BLOCK_N, 1, 1, 1]
    ql = ql_ptr + src * stride_ql + 16 * c + t  # [BLOCK_N, C, 2, 4]
    ql_p0 = tl.load(ql)  # runs 0 (low nibbles) and 2 (high nibbles)
    ql_p1 = tl.load(ql + 8)  # runs 1 and 3
    qh = tl.load(qh_ptr + src * stride_qh + 8 * c + t)
    d = tl.load(d_ptr + src * stride_d + c // 2, mask=ok, other=0.0).to(tl.float32)  # [BLOCK_N, C, 1, 1]
    sc_run0 = sc_ptr + src * stride_sc + 8 * c + g  # [BLOCK_N, C, 2, 1]
    for r in tl.static_range(4):
        if r % 2 == 0:
            q = _q6k_quants(ql_p0, qh, r)
        else:
            q = _q6k_quants(ql_p1, qh, r)
        # [BLOCK_N, C, 2, 1]: the 16 weights of one scale summed as integers, then that scale (exact for int8
        # activations: |sum * sc| < 2**23)
        dot = _word_sums(q, xw[r], _U8_MINUS_32, WIDE, USE_DP4A)
        acc += (d * xs[r]) * (dot * tl.load(sc_run0 + 2 * r).to(tl.float32))
    return acc


@triton.jit
def _q6k_matvec_q8_kernel(
    xq_ptr, xs_ptr, out_ptr, bias_ptr, ql_ptr, qh_ptr, sc_ptr, d_ptr,
    stride_ql, stride_qh, stride_sc, stride_d, stride_xw, stride_xs, stride_ob, n_rows, n_chunks, n_batch, n_steps,
    C: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
    WIDE: tl.constexpr, USE_DP4A: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr,
):
    batch, first = _program_rows(n_batch, BLOCK_N, ROWS)
    if PREFETCH:  # before the PDL wait (row_tiles._prefetch_rows_l2)
        if batch == 0:
            _prefetch_rows_l2(ql_ptr, first, n_rows, stride_ql, BLOCK_N * ROWS)
            _prefetch_rows_l2(qh_ptr, first, n_rows, stride_qh, BLOCK_N * ROWS)
    _pdl_wait(USE_PDL)
    # ql, qh and xq are read as int32 words. Chunk c (half c of the row's super-blocks) is 128 weights in 4 runs
    # r of 32, one activation block each: ql word 16c + 8p + t (t < 8) holds weights 4t..4t+3 of run p in its
    # low nibbles and of run 2 + p in its high nibbles; qh word 8c + t holds their top 2 bits, run r at bits
    # 2r, 2r + 1 of each byte; the activations of run r are words 32c + 8r + t. The tile [BLOCK_N, C, 2, 4]
    # splits t = 4g + k: each g is 16 weights of one scale (8c + 2r + g), summed as integers over k first.
    # ROWS tiles of BLOCK_N rows a program share the activation loads, as in the Q4_K kernel.
    src0, src1, src2, src3 = _tile_sources(first, n_rows, BLOCK_N)
    zero = 0 * src0[:, None, None, None]  # [BLOCK_N, 1, 1, 1]
    g = tl.arange(0, 2)[None, None, :, None]  # [1, 1, 2, 1]
    t = 4 * g + tl.arange(0, 4)[None, None, None, :]  # [1, 1, 2, 4]
    xrow = batch.to(tl.int64) * stride_xw
    srow = batch.to(tl.int64) * stride_xs
    # Reduced over chunks and sub-groups after the loop; the accumulators of tiles past ROWS stay unused.
    acc0 = tl.zeros([BLOCK_N, C, 2, 1], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, C, 2, 1], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, C, 2, 1], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, C, 2, 1], dtype=tl.float32)
    for step in range(n_steps):
        c = (step * C + tl.arange(0, C))[None, :, None, None]  # [1, C, 1, 1]
        # Chunks past the row's end read the last chunk (no masked loads, no zero fills) and get d = 0.
        ok = c < n_chunks
        c = tl.minimum(c, n_chunks - 1)
        x_run0 = xq_ptr + xrow + 32 * c + t + zero  # at the tile's full shape, as in the Q4_K kernel
        xw = (tl.load(x_run0), tl.load(x_run0 + 8), tl.load(x_run0 + 16), tl.load(x_run0 + 24))
        xs_run0 = xs_ptr + srow + 4 * c + zero  # [BLOCK_N, C, 1, 1]
        xs = (tl.load(xs_run0), tl.load(xs_run0 + 1), tl.load(xs_run0 + 2), tl.load(xs_run0 + 3))
        acc0 = _q6k_row_step(acc0, src0, xw, xs, ok, c, g, t, ql_ptr, qh_ptr, sc_ptr, d_ptr, stride_ql,
                             stride_qh, stride_sc, stride_d, WIDE, USE_DP4A)
        if ROWS > 1:
            acc1 = _q6k_row_step(acc1, src1, xw, xs, ok, c, g, t, ql_ptr, qh_ptr, sc_ptr, d_ptr, stride_ql,
                                 stride_qh, stride_sc, stride_d, WIDE, USE_DP4A)
        if ROWS > 2:
            acc2 = _q6k_row_step(acc2, src2, xw, xs, ok, c, g, t, ql_ptr, qh_ptr, sc_ptr, d_ptr, stride_ql,
                                 stride_qh, stride_sc, stride_d, WIDE, USE_DP4A)
            acc3 = _q6k_row_step(acc3, src3, xw, xs, ok, c, g, t, ql_ptr, qh_ptr, sc_ptr, d_ptr, stride_ql,
                                 stride_qh, stride_sc, stride_d, WIDE, USE_DP4A)
    _store_row_tiles(_sum_tile(acc0), _sum_tile(acc1), _sum_tile(acc2), _sum_tile(acc3), first, batch,
                     out_ptr, bias_ptr, stride_ob, n_rows, BLOCK_N, ROWS, HAS_BIAS, ACCUMULATE)


@triton.jit
def _word_sums(q, x, A_BYTES: tl.constexpr, WIDE: tl.constexpr, USE_DP4A: tl.constexpr):
    """sum over the last axis (4 words) of q . x, q's bytes read as A_BYTES says, x the activation words (int64
    words of 16-bit quants when WIDE): f32 [..., 1], exact."""
    if WIDE:
        coarse, fine = _byte_planes(x)
        total = (tl.sum(_dot4(q, coarse, USE_DP4A, A_BYTES), axis=3, keep_dims=True).to(tl.float32) * 256.0
                 + tl.sum(_dot4(q, fine, USE_DP4A, A_BYTES), axis=3, keep_dims=True).to(tl.float32))
    else:  # (not code after a return: see _kquant_chunk_sums)
        total = tl.sum(_dot4(q, x, USE_DP4A, A_BYTES), axis=3, keep_dims=True).to(tl.float32)
    return total


@triton.jit
def _q80_row_step(acc, src, xq, xs, ok, c, t, qs_ptr, d_ptr, stride_qw, stride_d, WIDE: tl.constexpr,
                  USE_DP4A: tl.constexpr):
    """acc [BLOCK_N, C, 2, 1] plus one step's products of rows `src` ([BLOCK_N]) of a Q8_0 matrix, against the
    activation words `xq` and scales `xs`, already loaded (shared by every row a thread holds)."""
    src = src[:, None, None, None]  # [BLOCK_N, 1, 1, 1]
    w = tl.load(qs_ptr + src * stride_qw + 8 * c + t)  # [BLOCK_N, C, 2, 4]
    dot = _word_sums(w, xq, _S8, WIDE, USE_DP4A)  # [BLOCK_N, C, 2, 1]
    d = tl.load(d_ptr + src * stride_d + c, mask=ok, other=0.0).to(tl.float32)  # [BLOCK_N, C, 1, 1]
    return acc + (d * xs) * dot


@triton.jit
def _q80_matvec_q8_kernel(
    xq_ptr, xs_ptr, out_ptr, bias_ptr, qs_ptr, d_ptr,
    stride_qw, stride_d, stride_xw, stride_xs, stride_ob, n_rows, n_chunks, n_batch, n_steps,
    C: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
    WIDE: tl.constexpr, USE_DP4A: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr,
):
    batch, first = _program_rows(n_batch, BLOCK_N, ROWS)
    if PREFETCH:  # before the PDL wait (row_tiles._prefetch_rows_l2)
        if batch == 0:
            _prefetch_rows_l2(qs_ptr, first, n_rows, stride_qw, BLOCK_N * ROWS)
    _pdl_wait(USE_PDL)
    # qs and xq are read as int32 words. Chunk c is block c (32 weights, one scale d): qs words 8c + t times xq
    # words 8c + t. The tile [BLOCK_N, C, 2, 4] splits t = 4g + k and sums over k as integers first. ROWS tiles
    # of BLOCK_N rows a program share the activation loads, as in the Q4_K kernel.
    src0, src1, src2, src3 = _tile_sources(first, n_rows, BLOCK_N)
    zero = 0 * src0[:, None, None, None]  # [BLOCK_N, 1, 1, 1]
    t = 4 * tl.arange(0, 2)[None, None, :, None] + tl.arange(0, 4)[None, None, None, :]  # [1, 1, 2, 4]
    xrow = batch.to(tl.int64) * stride_xw
    srow = batch.to(tl.int64) * stride_xs
    # Reduced over chunks and halves after the loop; the accumulators of tiles past ROWS stay unused.
    acc0 = tl.zeros([BLOCK_N, C, 2, 1], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, C, 2, 1], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, C, 2, 1], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, C, 2, 1], dtype=tl.float32)
    for step in range(n_steps):
        c = (step * C + tl.arange(0, C))[None, :, None, None]  # [1, C, 1, 1]
        # Chunks past the row's end read the last chunk (no masked loads, no zero fills) and get d = 0.
        ok = c < n_chunks
        c = tl.minimum(c, n_chunks - 1)
        xq = tl.load(xq_ptr + xrow + 8 * c + t + zero)  # at the tile's full shape
        xs = tl.load(xs_ptr + srow + c + zero)  # [BLOCK_N, C, 1, 1]
        acc0 = _q80_row_step(acc0, src0, xq, xs, ok, c, t, qs_ptr, d_ptr, stride_qw, stride_d, WIDE, USE_DP4A)
        if ROWS > 1:
            acc1 = _q80_row_step(acc1, src1, xq, xs, ok, c, t, qs_ptr, d_ptr, stride_qw, stride_d, WIDE, USE_DP4A)
        if ROWS > 2:
            acc2 = _q80_row_step(acc2, src2, xq, xs, ok, c, t, qs_ptr, d_ptr, stride_qw, stride_d, WIDE, USE_DP4A)
            acc3 = _q80_row_step(acc3, src3, xq, xs, ok, c, t, qs_ptr, d_ptr, stride_qw, stride_d, WIDE, USE_DP4A)
    _store_row_tiles(_sum_tile(acc0), _sum_tile(acc1), _sum_tile(acc2), _sum_tile(acc3), first, batch,
                     out_ptr, bias_ptr, stride_ob, n_rows, BLOCK_N, ROWS, HAS_BIAS, ACCUMULATE)


def _launch_q4(grid, xq: QuantizedActivations, xq_words: torch.Tensor, w: QuantWeight, out: torch.Tensor,
               bias: torch.Tensor, n_chunks: int, n_steps: int, meta: dict) -> None:
    """Q4_0 and Q4_1 (which adds mins)."""
    qs_words = w.qs.view(torch.int32)  # [n_rows, K / 8]
    mins = w.mins if w.mins is not None else w.scales  # unread for Q4_0
    _q4_matvec_q8_kernel[grid](
        xq_words, xq.scale, xq.block_sum, out, bias, qs_words, w.scales, mins, qs_words.stride(0),
        w.scales.stride(0), xq_words.stride(0), xq.scale.stride(0), out.stride(0), w.n_rows, n_chunks,
        out.shape[0], n_steps, HAS_MIN=w.mins is not None, **meta)


def _launch_kquant(grid, xq: QuantizedActivations, xq_words: torch.Tensor, w: QuantWeight, out: torch.Tensor,
                   bias: torch.Tensor, n_chunks: int, n_steps: int, meta: dict) -> None:
    """Q4_K and Q5_K (which adds qh, the 5th bits)."""
    qs_words = w.qs.view(torch.int32)  # [n_rows, K / 8]
    qh_words = w.qh.view(torch.int32) if w.qh is not None else qs_words  # [n_rows, K / 32]; unread for Q4_K
    _kquant_matvec_q8_kernel[grid](
        xq_words, xq.scale, xq.block_sum, out, bias, qs_words, qh_words, w.scales, w.scales_hi, w.d, w.dmin,
        qs_words.stride(0), qh_words.stride(0), w.scales.stride(0), w.d.stride(0), xq_words.stride(0),
        xq.scale.stride(0), out.stride(0), w.n_rows, n_chunks, out.shape[0], n_steps, HAS_QH=w.qh is not None,
        **meta)


def _launch_q6k(grid, xq: QuantizedActivations, xq_words: torch.Tensor, w: QuantWeight, out: torch.Tensor,
                bias: torch.Tensor, n_chunks: int, n_steps: int, meta: dict) -> None:
    ql_words = w.qs.view(torch.int32)  # [n_rows, K / 8]
    qh_words = w.qh.view(torch.int32)  # [n_rows, K / 16]
    _q6k_matvec_q8_kernel[grid](
        xq_words, xq.scale, out, bias, ql_words, qh_words, w.scales, w.d,
        ql_words.stride(0), qh_words.stride(0), w.scales.stride(0), w.d.stride(0), xq_words.stride(0),
        xq.scale.stride(0), out.stride(0), w.n_rows, n_chunks, out.shape[0], n_steps, **meta)


def _launch_q80(grid, xq: QuantizedActivations, xq_words: torch.Tensor, w: QuantWeight, out: torch.Tensor,
                bias: torch.Tensor, n_chunks: int, n_steps: int, meta: dict) -> None:
    qs_words = w.qs.view(torch.int32)  # [n_rows, K / 4]
    _q80_matvec_q8_kernel[grid](
        xq_words, xq.scale, out, bias, qs_words, w.scales, qs_words.stride(0), w.scales.stride(0),
        xq_words.stride(0), xq.scale.stride(0), out.stride(0), w.n_rows, n_chunks, out.shape[0], n_steps, **meta)


# type -> (launcher, weights per chunk).
_KERNELS = {T.Q4_0: (_launch_q4, 32), T.Q4_1: (_launch_q4, 32), T.Q4_K: (_launch_kquant, 64),
            T.Q5_K: (_launch_kquant, 64), T.Q6_K: (_launch_q6k, 128), T.Q8_0: (_launch_q80, 32)}
# The types whose kernel takes ROWS (row tiles a program, sharing each thread's activation loads), and the
# values it takes.
ROW_TILE_TYPES: frozenset[GGMLQuantizationType] = frozenset({T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0})
ROW_TILES = (1, 2, 4)
DEFAULT_ROWS = 1
# Default launch shape, measured on an H200 (benchmarks/results/2026-12-01-h200-f/sweep_gemv.json: random
# weights at the 7B shapes, nothing served from L2): 2 rows a program, 32 chunks a step and 2 warps, against the
# earlier 4 rows and 4 warps: Q4_K 3.04 vs 2.75 TB/s at 22016 x 4096 and 2.36 vs 2.24 at 4096 x 11008, Q8_0 2.72
# vs 2.67, Q6_K 2.37 vs 2.39. Fewer rows a program give more programs to spread over the SMs and keep more
# loads in flight per thread.
DEFAULT_BLOCK_N = 2
INTERPRETER_BLOCK_N = 32  # the CPU tests' default: same results, a sixteenth of the programs to interpret
DEFAULT_CHUNKS = 32
DEFAULT_NUM_WARPS = 2
SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_KERNELS)


def quant_matvec_q8(xq: QuantizedActivations, w: QuantWeight, out: torch.Tensor, bias: torch.Tensor | None = None,
                    accumulate: bool = False, block_n: int | None = None, chunks: int = DEFAULT_CHUNKS,
                    num_warps: int = DEFAULT_NUM_WARPS, num_stages: int = 1, pdl: bool = False,
                    rows: int | None = None, prefetch: bool = False) -> torch.Tensor:
    """out (+)= x @ W^T (+ bias) for a weight of one of SUPPORTED_TYPES (Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0) and
    activations quantized by `quantize_activations`.

    out [B, n_rows] f32 (unit column stride); one launch, no host sync, graph-capturable. Launch shape: `block_n`
    rows a program (None: DEFAULT_BLOCK_N, INTERPRETER_BLOCK_N under Triton's interpreter), `chunks` chunks a step
    (a chunk is 32, 64 or 128 weights by type, see the module docstring), both powers of two; `rows` tiles of
    block_n rows a program for the types of ROW_TILE_TYPES (1, 2 or 4; None: DEFAULT_ROWS there, 1 elsewhere),
    each thread holding the same chunk of every tile; `num_warps`, `num_stages` as for any Triton launch. With
    `pdl` and `prefetch`, each program asks L2 for its weight rows before its PDL wait (no effect on the result;
    nothing under the interpreter)."""
    if not isinstance(w, QuantWeight) or w.ggml_type not in SUPPORTED_TYPES:
        got = w.ggml_type.name if isinstance(w, QuantWeight) else type(w).__name__
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise UnsupportedError(f"quant_matvec_q8 supports {supported} weights, got {got}")
    launch, chunk_weights = _KERNELS[w.ggml_type]
    interpreted = under_interpreter()
    if block_n is None:  # the interpreter runs programs one by one at a cost each: few large ones there
        block_n = INTERPRETER_BLOCK_N if interpreted else DEFAULT_BLOCK_N
    for name, value in (("block_n", block_n), ("chunks", chunks)):
        if not isinstance(value, int) or value < 1 or value & (value - 1):
            raise ValueError(f"quant_matvec_q8: {name} must be a power of two, got {value!r}")
    if rows is None:
        rows = DEFAULT_ROWS if w.ggml_type in ROW_TILE_TYPES else 1
    if rows not in ROW_TILES or (rows != 1 and w.ggml_type not in ROW_TILE_TYPES):
        allowed = ROW_TILES if w.ggml_type in ROW_TILE_TYPES else (1,)
        raise ValueError(f"quant_matvec_q8: rows must be one of {allowed} for {w.ggml_type.name}, got {rows!r}")
    batch = xq.q.shape[0]
    if xq.q.dtype not in (torch.int8, torch.int16):
        raise ValueError(f"quant_matvec_q8: xq.q must be int8 or int16 (16-bit quants), got {xq.q.dtype}")
    check_tensor("xq.q", xq.q, xq.q.dtype, (None, w.n_cols))
    check_tensor("xq.scale", xq.scale, torch.float32, (batch, w.n_cols // ACTIVATION_BLOCK))
    check_tensor("xq.block_sum", xq.block_sum, torch.float32, (batch, w.n_cols // ACTIVATION_BLOCK))
    check_tensor("out", out, torch.float32, (batch, w.n_rows), layout="rows")
    if bias is not None:
        check_tensor("bias", bias, torch.float32, (w.n_rows,))
    check_same_device(xq=xq.q, xq_scale=xq.scale, out=out, weight=w.qs)
    n_chunks = w.n_cols // chunk_weights
    meta = dict(C=chunks, BLOCK_N=block_n, HAS_BIAS=bias is not None, ACCUMULATE=accumulate, WIDE=xq.wide,
                USE_DP4A=not interpreted, PREFETCH=prefetch and pdl and not interpreted, num_warps=num_warps,
                num_stages=num_stages, **launch_options(pdl))
    # Activation words of 4 quants each: int32 for int8 quants, int64 for 16-bit ones (same indexing).
    words = xq.q.view(torch.int64 if xq.wide else torch.int32)
    if w.ggml_type in ROW_TILE_TYPES:
        meta["ROWS"] = rows
    launch((triton.cdiv(w.n_rows, block_n * rows) * batch,), xq, words, w, out,
           bias if bias is not None else out, n_chunks, triton.cdiv(n_chunks, chunks), meta)
    return out


def quant_matvec_q8_reference(xq: QuantizedActivations, w: QuantWeight) -> torch.Tensor:
    """What quant_matvec_q8 computes, in float64: the GGUF dequantized weights (`dequantize_reference`: exact
    for Q4_0 and Q8_0, rounded once to f32 for the others as GGUF does) times the quantized activations; for the
    types with a min (Q4_1, Q4_K, Q5_K) the min term is taken on the exact block sums. [B, n_rows]."""
    from .quant_weight import dequantize_reference, kquant_scales_mins

    if w.ggml_type not in SUPPORTED_TYPES:
        raise UnsupportedError(f"quant_matvec_q8_reference: no kernel for {w.ggml_type.name}")
    B, K = xq.q.shape
    x_blocks = wide_values(xq.q).double().view(B, -1, ACTIVATION_BLOCK) * xq.scale.double()[..., None]
    if w.ggml_type == T.Q4_1:
        offset = w.mins.double()  # [N, K/32]: weight = q d + m
    elif w.ggml_type in (T.Q4_K, T.Q5_K):
        offset = -w.dmin.double().repeat_interleave(8, dim=1) * kquant_scales_mins(w)[1].double()  # q d sc - dmin m
    else:
        return x_blocks.view(B, K) @ dequantize_reference(w).double().T
    # Split each weight into its scaled quant and its per-block offset, to apply the offset to the exact sums.
    scaled = dequantize_reference(w).double().view(w.n_rows, -1, ACTIVATION_BLOCK) - offset[..., None]
    dots = torch.einsum("nbi,zbi->zn", scaled, x_blocks)
    return dots + xq.block_sum.double() @ offset.T
