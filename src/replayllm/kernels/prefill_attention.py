"""Causal (flash) attention for one prefill chunk of one sequence, reading K and V from the paged KV cache.

The chunk's queries are positions start .. start+T-1; the rope kernel has already written their keys and
values, so query t attends to cached keys 0 .. start+t (a later chunk sees everything cached before it).
Program (m_block, q_head) holds a BLOCK_M tile of queries and walks the keys in BLOCK_N tiles with an online
softmax in f32. Keys are gathered token by token (page = page_table_row[pos // page_size], slot
pos % page_size), so any page size works with any BLOCK_N. The walk stops at the block's last query
(causal: tiles past it are fully masked and skipped), and only the tiles that straddle the diagonal pay for
the causal mask; keys at or past start+T are never loaded (masked loads), so stale or unwritten slots of the
last page cannot leak in, whatever they hold.

Scores are kept in log2 units: q is multiplied by scale * log2(e) once, so the kernel exponentiates with exp2.

Precision: both products run on f16 tensor cores with f32 accumulation; q (scaled) and the probabilities p
are rounded to f16 (K and V are f16 already). That costs ~5e-4 relative per element; on random data the
output is off by 2e-4..3e-4 of its largest magnitude (measured up to 4096 keys; the tests allow 5e-3).
Prefill is compute-bound, so the hi/lo split that keeps decode attention at f32 accuracy would cost twice the
tensor-core work here.
q * scale * log2(e) must stay below 65504 in magnitude, the f16 range.

An int8 cache (kv_cache.py: one f32 scale per (token, kv head) row) runs the same f16 products on its quants,
converted exactly (|q| <= 127). A key's scale multiplies its column of scores (f32, after the product). A
value's scale, divided by the tile's largest, multiplies its column of probabilities before they are rounded
to f16 for the P @ V product, and the tile's largest multiplies that product: the weights stay in the
probabilities' range, where p * scale itself would fall below f16's normal range (6e-5) for small values
(1.4e-2 off at scales of 2e-5 over 2048 keys, against 2.6e-4 so). The softmax sum takes the probabilities
themselves. Against a reference that dequantizes the cache the error is that of the f16 path.

A q4 cache (kv_cache.py: nibbles, one f32 scale per block of 32 dims) is unpacked a tile at a time into its two
halves, dims j (low nibbles) and j + Dh/2 (high nibbles) of byte j, and each product runs as two half-width
products over q's matching halves (the output too is written in halves). A block's scale varies along the
products' reduction dim, so unlike the int8 row scale it cannot be applied outside them: each element is
nibble * scale / (the tile's largest scale, one for K and one for V), within 7 of zero, rounded to f16, and the
tile's largest scale multiplies the f32 product. That rounding costs what an f16 cache's own does, ~5e-4 relative,
at any magnitude of the cache, where f16 of nibble * scale itself would overflow past 65504 and lose bits below
6e-5 (1.6e-2 off at values of 1e-6). Against a reference that dequantizes the cache the output is off by
3e-4..6e-4 of its largest magnitude on random data (up to 2048 keys; the f16 path 3e-4..4e-4; the tests allow
5e-3). Exact nibbles would need a product per block of 32 dims, each scaled apart: Dh/32 f32 passes over the
score tile and Dh/32 scaled copies of the probabilities, for at most a halving of an error already 10x inside
the tolerance.

The chunk's span (start, number of real queries) is either two host integers or an int32 [2] tensor read on
the device. The second lets one CUDA graph serve every chunk up to its size (runner/prefill_graph): q has as
many rows as the graph's bucket, rows past the span's count are padding, never written, and their query blocks
load no key.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._tensor_checks import check_same_device, check_tensor, next_power_of_2
from .kv_cache import check_cache_pair, gather_paged_cache_reference, kv_cache_type, scale_launch_args

DEFAULT_BLOCK_M = 64
DEFAULT_BLOCK_N = 64
DEFAULT_NUM_WARPS = 4
MIN_BLOCK = 16  # tl.dot needs tiles of at least 16 rows and columns
MAX_BLOCK = 256
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256  # head dims below 16 or not a power of two are padded to one


@triton.jit
def _attend_tile(q, acc, running_max, running_sum, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                 page_table_ptr, tile_start, kv_len, kv_head, query_pos, dims,
                 NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL_MASK: tl.constexpr, KV_INT8: tl.constexpr):
    # q: [BLOCK_M, BLOCK_D] f16, pre-scaled; acc: [BLOCK_M, BLOCK_D] f32; running_*: [BLOCK_M] f32
    # BLOCK_D > HEAD_DIM pads a head dim that is not a power of two with zeros (masked loads).
    # CAUSAL_MASK False: the caller guarantees every key of the tile is <= every query position (and < kv_len).
    # KV_INT8: k, v are int8 quants, each token row's scale at the row's index in k_scale, v_scale.
    keys = tile_start + tl.arange(0, BLOCK_N)  # [BLOCK_N] positions
    if CAUSAL_MASK:
        key_mask = keys < kv_len
        pages = tl.load(page_table_ptr + keys // PAGE_SIZE, mask=key_mask, other=0).to(tl.int64)
    else:
        pages = tl.load(page_table_ptr + keys // PAGE_SIZE).to(tl.int64)
    cache_rows = (pages * NUM_KV_HEADS + kv_head) * PAGE_SIZE + keys % PAGE_SIZE  # [BLOCK_N] the scales' index
    token_rows = cache_rows * HEAD_DIM
    kv_offsets = token_rows[:, None] + dims[None, :]  # [BLOCK_N, BLOCK_D]
    if CAUSAL_MASK:
        kv_mask = key_mask[:, None] & (dims < HEAD_DIM)[None, :]
        k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
    elif BLOCK_D != HEAD_DIM:
        k = tl.load(k_cache_ptr + kv_offsets, mask=(dims < HEAD_DIM)[None, :], other=0.0)
        v = tl.load(v_cache_ptr + kv_offsets, mask=(dims < HEAD_DIM)[None, :], other=0.0)
    else:
        k = tl.load(k_cache_ptr + kv_offsets)
        v = tl.load(v_cache_ptr + kv_offsets)
    if KV_INT8:
        # keys past kv_len get scale 0 (their quants load as 0 too): finite, and masked below
        if CAUSAL_MASK:
            k_scale = tl.load(k_scale_ptr + cache_rows, mask=key_mask, other=0.0)  # [BLOCK_N] f32
            v_scale = tl.load(v_scale_ptr + cache_rows, mask=key_mask, other=0.0)
        else:
            k_scale = tl.load(k_scale_ptr + cache_rows)
            v_scale = tl.load(v_scale_ptr + cache_rows)
        scores = tl.dot(q, tl.trans(k.to(tl.float16))) * k_scale[None, :]  # [BLOCK_M, BLOCK_N] f32, log2 units
    else:
        scores = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N] f32, log2 units
    if CAUSAL_MASK:
        # keys >= kv_len are above every real query's position, so this masks them too
        scores = tl.where(keys[None, :] <= query_pos[:, None], scores, float("-inf"))
    # each real query sees key 0 in the first tile, so running_max is finite from then on and a fully masked
    # row of a later tile contributes exp2(-inf) = 0
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    correction = tl.exp2(running_max - new_max)  # exp2(-inf) = 0 on the first tile
    probs = tl.exp2(scores - new_max[:, None])
    running_sum = running_sum * correction + tl.sum(probs, axis=1)
    if KV_INT8:
        # each value's scale relative to the tile's largest, so that the f16 weights keep the probabilities' range
        # (see the module docstring)
        v_scale_max = tl.maximum(tl.max(v_scale, axis=0), 1e-30)
        weights = probs * (v_scale * (1.0 / v_scale_max))[None, :]  # [BLOCK_M, BLOCK_N]
        acc = acc * correction[:, None] + tl.dot(weights.to(tl.float16), v.to(tl.float16)) * v_scale_max
    else:
        acc = acc * correction[:, None] + tl.dot(probs.to(tl.float16), v)
    return acc, new_max, running_sum


@triton.jit
def _load_q4_tile(cache_ptr, scale_ptr, cache_rows, dims, key_mask, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  CAUSAL_MASK: tl.constexpr):
    # The two halves of a tile of q4 rows, dims j and j + HEAD_DIM // 2 for j in dims, as nibble * scale of its
    # block / tile_max, rounded to f16 ([BLOCK_N, BLOCK_D] each), and tile_max, the tile's largest scale (f32
    # scalar, at least 1e-30): the products' operands are within 7 of zero whatever the cache's magnitudes, and
    # tile_max scales the products back in f32 (see the module docstring).
    # Masked keys and padded dims load byte 0 (nibble -8) with scale 0: value 0.
    byte_offsets = cache_rows[:, None] * (HEAD_DIM // 2) + dims[None, :]  # [BLOCK_N, BLOCK_D]
    scale_offsets = cache_rows[:, None] * (HEAD_DIM // 32) + dims[None, :] // 32  # the low half's blocks
    # dim j + HEAD_DIM // 2 is in block j // 32 + HEAD_DIM // 64 (each half is a whole number of blocks)
    if CAUSAL_MASK or BLOCK_D != HEAD_DIM // 2:
        mask = key_mask[:, None] & (dims < HEAD_DIM // 2)[None, :]  # key_mask is all true without CAUSAL_MASK
        packed = tl.load(cache_ptr + byte_offsets, mask=mask, other=0)
        scale_lo = tl.load(scale_ptr + scale_offsets, mask=mask, other=0.0)
        scale_hi = tl.load(scale_ptr + scale_offsets + HEAD_DIM // 64, mask=mask, other=0.0)
    else:
        packed = tl.load(cache_ptr + byte_offsets)
        scale_lo = tl.load(scale_ptr + scale_offsets)
        scale_hi = tl.load(scale_ptr + scale_offsets + HEAD_DIM // 64)
    tile_max = tl.maximum(tl.max(tl.maximum(tl.max(scale_lo, axis=1), tl.max(scale_hi, axis=1)), axis=0), 1e-30)
    lo = ((packed & 15).to(tl.float32) - 8.0) * scale_lo * (1.0 / tile_max)
    hi = ((packed >> 4).to(tl.float32) - 8.0) * scale_hi * (1.0 / tile_max)
    return lo.to(tl.float16), hi.to(tl.float16), tile_max


@triton.jit
def _attend_tile_q4(q_lo, q_hi, acc_lo, acc_hi, running_max, running_sum, k_cache_ptr, v_cache_ptr, k_scale_ptr,
                    v_scale_ptr, page_table_ptr, tile_start, kv_len, kv_head, query_pos, dims,
                    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL_MASK: tl.constexpr):
    # _attend_tile over a q4 cache, the head split in halves: q_lo, q_hi [BLOCK_M, BLOCK_D] f16, pre-scaled, dims
    # j and j + HEAD_DIM // 2 for j in dims (BLOCK_D > HEAD_DIM // 2 pads them); acc_lo, acc_hi likewise, f32.
    keys = tile_start + tl.arange(0, BLOCK_N)  # [BLOCK_N] positions
    key_mask = keys < kv_len
    if CAUSAL_MASK:
        pages = tl.load(page_table_ptr + keys // PAGE_SIZE, mask=key_mask, other=0).to(tl.int64)
    else:
        pages = tl.load(page_table_ptr + keys // PAGE_SIZE).to(tl.int64)
    cache_rows = (pages * NUM_KV_HEADS + kv_head) * PAGE_SIZE + keys % PAGE_SIZE  # [BLOCK_N]
    k_lo, k_hi, k_max = _load_q4_tile(k_cache_ptr, k_scale_ptr, cache_rows, dims, key_mask, HEAD_DIM, BLOCK_D,
                                      CAUSAL_MASK)
    v_lo, v_hi, v_max = _load_q4_tile(v_cache_ptr, v_scale_ptr, cache_rows, dims, key_mask, HEAD_DIM, BLOCK_D,
                                      CAUSAL_MASK)
    scores = tl.dot(q_hi, tl.trans(k_hi), acc=tl.dot(q_lo, tl.trans(k_lo))) * k_max  # [BLOCK_M, BLOCK_N] log2
    if CAUSAL_MASK:
        scores = tl.where(keys[None, :] <= query_pos[:, None], scores, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    correction = tl.exp2(running_max - new_max)
    probs = tl.exp2(scores - new_max[:, None])
    running_sum = running_sum * correction + tl.sum(probs, axis=1)
    weights = probs.to(tl.float16)
    acc_lo = acc_lo * correction[:, None] + tl.dot(weights, v_lo) * v_max
    acc_hi = acc_hi * correction[:, None] + tl.dot(weights, v_hi) * v_max
    return acc_lo, acc_hi, new_max, running_sum


@triton.jit
def _paged_prefill_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, page_table_ptr, out_ptr, start, num_tokens,
        span_ptr, q_row_stride, q_head_stride, out_row_stride, out_head_stride, qk_scale_log2,
        NUM_KV_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPAN_ON_DEVICE: tl.constexpr,
        KV_INT8: tl.constexpr, KV_Q4: tl.constexpr):
    # q: [T, Hq, HEAD_DIM] f32 (rotated); out: [T, Hq, HEAD_DIM] f32; page_table: [max_pages] int32
    # k_cache, v_cache: [pages, Hkv, PAGE_SIZE, HEAD_DIM] f16, or int8 (KV_INT8) with k_scale, v_scale
    # [pages, Hkv, PAGE_SIZE] f32, or q4 (KV_Q4) [pages, Hkv, PAGE_SIZE, HEAD_DIM / 2] uint8 with k_scale, v_scale
    # [pages, Hkv, PAGE_SIZE, HEAD_DIM / 32] f32 (the scales are not read for f16); grid (cdiv(T, BLOCK_M), Hq)
    # BLOCK_D pads HEAD_DIM, or for q4 HEAD_DIM / 2: a q4 head is held in two halves, dims j and j + HEAD_DIM / 2.
    # SPAN_ON_DEVICE: start and num_tokens (<= T) are span_ptr[0], span_ptr[1] (int32), not the arguments.
    if SPAN_ON_DEVICE:
        start = tl.load(span_ptr)
        num_tokens = tl.load(span_ptr + 1)
    # The last query blocks see the most keys: hand them to the first programs so that the short ones fill
    # the tail of the launch.
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP_SIZE
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query index within the chunk
    row_mask = rows < num_tokens
    query_pos = start + rows
    dims = tl.arange(0, BLOCK_D)
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    kv_len = start + num_tokens
    first_query = start + m_block * BLOCK_M
    # tiles ending at or before the block's first query are visible to all its queries: no mask
    unmasked_end = (first_query + 1) // BLOCK_N * BLOCK_N
    end = tl.minimum(kv_len, first_query + BLOCK_M)  # past the block's last query every key is masked
    if SPAN_ON_DEVICE:  # a block of padding rows only (first_query >= kv_len) loads no key
        end = tl.where(first_query < kv_len, end, 0)
        unmasked_end = tl.minimum(unmasked_end, end)
    q_ptrs = q_ptr + rows.to(tl.int64)[:, None] * q_row_stride + head * q_head_stride + dims[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * out_row_stride + head * out_head_stride + dims[None, :]
    if KV_Q4:
        _prefill_q4(q_ptrs, out_ptrs, qk_scale_log2, running_max, running_sum, k_cache_ptr, v_cache_ptr,
                    k_scale_ptr, v_scale_ptr, page_table_ptr, unmasked_end, end, kv_len, kv_head, query_pos,
                    row_mask, dims, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        io_mask = row_mask[:, None] & (dims < HEAD_DIM)[None, :]  # [BLOCK_M, BLOCK_D]
        q = tl.load(q_ptrs, mask=io_mask, other=0.0)
        q = (q * qk_scale_log2).to(tl.float16)  # [BLOCK_M, BLOCK_D]
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for tile_start in range(0, unmasked_end, BLOCK_N):
            acc, running_max, running_sum = _attend_tile(
                q, acc, running_max, running_sum, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, page_table_ptr,
                tile_start, kv_len, kv_head, query_pos, dims, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE, BLOCK_N, BLOCK_D,
                False, KV_INT8)
        for tile_start in range(unmasked_end, end, BLOCK_N):
            acc, running_max, running_sum = _attend_tile(
                q, acc, running_max, running_sum, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, page_table_ptr,
                tile_start, kv_len, kv_head, query_pos, dims, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE, BLOCK_N, BLOCK_D,
                True, KV_INT8)
        out = acc / running_sum[:, None]
        tl.store(out_ptrs, out, mask=io_mask)


@triton.jit
def _prefill_q4(q_ptrs, out_ptrs, qk_scale_log2, running_max, running_sum, k_cache_ptr, v_cache_ptr, k_scale_ptr,
                v_scale_ptr, page_table_ptr, unmasked_end, end, kv_len, kv_head, query_pos, row_mask, dims,
                NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # The query block's walk over a q4 cache, the head in halves: q_ptrs, out_ptrs [BLOCK_M, BLOCK_D] point at dims
    # 0..BLOCK_D-1 of the block's rows, the low half; the high half is HEAD_DIM // 2 further on.
    io_mask = row_mask[:, None] & (dims < HEAD_DIM // 2)[None, :]  # [BLOCK_M, BLOCK_D]
    q_lo = (tl.load(q_ptrs, mask=io_mask, other=0.0) * qk_scale_log2).to(tl.float16)
    q_hi = (tl.load(q_ptrs + HEAD_DIM // 2, mask=io_mask, other=0.0) * qk_scale_log2).to(tl.float16)
    acc_lo = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_hi = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for tile_start in range(0, unmasked_end, BLOCK_N):
        acc_lo, acc_hi, running_max, running_sum = _attend_tile_q4(
            q_lo, q_hi, acc_lo, acc_hi, running_max, running_sum, k_cache_ptr, v_cache_ptr, k_scale_ptr,
            v_scale_ptr, page_table_ptr, tile_start, kv_len, kv_head, query_pos, dims, NUM_KV_HEADS, HEAD_DIM,
            PAGE_SIZE, BLOCK_N, BLOCK_D, False)
    for tile_start in range(unmasked_end, end, BLOCK_N):
        acc_lo, acc_hi, running_max, running_sum = _attend_tile_q4(
            q_lo, q_hi, acc_lo, acc_hi, running_max, running_sum, k_cache_ptr, v_cache_ptr, k_scale_ptr,
            v_scale_ptr, page_table_ptr, tile_start, kv_len, kv_head, query_pos, dims, NUM_KV_HEADS, HEAD_DIM,
            PAGE_SIZE, BLOCK_N, BLOCK_D, True)
    tl.store(out_ptrs, acc_lo / running_sum[:, None], mask=io_mask)
    tl.store(out_ptrs + HEAD_DIM // 2, acc_hi / running_sum[:, None], mask=io_mask)


def _check_block(name: str, value: int) -> None:
    if not isinstance(value, int) or value < MIN_BLOCK or value > MAX_BLOCK or value & (value - 1):
        raise ValueError(f"{name} must be a power of two in {MIN_BLOCK}..{MAX_BLOCK}, got {value!r}")


def _check_arguments(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table_row: torch.Tensor,
                     start: int | torch.Tensor, out: torch.Tensor, k_scale: torch.Tensor | None,
                     v_scale: torch.Tensor | None) -> None:
    check_tensor("q", q, torch.float32, (None, None, None), layout="rows")
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens < 1:
        raise ValueError("q: needs at least one query token (dim 0), got 0")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is not supported by the prefill attention kernel; "
                         f"supported: 1..{MAX_HEAD_DIM}")
    check_tensor("out", out, torch.float32, tuple(q.shape), layout="rows")
    check_cache_pair(k_cache, v_cache, None, head_dim, k_scale, v_scale)  # f16, or int8 or q4 with its scales
    num_kv_heads, page_size = k_cache.shape[1], k_cache.shape[2]
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of the cache's kv heads "
                         f"(k_cache shape {list(k_cache.shape)})")
    check_tensor("page_table_row", page_table_row, torch.int32, (None,))
    if isinstance(start, torch.Tensor):  # a span read on the device: the caller guarantees its bounds
        check_tensor("span", start, torch.int32, (2,))
        check_same_device(q=q, span=start)
    elif isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a non-negative integer or an int32 [2] span tensor, got {start!r}")
    capacity = page_table_row.numel() * page_size
    if isinstance(start, int) and start + num_tokens > capacity:
        raise ValueError(f"start + T = {start} + {num_tokens} = {start + num_tokens} tokens exceed the "
                         f"{capacity} tokens that page_table_row ({page_table_row.numel()} pages of {page_size}) "
                         f"covers")
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, page_table_row=page_table_row, out=out)
    if k_scale is not None:
        check_same_device(q=q, k_scale=k_scale, v_scale=v_scale)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            page_table_row: torch.Tensor, start: int | torch.Tensor, out: torch.Tensor,
                            scale: float | None = None,
                            *, block_m: int = DEFAULT_BLOCK_M, block_n: int = DEFAULT_BLOCK_N,
                            num_warps: int = DEFAULT_NUM_WARPS, k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = softmax(scale * q[t] K^T) V over cached positions 0..start+t of one sequence; returns `out`.

    q [T, Hq, Dh] f32 (rotated; queries of positions start..start+T-1; last-dim stride 1);
    k_cache, v_cache contiguous (one layer), already holding positions 0..start+T-1 (kv_cache.py):
    [pages, Hkv, page_size, Dh] f16, or int8 with their scales k_scale, v_scale [pages, Hkv, page_size] f32,
    or q4 [pages, Hkv, page_size, Dh / 2] uint8 with k_scale, v_scale [pages, Hkv, page_size, Dh / 32] f32;
    page_table_row [max_pages] int32; out [T, Hq, Dh] f32 (last-dim stride 1).
    q head h reads kv head h // (Hq // Hkv). scale None: Dh ** -0.5. Dh: up to 256 (a power of two runs without
    padding); a multiple of 64 for q4.
    `start` may instead be an int32 [2] device tensor (start, n) with n <= T: the queries are q[:n] at positions
    start..start+n-1, and out[n:] is left as it was. Its values are read on the device only, so the launch is
    the same for every span (capturable in a CUDA graph): the caller guarantees start + n is covered.
    The page table is read on the device only: the caller guarantees the pages it names are in range."""
    _check_arguments(q, k_cache, v_cache, page_table_row, start, out, k_scale, v_scale)
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {num_warps!r}")
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    if scale is None:
        scale = head_dim ** -0.5
    span = start if isinstance(start, torch.Tensor) else None
    cache_type = kv_cache_type(k_cache)
    _paged_prefill_attention_kernel[(triton.cdiv(num_tokens, block_m), num_q_heads)](
        q, k_cache, v_cache, *scale_launch_args(k_cache, k_scale, v_scale), page_table_row, out,
        0 if span is not None else start, num_tokens, span,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), float(scale) * math.log2(math.e),
        NUM_KV_HEADS=num_kv_heads, GROUP_SIZE=num_q_heads // num_kv_heads, HEAD_DIM=head_dim,
        PAGE_SIZE=k_cache.shape[2], BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(MIN_HEAD_DIM, next_power_of_2(head_dim // 2 if cache_type == "q4" else head_dim)),
        SPAN_ON_DEVICE=span is not None,
        KV_INT8=cache_type == "int8", KV_Q4=cache_type == "q4", num_warps=num_warps)
    return out


def paged_prefill_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                      page_table_row: torch.Tensor, start: int, scale: float | None = None,
                                      *, k_scale: torch.Tensor | None = None,
                                      v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Dense causal softmax(scale * q k^T) v over the gathered cache (an int8 or q4 one dequantized with k_scale,
    v_scale), in float64; returns f32 [T, Hq, Dh]."""
    num_tokens, num_q_heads, head_dim = q.shape
    if scale is None:
        scale = head_dim ** -0.5
    kv_len = start + num_tokens
    group_size = num_q_heads // k_cache.shape[1]
    k, v = (gather_paged_cache_reference(cache, page_table_row, kv_len, cache_scale).double()
            .repeat_interleave(group_size, 0)
            for cache, cache_scale in ((k_cache, k_scale), (v_cache, v_scale)))  # [Hq, kv_len, Dh]
    scores = torch.einsum("thd,hkd->htk", q.double(), k) * scale  # [Hq, T, kv_len]
    query_pos = start + torch.arange(num_tokens, device=q.device)
    visible = torch.arange(kv_len, device=q.device)[None, :] <= query_pos[:, None]  # [T, kv_len]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("htk,hkd->thd", scores.softmax(dim=-1), v).float()
