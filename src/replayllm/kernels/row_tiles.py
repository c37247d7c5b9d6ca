"""Row-tile bookkeeping shared by the decode GEMVs (quant_matvec_q8, float_matvec).

A program owns ROWS tiles of BLOCK_N rows (ROWS = 1, 2 or 4); each thread holds the same chunk of every tile,
so what it loads of the activations serves all of them. Triton keeps loop-carried values as named tensors, so
the kernels carry four accumulators and tiles past ROWS stay unused (compiled away); these helpers give the
tiles' rows and store their results.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _program_rows(n_batch, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    """(batch row, first weight row) of this program. Batch rows vary fastest in launch order, so the programs
    sharing a weight block run side by side."""
    return tl.program_id(0) % n_batch, (tl.program_id(0) // n_batch) * (BLOCK_N * ROWS)


@triton.jit
def _tile_sources(first, n_rows, BLOCK_N: tl.constexpr):
    """The rows each of the 4 tiles reads ([BLOCK_N] int64 each): past n_rows, the last row again (no masked
    loads; those results are never stored)."""
    rows = first + tl.arange(0, BLOCK_N)
    return (tl.minimum(rows, n_rows - 1).to(tl.int64), tl.minimum(rows + BLOCK_N, n_rows - 1).to(tl.int64),
            tl.minimum(rows + 2 * BLOCK_N, n_rows - 1).to(tl.int64),
            tl.minimum(rows + 3 * BLOCK_N, n_rows - 1).to(tl.int64))


@triton.jit
def _store_rows(result, rows, batch, out_ptr, bias_ptr, stride_ob, n_rows, HAS_BIAS: tl.constexpr,
                ACCUMULATE: tl.constexpr):
    """out[batch, rows] (+)= result [BLOCK_N] (+ bias[rows]), rows past n_rows masked off."""
    row_ok = rows < n_rows
    o = out_ptr + batch.to(tl.int64) * stride_ob + rows
    if HAS_BIAS:
        result += tl.load(bias_ptr + rows, mask=row_ok, other=0.0)
    if ACCUMULATE:
        result += tl.load(o, mask=row_ok, other=0.0)
    tl.store(o, result, mask=row_ok)


@triton.jit
def _store_row_tiles(sums0, sums1, sums2, sums3, first, batch, out_ptr, bias_ptr, stride_ob, n_rows,
                     BLOCK_N: tl.constexpr, ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr):
    """_store_rows for each of the program's ROWS tiles: tile r's row sums sums_r [BLOCK_N] go to rows
    first + r BLOCK_N ...; the sums of tiles past ROWS are ignored."""
    rows = first + tl.arange(0, BLOCK_N)
    _store_rows(sums0, rows, batch, out_ptr, bias_ptr, stride_ob, n_rows, HAS_BIAS, ACCUMULATE)
    if ROWS > 1:
        _store_rows(sums1, rows + BLOCK_N, batch, out_ptr, bias_ptr, stride_ob, n_rows, HAS_BIAS, ACCUMULATE)
    if ROWS > 2:
        _store_rows(sums2, rows + 2 * BLOCK_N, batch, out_ptr, bias_ptr, stride_ob, n_rows, HAS_BIAS, ACCUMULATE)
        _store_rows(sums3, rows + 3 * BLOCK_N, batch, out_ptr, bias_ptr, stride_ob, n_rows, HAS_BIAS, ACCUMULATE)


@triton.jit
def _sum_tile(acc):
    """[BLOCK_N, C, A, B] -> [BLOCK_N]: the row sums of a 4-axis accumulator."""
    return tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)


PREFETCH_LINES: tl.constexpr = tl.constexpr(128)  # 128-byte lines asked for per pass: one a thread at 4 warps


@triton.jit
def _prefetch_rows_l2(ptr, first, n_rows, row_stride, PROGRAM_ROWS: tl.constexpr):
    """Ask L2 for rows first .. first + PROGRAM_ROWS - 1 (clipped to n_rows) of the row-major tensor at ptr (rows
    row_stride elements apart, stored back to back): one `prefetch.global.L2` a 128-byte line, nothing waited
    for, no register kept. A GEMV launched early by PDL calls it before its wait: no kernel of the step writes
    weights, so reading them early is safe, and the DRAM reads of the program's first rows overlap the tail of
    the kernel before instead of starting after it."""
    ELEM: tl.constexpr = ptr.dtype.element_ty.primitive_bitwidth // 8
    base = ptr.to(tl.pointer_type(tl.int8)) + first.to(tl.int64) * row_stride * ELEM
    n_bytes = tl.minimum(n_rows - first, PROGRAM_ROWS) * row_stride * ELEM
    lines = tl.arange(0, PREFETCH_LINES) * 128
    for start in range(0, n_bytes, PREFETCH_LINES * 128):
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l",
                                  [base + tl.minimum(start + lines, n_bytes - 1)], dtype=tl.int32, is_pure=False,
                                  pack=1)
