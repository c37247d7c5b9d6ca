"""Decode GEMV for F16 and BF16 weights against f32 activations, with row tiles: out (+)= x @ W^T (+ bias).

The general GEMV (quant_matvec) decodes every type through one [groups, rows, width] tile, in which the
activations are loaded at another shape than the weights and broadcast; for 16-bit weights, which need no
decoding, that costs more than the multiply. Here a row's weights are read in chunks of 8 (16 bytes), as a tile
[BLOCK_N, C, 2, 4] whose last axis is 4 contiguous values, so that the f16 weights (8-byte loads) and the f32
activations (16-byte loads) get the same layout: nothing is converted between layouts, and the product is one
FMA a weight, accumulated in f32. As in the integer-dot kernels (quant_matvec_q8), a program has ROWS tiles of
BLOCK_N rows and each thread holds the same chunk of every tile, so one load of activations serves ROWS rows.

The sums run in another order than quant_matvec's: the results agree to f32 rounding, not bit for bit.
"""

from __future__ import annotations


import triton
import triton.language as tl
import torch
from gguf import GGMLQuantizationType

from ..errors import UnsupportedError
from ._tensor_checks import check_powers_of_two, check_same_device, check_tensor, under_interpreter
from .pdl import _pdl_wait, launch_options
from .quant_weight import QuantWeight
from .row_tiles import _prefetch_rows_l2, _program_rows, _store_row_tiles, _sum_tile, _tile_sources

T = GGMLQuantizationType
SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset({T.F16, T.BF16})
CHUNK = 8  # weights of a row per chunk: one 16-byte run of f16 / bf16
ROW_TILES = (1, 2, 4)
DEFAULT_BLOCK_N = 1
DEFAULT_CHUNKS = 64
DEFAULT_NUM_WARPS = 2
DEFAULT_ROWS = 4
INTERPRETER_BLOCK_N = 8  # the CPU tests' default: the same results, fewer programs to interpret
CHUNK_W: tl.constexpr = tl.constexpr(CHUNK)


@triton.jit
def _float_row_step(acc, src, x, c, t, w_ptr, stride_w):
    """acc [BLOCK_N, C, 2, 4] plus one step's products of rows `src` ([BLOCK_N]) with the activations x (loaded
    once for every tile, zero past the row's end)."""
    w = tl.load(w_ptr + src[:, None, None, None] * stride_w + CHUNK_W * c + t).to(tl.float32)
    return acc + w * x


@triton.jit
def _float_matvec_kernel(
    x_ptr, out_ptr, bias_ptr, w_ptr, stride_w, stride_xb, stride_ob, n_rows, n_chunks, n_batch, n_steps,
    C: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACCUMULATE: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr,
):
    batch, first = _program_rows(n_batch, BLOCK_N, ROWS)
    if PREFETCH:  # before the PDL wait (row_tiles._prefetch_rows_l2); batch row 0's programs, once a weight row
        if batch == 0:
            _prefetch_rows_l2(w_ptr, first, n_rows, stride_w, BLOCK_N * ROWS)
    _pdl_wait(USE_PDL)
    # Chunk c of a row is weights 8c + t, t = 4g + k (g < 2, k < 4), times activations 8c + t.
    src0, src1, src2, src3 = _tile_sources(first, n_rows, BLOCK_N)
    zero = 0 * src0[:, None, None, None]  # [BLOCK_N, 1, 1, 1]: the activations at the tile's full shape
    t = 4 * tl.arange(0, 2)[None, None, :, None] + tl.arange(0, 4)[None, None, None, :]  # [1, 1, 2, 4]
    xrow = x_ptr + batch.to(tl.int64) * stride_xb
    # Reduced once, after the loop; the accumulators of tiles past ROWS stay unused.
    acc0 = tl.zeros([BLOCK_N, C, 2, 4], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, C, 2, 4], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, C, 2, 4], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, C, 2, 4], dtype=tl.float32)
    for step in range(n_steps):
        c = (step * C + tl.arange(0, C))[None, :, None, None]  # [1, C, 1, 1]
        # Chunks past the row's end re-read the last chunk (no masked loads) against activations of zero.
        ok = c < n_chunks
        c = tl.minimum(c, n_chunks - 1)
        x = tl.where(ok, tl.load(xrow + CHUNK_W * c + t + zero), 0.0)
        acc0 = _float_row_step(acc0, src0, x, c, t, w_ptr, stride_w)
        if ROWS > 1:
            acc1 = _float_row_step(acc1, src1, x, c, t, w_ptr, stride_w)
        if ROWS > 2:
            acc2 = _float_row_step(acc2, src2, x, c, t, w_ptr, stride_w)
            acc3 = _float_row_step(acc3, src3, x, c, t, w_ptr, stride_w)
    _store_row_tiles(_sum_tile(acc0), _sum_tile(acc1), _sum_tile(acc2), _sum_tile(acc3), first, batch,
                     out_ptr, bias_ptr, stride_ob, n_rows, BLOCK_N, ROWS, HAS_BIAS, ACCUMULATE)


def supports(w: QuantWeight) -> bool:
    """Whether float_matvec takes `w`: F16 / BF16, rows of whole chunks (8 values) at a 16-byte-aligned stride."""
    return (isinstance(w, QuantWeight) and w.ggml_type in SUPPORTED_TYPES and w.n_cols % CHUNK == 0
            and w.qs.stride(-1) == 1 and w.qs.stride(0) % CHUNK == 0)


def float_matvec(x: torch.Tensor, w: QuantWeight, out: torch.Tensor, bias: torch.Tensor | None = None,
                 accumulate: bool = False, block_n: int | None = None, chunks: int = DEFAULT_CHUNKS,
                 num_warps: int = DEFAULT_NUM_WARPS, rows: int = DEFAULT_ROWS, pdl: bool = False,
                 prefetch: bool = False) -> torch.Tensor:
    """out (+)= x @ W^T (+ bias) for an F16 / BF16 weight (`supports`) and f32 activations x [B, n_cols].

    out [B, n_rows] f32 (unit column stride, any row stride); one launch, no host sync, graph-capturable. Launch
    shape: `block_n` rows a tile (None: DEFAULT_BLOCK_N, INTERPRETER_BLOCK_N under Triton's interpreter), `rows`
    tiles a program (1, 2 or 4), `chunks` chunks of 8 weights a step (a power of two), `num_warps`. With `pdl`
    and `prefetch`, each program asks L2 for its weight rows before its PDL wait (no effect on the result)."""
    if not supports(w):
        got = w.ggml_type.name if isinstance(w, QuantWeight) else type(w).__name__
        raise UnsupportedError(f"float_matvec takes F16 / BF16 weights with a multiple of {CHUNK} columns, got {got}"
                               + (f" with {w.n_cols} columns" if isinstance(w, QuantWeight) else ""))
    interpreted = under_interpreter()
    if block_n is None:
        block_n = INTERPRETER_BLOCK_N if interpreted else DEFAULT_BLOCK_N
    check_powers_of_two("float_matvec", block_n=block_n, chunks=chunks)
    if rows not in ROW_TILES:
        raise ValueError(f"float_matvec: rows must be one of {ROW_TILES}, got {rows!r}")
    batch = x.shape[0] if x.dim() == 2 else 0
    check_tensor("x", x, torch.float32, (None, w.n_cols), layout="rows")
    check_tensor("out", out, torch.float32, (batch, w.n_rows), layout="rows")
    if bias is not None:
        check_tensor("bias", bias, torch.float32, (w.n_rows,))
    check_same_device(x=x, out=out, weight=w.qs)
    n_chunks = w.n_cols // CHUNK
    grid = (triton.cdiv(w.n_rows, block_n * rows) * batch,)
    _float_matvec_kernel[grid](
        x, out, bias if bias is not None else out, w.qs, w.qs.stride(0), x.stride(0), out.stride(0), w.n_rows,
        n_chunks, batch, triton.cdiv(n_chunks, chunks), C=chunks, BLOCK_N=block_n, ROWS=rows,
        HAS_BIAS=bias is not None, ACCUMULATE=accumulate, PREFETCH=prefetch and pdl and not interpreted,
        num_warps=num_warps, **launch_options(pdl))
    return out
