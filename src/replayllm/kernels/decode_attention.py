"""Decode attention over the paged KV cache (f16 or int8): one query token per sequence, split over the sequence.

"Flash decoding": the sequence is cut into splits of `split_tokens` tokens; program (b, kv_head, split) reads
each K/V tile of its split once for all q heads of the kv head's group (GQA) and keeps an online softmax in
f32, leaving (max, sum, unnormalised acc) per q head in the workspace; a second kernel merges the splits.
The number of splits is fixed when the workspace is made (from the largest context), so the grid is static
and the launches can be captured in a CUDA graph; programs whose split starts past the sequence end do nothing
and the merge ignores them (it reads the length from `positions` on the device too).

A program's time at short contexts (one tile) is its chain of round trips to memory: positions, the page
table, then K and V. With `early_v` V's load is issued right after K's, so the two overlap (opt-in until
measured: it takes the kernel from 108 to 137 registers, which may cost residency at long contexts); the
merge loads each split's max, sum and partial output in one pass and merges the maxima online.

With `fused_merge` (opt-in in the decode step: measured slower deep in a context) there is no second kernel: each split's program, once its partials
are stored, fences them (every thread), meets its block at a barrier and counts itself in on a counter per
(sequence, kv head) with an acquire-release atomic; the program that counts last reads every split's partials
from L2, merges them for its kv head's q heads and sets the counter back to zero for the next launch. A
sequence of one split (up to `split_tokens` tokens) needs no merge: its program writes the result itself.

With `new_token` (opt-in; measured slower on an H100, benchmarks/NOTES.md) the launch also does
rope_and_cache_write's work: every program rotates q as it loads it, and the program whose split holds the new
position rotates the new k and writes it and v into the cache, then meets its block at a barrier before
reading its tiles, that token among them.

An int8 cache (kernels/kv_cache.py) has one scale per (token, kv head) row, so a token's scale factors out of
everything the kernel computes from that token: its score is (q . k_int8[t]) * k_scale[t] and its share of the
output p[t] * v_scale[t] * v_int8[t]. The kernel therefore multiplies each column of scores by its k scale and
each probability by its v scale before the V product (the softmax sum keeps the plain probabilities): two
multiplies per token instead of one per element, and the tiles go into the products as int8 values converted
to f16, which is exact (|q| <= 127). The cache is written by kernels/rope.rope_and_cache_write (`new_token`
writes f16 only).

With `int8_products` (opt-in; not yet measured on a GPU) an int8 cache's tiles are not converted at all: q is
rounded once per program to 16-bit integers (one step per row, max |q| / 32512) split into two int8 bytes,
hi and lo, and q . k = step * (256 hi . k + lo . k) in exact int32 tensor-core products; the probabilities
times the v scales are rounded the same way per tile for the V product. The rounding, 1/65024 of a row's
largest value, is far below the cache's own (1/254 of its row's).

With `fma_products` (opt-in; not yet measured on a GPU) a second kernel does the split's work: one program
per (sequence, q head, split) instead of per kv head, and both products as f32 multiply-adds on the CUDA cores,
scores = sum over Dh of k * q and acc += sum over the tile's tokens of p * v. At batch 1 the products are ~1
multiply-add per cached value against a byte or two read, far below the cores' rate, and the tiles need no
transpose, no f16 split of q and no change of layout to reach the tensor cores (which is where an int8 tile's
time went: benchmarks/NOTES.md); k and v go from the cache to f32 in registers, where f16 and int8 values are
exact. A GQA group's q heads each read their kv head's tiles (from L2 after the first). No fused merge, no
`new_token`, no `int8_products` here.

Scores are kept in log2 units (multiplied by scale * log2(e)), so the kernels exponentiate with exp2.

Precision: both products run on f16 tensor cores yet keep f32 accuracy. K and V are f16 already, or int8
values, which f16 holds exactly; the f32 operand (q, then the probabilities p, times the v scales with an int8
cache) is split as x = hi + lo / 2048 with hi = f16(x) and lo = f16((x - hi) * 2048), and
x @ K = hi @ K + (lo @ K) / 2048 with f32 accumulation: f16 x f16 products are exact in f32, and the split
leaves an error of about 2^-22 |x|, so the result is as close to an int8 cache's dequantized values as to an
f16 cache's. (A plain f16 q would cost ~5e-4 relative, TF32 ~1e-3; an f32 FMA dot spills registers at head_dim
128 and runs 5-30x slower.) q must stay below 65504 in magnitude, the f16 range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..errors import InvalidParameterError
from ._tensor_checks import check_same_device, check_tensor, next_power_of_2, under_interpreter
from .int8_activations import (ACTIVATION_BLOCK, QuantizedActivations, _quantize_blocks, _store_quantized_row,
                               check_activation_q8, q8_launch_args, q8_tensors)
from ._last_program import _count_in
from .kv_cache import check_paged_cache, gather_paged_cache_reference, kv_cache_type, scale_launch_args
from .pdl import _pdl_wait, launch_options
from .rope import _load_rotated

TARGET_NUM_SPLITS = 64  # enough programs to fill a GPU at batch 1; few enough to merge cheaply
DEFAULT_MIN_SPLIT_TOKENS = 128  # measured on an H100: 64..256 within 10%, 128 best at 4096 tokens
MIN_SPLIT_TOKENS = 16  # tl.dot needs tiles of at least 16 tokens
MAX_TILE_TOKENS = 64
MAX_TILE_ELEMENTS = 8192  # one K or V tile [tokens, Dh] in registers: 64 x 128, or 32 x 256
MAX_FMA_TILE_TOKENS = 128  # fma_products: an int8 tile of 128 tokens at head_dim 128 is 16 KB, an f16 one of 64


@triton.jit
def _tile_addresses(page_row, tile_start, end, kv_head, dims, dim_mask, NUM_KV_HEADS: tl.constexpr,
                    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Where the tile of BLOCK_N tokens from tile_start (< end) lives in kv head kv_head's pages: (token_mask
    [BLOCK_N], token_slots [BLOCK_N], the scales' index, kv_offsets and kv_mask [BLOCK_N, BLOCK_D] of K and V)."""
    token_mask, token_slots = _tile_slots(page_row, tile_start, end, kv_head, NUM_KV_HEADS, PAGE_SIZE, BLOCK_N)
    kv_offsets = token_slots[:, None] * HEAD_DIM + dims[None, :]
    return token_mask, token_slots, kv_offsets, token_mask[:, None] & dim_mask[None, :]


@triton.jit
def _tile_slots(page_row, tile_start, end, kv_head, NUM_KV_HEADS: tl.constexpr, PAGE_SIZE: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """(token_mask [BLOCK_N], the cache rows [BLOCK_N] of kv head kv_head) of the tile of BLOCK_N tokens from
    tile_start (< end): the row index of the scales too, and times a row's elements, of the values."""
    tokens = tile_start + tl.arange(0, BLOCK_N)
    token_mask = tokens < end
    pages = tl.load(page_row + tokens // PAGE_SIZE, mask=token_mask, other=0).to(tl.int64)
    return token_mask, (pages * NUM_KV_HEADS + kv_head) * PAGE_SIZE + tokens % PAGE_SIZE


@triton.jit
def _per_q_head_program(positions_ptr, NUM_Q_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                        SPLIT_TOKENS: tl.constexpr):
    """The CUDA-core kernels' program (grid (B * Hq, NUM_SPLITS)): (row, q head, kv head, split, the split's first
    token, the sequence's length)."""
    row = tl.program_id(0) // NUM_Q_HEADS
    head = tl.program_id(0) % NUM_Q_HEADS
    split = tl.program_id(1)
    return row, head, head // GROUP_SIZE, split, split * SPLIT_TOKENS, tl.load(positions_ptr + row) + 1


@triton.jit
def _paged_decode_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, page_table_ptr, positions_ptr, part_max_ptr,
        part_sum_ptr, part_acc_ptr, q_row_stride, q_head_stride, page_table_row_stride, qk_scale_log2,
        counter_ptr, out_ptr, out_row_stride, out_head_stride, oq_ptr, oq_scale_ptr, oq_sum_ptr, oq_row_stride,
        oq_scale_row_stride, new_k_ptr, new_v_ptr, new_k_row_stride, new_k_head_stride, new_v_row_stride,
        new_v_head_stride, cos_ptr, sin_ptr, rope_row_stride,
        NUM_KV_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
        SPLIT_TOKENS: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, KV_INT8: tl.constexpr, INT8_PRODUCTS: tl.constexpr, EARLY_V: tl.constexpr, FUSED_MERGE: tl.constexpr,
        BLOCK_S: tl.constexpr, MERGE_BLOCK_D: tl.constexpr, QUANTIZE: tl.constexpr, ROPE: tl.constexpr,
        NEOX: tl.constexpr, HALF_ROPE: tl.constexpr, USE_FENCE: tl.constexpr, USE_PDL: tl.constexpr):
    _pdl_wait(USE_PDL)
    # q: [B, Hq, Dh] f32; k_cache, v_cache: [pages, Hkv, PAGE_SIZE, Dh] f16, or int8 (KV_INT8) with k_scale,
    # v_scale [pages, Hkv, PAGE_SIZE] f32 (else not read); page_table: [B, max_pages] int32
    # part_max, part_sum: [B_ws, Hq, NUM_SPLITS] f32; part_acc: [B_ws, Hq, NUM_SPLITS, Dh] f32 (B_ws >= B)
    # ROPE: q is not yet rotated; new_k, new_v [B, Hkv, Dh] f32 are the new token's (k unrotated), cos, sin
    # [max_ctx, HALF_ROPE] f32 the rope tables; the token goes into the cache at position seq_len - 1.
    # grid (B * Hkv, NUM_SPLITS)
    row = tl.program_id(0) // NUM_KV_HEADS
    kv_head = tl.program_id(0) % NUM_KV_HEADS
    split = tl.program_id(1)
    seq_len = tl.load(positions_ptr + row) + 1
    start = split * SPLIT_TOKENS
    if start < seq_len:
        end = tl.minimum(start + SPLIT_TOKENS, seq_len)
        group = tl.arange(0, BLOCK_G)
        heads = kv_head * GROUP_SIZE + group  # [BLOCK_G] q heads sharing this kv head
        group_mask = group < GROUP_SIZE
        dims = tl.arange(0, BLOCK_D)
        dim_mask = dims < HEAD_DIM
        q_heads = q_ptr + row.to(tl.int64) * q_row_stride + heads[:, None] * q_head_stride  # [BLOCK_G, 1]
        q_mask = group_mask[:, None] & dim_mask[None, :]
        page_row = page_table_ptr + row.to(tl.int64) * page_table_row_stride
        if ROPE:
            position = seq_len - 1
            cos_row = cos_ptr + position.to(tl.int64) * rope_row_stride
            sin_row = sin_ptr + position.to(tl.int64) * rope_row_stride
            q = _load_rotated(q_heads, dims[None, :], q_mask, cos_row, sin_row, HALF_ROPE, NEOX)
            if split == position // SPLIT_TOKENS:
                # This split's last tile holds the new token: cache it first. The block's barrier makes the
                # stores visible to all its threads, which read the token back with the rest of the tile.
                k_new = _load_rotated(new_k_ptr + row.to(tl.int64) * new_k_row_stride + kv_head * new_k_head_stride,
                                      dims, dim_mask, cos_row, sin_row, HALF_ROPE, NEOX)
                v_new = tl.load(new_v_ptr + row.to(tl.int64) * new_v_row_stride + kv_head * new_v_head_stride + dims,
                                mask=dim_mask, other=0.0)
                page = tl.load(page_row + position // PAGE_SIZE).to(tl.int64)
                slot = ((page * NUM_KV_HEADS + kv_head) * PAGE_SIZE + position % PAGE_SIZE) * HEAD_DIM
                tl.store(k_cache_ptr + slot + dims, k_new.to(tl.float16), mask=dim_mask)
                tl.store(v_cache_ptr + slot + dims, v_new.to(tl.float16), mask=dim_mask)
                tl.debug_barrier()
        else:
            q = tl.load(q_heads + dims[None, :], mask=q_mask, other=0.0)  # [BLOCK_G, BLOCK_D]
        if INT8_PRODUCTS:  # q as 16-bit integers split into int8 bytes, for integer products (module docstring)
            q8_hi, q8_lo, q_step = _split_16bit(q)
            score_scale = q_step * qk_scale_log2  # [BLOCK_G]
        else:
            q_hi = q.to(tl.float16)
            q_lo = ((q - q_hi.to(tl.float32)) * 2048.0).to(tl.float16)
        running_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for tile_start in range(start, end, BLOCK_N):
            token_mask, token_slots, kv_offsets, kv_mask = _tile_addresses(
                page_row, tile_start, end, kv_head, dims, dim_mask, NUM_KV_HEADS, PAGE_SIZE, HEAD_DIM, BLOCK_N)
            k_t = tl.trans(tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0))  # [BLOCK_D, BLOCK_N]
            if KV_INT8:  # int8 values are exact in f16 (|q| <= 127); the scales load beside the tile
                if not INT8_PRODUCTS:
                    k_t = k_t.to(tl.float16)
                k_scale = tl.load(k_scale_ptr + token_slots, mask=token_mask, other=0.0)  # [BLOCK_N]
            if EARLY_V:  # issued before the scores need K: V's round trip to memory overlaps K's (module docstring)
                v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
                if KV_INT8:
                    if not INT8_PRODUCTS:
                        v = v.to(tl.float16)
                    v_scale = tl.load(v_scale_ptr + token_slots, mask=token_mask, other=0.0)  # [BLOCK_N]
            if INT8_PRODUCTS:  # exact in int32: |hi . k| <= 127 * 127 * 256, times 256 < 2^31
                dots = (tl.dot(q8_hi, k_t) * 256 + tl.dot(q8_lo, k_t)).to(tl.float32)  # [BLOCK_G, BLOCK_N]
                scores = dots * score_scale[:, None] * k_scale[None, :]
            else:
                dots = tl.dot(q_hi, k_t) + tl.dot(q_lo, k_t) * (1.0 / 2048.0)  # [BLOCK_G, BLOCK_N]
                if KV_INT8:
                    scores = dots * (k_scale * qk_scale_log2)[None, :]
                else:
                    scores = dots * qk_scale_log2
            scores = tl.where(token_mask[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            correction = tl.exp2(running_max - new_max)  # exp2(-inf) = 0 on the first tile
            probs = tl.exp2(scores - new_max[:, None])
            running_sum = running_sum * correction + tl.sum(probs, axis=1)
            if not EARLY_V:
                v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
                if KV_INT8:
                    if not INT8_PRODUCTS:
                        v = v.to(tl.float16)
                    v_scale = tl.load(v_scale_ptr + token_slots, mask=token_mask, other=0.0)
            if KV_INT8:  # each token's v scale goes on its probability (module docstring)
                weights = probs * v_scale[None, :]
            else:
                weights = probs
            if INT8_PRODUCTS:  # exact in int32: |hi . v| <= 127 * 127 * 64, times 256 < 2^31
                w8_hi, w8_lo, w_step = _split_16bit(weights)
                pv = (tl.dot(w8_hi, v) * 256 + tl.dot(w8_lo, v)).to(tl.float32) * w_step[:, None]
                acc = acc * correction[:, None] + pv
            else:
                p_hi = weights.to(tl.float16)
                p_lo = ((weights - p_hi.to(tl.float32)) * 2048.0).to(tl.float16)
                acc = acc * correction[:, None] + tl.dot(p_hi, v) + tl.dot(p_lo, v) * (1.0 / 2048.0)
            running_max = new_max
        if FUSED_MERGE:
            num_used = tl.minimum((seq_len + SPLIT_TOKENS - 1) // SPLIT_TOKENS, NUM_SPLITS)
            if num_used == 1:  # a sequence of one split: its result, straight from registers
                _store_group_result(acc / running_sum[:, None], row, kv_head * GROUP_SIZE, out_ptr, out_row_stride,
                                    out_head_stride, oq_ptr, oq_scale_ptr, oq_sum_ptr, oq_row_stride,
                                    oq_scale_row_stride, GROUP_SIZE, HEAD_DIM, BLOCK_G, BLOCK_D, QUANTIZE)
            else:
                _store_partials(part_max_ptr, part_sum_ptr, part_acc_ptr, running_max, running_sum, acc, row, heads,
                                group_mask, dims, dim_mask, split, NUM_KV_HEADS * GROUP_SIZE, HEAD_DIM, NUM_SPLITS)
                # The last of the row's used splits to finish merges them, for every q head of its kv head:
                # each program makes its partials visible GPU-wide (a fence in every thread, then the block's
                # barrier) before counting itself in; the one that counts last reads them from L2 and resets
                # the counter for the next launch. No second launch, no wait for the slowest split's neighbours.
                counter = counter_ptr + row * NUM_KV_HEADS + kv_head
                if _count_in(counter, num_used, split, USE_FENCE):
                    tl.store(counter, 0)
                    for g in tl.static_range(GROUP_SIZE):
                        _merge_head(part_max_ptr, part_sum_ptr, part_acc_ptr, row, kv_head * GROUP_SIZE + g,
                                    num_used, out_ptr, out_row_stride, out_head_stride, oq_ptr, oq_scale_ptr,
                                    oq_sum_ptr, oq_row_stride, oq_scale_row_stride, NUM_KV_HEADS * GROUP_SIZE,
                                    HEAD_DIM, NUM_SPLITS, BLOCK_S, MERGE_BLOCK_D, QUANTIZE)
        else:
            _store_partials(part_max_ptr, part_sum_ptr, part_acc_ptr, running_max, running_sum, acc, row, heads,
                            group_mask, dims, dim_mask, split, NUM_KV_HEADS * GROUP_SIZE, HEAD_DIM, NUM_SPLITS)


@triton.jit
def _online_softmax_step(scores, token_mask, running_max, running_sum):
    """One tile's step of the online softmax over scores [BLOCK_N] (log2 units; masked tokens ignored): returns
    (probs [BLOCK_N] relative to the new max, the factor the accumulator is rescaled by, new max, new sum)."""
    scores = tl.where(token_mask, scores, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(scores, axis=0))
    correction = tl.exp2(running_max - new_max)  # exp2(-inf) = 0 on the first tile
    probs = tl.exp2(scores - new_max)
    return probs, correction, new_max, running_sum * correction + tl.sum(probs, axis=0)


@triton.jit
def _paged_decode_attention_fma_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, page_table_ptr, positions_ptr, part_max_ptr,
        part_sum_ptr, part_acc_ptr, q_row_stride, q_head_stride, page_table_row_stride, qk_scale_log2,
        NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
        PAGE_SIZE: tl.constexpr, SPLIT_TOKENS: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, KV_INT8: tl.constexpr, EARLY_V: tl.constexpr, USE_PDL: tl.constexpr):
    """fma_products: one program per (sequence, q head, split), both products as f32 multiply-adds on the CUDA
    cores (module docstring). Same inputs and partials as _paged_decode_attention_kernel; grid (B * Hq, NUM_SPLITS)."""
    _pdl_wait(USE_PDL)
    row, head, kv_head, split, start, seq_len = _per_q_head_program(positions_ptr, NUM_Q_HEADS, GROUP_SIZE,
                                                                    SPLIT_TOKENS)
    if start < seq_len:
        end = tl.minimum(start + SPLIT_TOKENS, seq_len)
        dims = tl.arange(0, BLOCK_D)
        dim_mask = dims < HEAD_DIM
        # the score scale folded into q once: one multiply a program instead of one a token
        q = tl.load(q_ptr + row.to(tl.int64) * q_row_stride + head * q_head_stride + dims, mask=dim_mask,
                    other=0.0) * qk_scale_log2
        page_row = page_table_ptr + row.to(tl.int64) * page_table_row_stride
        running_max = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
        running_sum = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for tile_start in range(start, end, BLOCK_N):
            token_mask, token_slots, kv_offsets, kv_mask = _tile_addresses(
                page_row, tile_start, end, kv_head, dims, dim_mask, NUM_KV_HEADS, PAGE_SIZE, HEAD_DIM, BLOCK_N)
            k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
            if EARLY_V:
                v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
            scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)  # [BLOCK_N], log2 units
            if KV_INT8:
                scores = scores * tl.load(k_scale_ptr + token_slots, mask=token_mask, other=0.0)
            probs, correction, running_max, running_sum = _online_softmax_step(scores, token_mask, running_max,
                                                                                running_sum)
            if not EARLY_V:
                v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
            weights = probs
            if KV_INT8:  # each token's v scale goes on its probability (module docstring)
                weights = probs * tl.load(v_scale_ptr + token_slots, mask=token_mask, other=0.0)
            acc = acc * correction + tl.sum(weights[:, None] * v.to(tl.float32), axis=0)
        part = (row.to(tl.int64) * NUM_Q_HEADS + head) * NUM_SPLITS + split
        tl.store(part_max_ptr + part, running_max)
        tl.store(part_sum_ptr + part, running_sum)
        tl.store(part_acc_ptr + part * HEAD_DIM + dims, acc, mask=dim_mask)


@triton.jit
def _q4_tile_half(cache_ptr, scale_ptr, byte_offsets, scale_offsets, kv_mask, scale_mask, HIGH: tl.constexpr):
    """One half of a q4 tile as f32 nibble values [BLOCK_N, BLOCK_B, 32] (q, not yet scaled) and the block scales
    [BLOCK_N, BLOCK_B] (kv_cache.py). Both halves come from the same bytes; L1 serves the second load."""
    packed = tl.load(cache_ptr + byte_offsets, mask=kv_mask, other=0).to(tl.int32)
    nibbles = (packed >> 4) if HIGH else (packed & 15)
    return (nibbles - 8).to(tl.float32), tl.load(scale_ptr + scale_offsets, mask=scale_mask, other=0.0)


@triton.jit
def _paged_decode_attention_q4_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, page_table_ptr, positions_ptr, part_max_ptr,
        part_sum_ptr, part_acc_ptr, q_row_stride, q_head_stride, page_table_row_stride, qk_scale_log2,
        NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
        PAGE_SIZE: tl.constexpr, SPLIT_TOKENS: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_B: tl.constexpr,
        BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr):
    """fma_products over a q4 cache (kv_cache.py): as _paged_decode_attention_fma_kernel, with each half of a row
    held as [BLOCK_B, 32] cells (block i of the low half is dims 32i.., of the high half Dh/2 + 32i..), so that a
    block's scale multiplies the block's partial dot product (k) or the probability (v) once, not every element.
    Grid (B * Hq, NUM_SPLITS)."""
    _pdl_wait(USE_PDL)
    HALF_DIM: tl.constexpr = HEAD_DIM // 2
    HALF_BLOCKS: tl.constexpr = HEAD_DIM // 64
    row, head, kv_head, split, start, seq_len = _per_q_head_program(positions_ptr, NUM_Q_HEADS, GROUP_SIZE,
                                                                    SPLIT_TOKENS)
    if start < seq_len:
        end = tl.minimum(start + SPLIT_TOKENS, seq_len)
        blocks = tl.arange(0, BLOCK_B)
        block_mask = blocks < HALF_BLOCKS
        cells = blocks[:, None] * 32 + tl.arange(0, 32)[None, :]  # [BLOCK_B, 32]: dims of the low half
        cell_mask = block_mask[:, None] & (cells < HALF_DIM)
        q_head = q_ptr + row.to(tl.int64) * q_row_stride + head * q_head_stride
        q_low = tl.load(q_head + cells, mask=cell_mask, other=0.0) * qk_scale_log2
        q_high = tl.load(q_head + HALF_DIM + cells, mask=cell_mask, other=0.0) * qk_scale_log2
        page_row = page_table_ptr + row.to(tl.int64) * page_table_row_stride
        running_max = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
        running_sum = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
        acc_low = tl.zeros([BLOCK_B, 32], tl.float32)
        acc_high = tl.zeros([BLOCK_B, 32], tl.float32)
        for tile_start in range(start, end, BLOCK_N):
            token_mask, token_slots = _tile_slots(page_row, tile_start, end, kv_head, NUM_KV_HEADS, PAGE_SIZE,
                                                  BLOCK_N)
            byte_offsets = token_slots[:, None, None] * HALF_DIM + cells[None, :, :]  # [BLOCK_N, BLOCK_B, 32]
            kv_mask = token_mask[:, None, None] & cell_mask[None, :, :]
            scale_low = token_slots[:, None] * (2 * HALF_BLOCKS) + blocks[None, :]  # [BLOCK_N, BLOCK_B]
            scale_mask = token_mask[:, None] & block_mask[None, :]
            k, k_scale = _q4_tile_half(k_cache_ptr, k_scale_ptr, byte_offsets, scale_low, kv_mask, scale_mask, False)
            scores = tl.sum(tl.sum(k * q_low[None, :, :], axis=2) * k_scale, axis=1)  # [BLOCK_N], log2 units
            k, k_scale = _q4_tile_half(k_cache_ptr, k_scale_ptr, byte_offsets, scale_low + HALF_BLOCKS, kv_mask,
                                       scale_mask, True)
            scores += tl.sum(tl.sum(k * q_high[None, :, :], axis=2) * k_scale, axis=1)
            probs, correction, running_max, running_sum = _online_softmax_step(scores, token_mask, running_max,
                                                                                running_sum)
            v, v_scale = _q4_tile_half(v_cache_ptr, v_scale_ptr, byte_offsets, scale_low, kv_mask, scale_mask, False)
            acc_low = acc_low * correction + tl.sum((probs[:, None] * v_scale)[:, :, None] * v, axis=0)
            v, v_scale = _q4_tile_half(v_cache_ptr, v_scale_ptr, byte_offsets, scale_low + HALF_BLOCKS, kv_mask,
                                       scale_mask, True)
            acc_high = acc_high * correction + tl.sum((probs[:, None] * v_scale)[:, :, None] * v, axis=0)
        part = (row.to(tl.int64) * NUM_Q_HEADS + head) * NUM_SPLITS + split
        tl.store(part_max_ptr + part, running_max)
        tl.store(part_sum_ptr + part, running_sum)
        tl.store(part_acc_ptr + part * HEAD_DIM + cells, acc_low, mask=cell_mask)
        tl.store(part_acc_ptr + part * HEAD_DIM + HALF_DIM + cells, acc_high, mask=cell_mask)


@triton.jit
def _split_16bit(x):
    """x [G, N] f32 as 16-bit integers per row, split into bytes: (hi, lo) int8 [G, N] and step [G] f32 with
    x ~ (256 hi + lo) * step, step = max |x| / 32512 (hi in [-127, 127], lo in [-128, 127]: the 16-bit
    activations' form, kernels/int8_activations.py). A row of zeros gives zeros and step 0."""
    amax = tl.max(tl.abs(x), axis=1)
    inverse = tl.where(amax > 0.0, 32512.0 / tl.maximum(amax, 1e-30), 0.0)
    v = tl.floor(x * inverse[:, None] + 0.5).to(tl.int32)  # in [-32512, 32512]
    hi = (v + 128) >> 8  # arithmetic shift: floor((v + 128) / 256)
    return hi.to(tl.int8), (v - hi * 256).to(tl.int8), amax * (1.0 / 32512.0)


@triton.jit
def _store_partials(part_max_ptr, part_sum_ptr, part_acc_ptr, running_max, running_sum, acc, row, heads, group_mask,
                    dims, dim_mask, split, NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                    NUM_SPLITS: tl.constexpr):
    part = (row.to(tl.int64) * NUM_Q_HEADS + heads) * NUM_SPLITS + split  # [BLOCK_G]
    tl.store(part_max_ptr + part, running_max, mask=group_mask)
    tl.store(part_sum_ptr + part, running_sum, mask=group_mask)
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc,
             mask=group_mask[:, None] & dim_mask[None, :])


@triton.jit
def _store_group_result(result, row, first_head, out_ptr, out_row_stride, out_head_stride, q_ptr, q_scale_ptr,
                        q_sum_ptr, q_row_stride, q_scale_row_stride, GROUP_SIZE: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, QUANTIZE: tl.constexpr):
    """out (and its quantized copy) of heads first_head.. first_head + GROUP_SIZE - 1 of row `row` from
    result [BLOCK_G, BLOCK_D] (rows past GROUP_SIZE and columns past HEAD_DIM are not stored)."""
    r = row.to(tl.int64)
    group = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    tl.store(out_ptr + r * out_row_stride + (first_head + group)[:, None] * out_head_stride + dims[None, :], result,
             mask=(group < GROUP_SIZE)[:, None] & (dims < HEAD_DIM)[None, :])
    if QUANTIZE:  # HEAD_DIM % 32 == 0: each head is whole blocks; block j of tile row g is block (head, j)
        BLOCKS_PER_ROW: tl.constexpr = BLOCK_D // 32
        tile_block = tl.arange(0, BLOCK_G * BLOCKS_PER_ROW)
        g, j = tile_block // BLOCKS_PER_ROW, tile_block % BLOCKS_PER_ROW
        blocks = (first_head + g) * (HEAD_DIM // 32) + j  # [BLOCK_G * BLOCKS_PER_ROW] in the row's copy
        in_block = blocks[:, None] * 32 + tl.arange(0, 32)[None, :]
        _quantize_blocks(tl.reshape(result, [BLOCK_G * BLOCKS_PER_ROW, 32]), q_ptr + r * q_row_stride + in_block,
                         q_scale_ptr + r * q_scale_row_stride + blocks, q_sum_ptr + r * q_scale_row_stride + blocks,
                         (g < GROUP_SIZE) & (j * 32 < HEAD_DIM))


@triton.jit
def _merge_head(part_max_ptr, part_sum_ptr, part_acc_ptr, row, head, num_used, out_ptr, out_row_stride,
                out_head_stride, q_ptr, q_scale_ptr, q_sum_ptr, q_row_stride, q_scale_row_stride,
                NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                BLOCK_D: tl.constexpr, QUANTIZE: tl.constexpr):
    """Merge the first num_used splits' partials of q head `head` of batch row `row` into out (and its
    quantized copy). One pass, the splits' maxima merged online: the max, sum and acc of BLOCK_S splits are
    loaded together, so up to BLOCK_S splits cost one round trip to memory (a first pass for the global max
    would be two). The partials are read from L2 (.cg): other programs wrote them, maybe in this launch."""
    first_part = (row.to(tl.int64) * NUM_Q_HEADS + head) * NUM_SPLITS
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    running_max = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), axis=0)
    total = tl.sum(tl.zeros([BLOCK_S], tl.float32), axis=0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, num_used, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        split_mask = splits < num_used
        part_max = tl.load(part_max_ptr + first_part + splits, mask=split_mask, other=float("-inf"),
                           cache_modifier=".cg")
        part_sum = tl.load(part_sum_ptr + first_part + splits, mask=split_mask, other=0.0, cache_modifier=".cg")
        acc_ptrs = part_acc_ptr + (first_part + splits)[:, None] * HEAD_DIM + dims[None, :]
        part_acc = tl.load(acc_ptrs, mask=split_mask[:, None] & dim_mask[None, :], other=0.0,
                           cache_modifier=".cg")  # [BLOCK_S, BLOCK_D]
        new_max = tl.maximum(running_max, tl.max(part_max, axis=0))  # finite: split 0 is always used
        correction = tl.exp2(running_max - new_max)  # 0 on the first pass
        weight = tl.exp2(part_max - new_max)  # [BLOCK_S]; 0 for unused splits
        total = total * correction + tl.sum(weight * part_sum, axis=0)
        acc = acc * correction + tl.sum(weight[:, None] * part_acc, axis=0)
        running_max = new_max
    result = acc / total  # [BLOCK_D]; 0 past HEAD_DIM
    r = row.to(tl.int64)
    tl.store(out_ptr + r * out_row_stride + head * out_head_stride + dims, result, mask=dim_mask)
    if QUANTIZE:
        _store_quantized_row(result, head * (HEAD_DIM // 32), (head + 1) * HEAD_DIM, q_ptr + r * q_row_stride,
                             q_scale_ptr + r * q_scale_row_stride, q_sum_ptr + r * q_scale_row_stride,
                             BLOCK_D // 32)


@triton.jit
def _merge_splits_kernel(part_max_ptr, part_sum_ptr, part_acc_ptr, positions_ptr, out_ptr, out_row_stride,
                         out_head_stride, q_ptr, q_scale_ptr, q_sum_ptr, q_row_stride, q_scale_row_stride,
                         NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                         SPLIT_TOKENS: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_D: tl.constexpr, QUANTIZE: tl.constexpr, USE_PDL: tl.constexpr):
    _pdl_wait(USE_PDL)
    # part_*: as written by _paged_decode_attention_kernel; out: [B, Hq, Dh] f32; grid (B, Hq)
    # QUANTIZE (HEAD_DIM % 32 == 0): also row b of the quantized copy of out viewed as [B, Hq * Dh]: q [B, Hq * Dh]
    # int8 or int16, q_scale, q_sum [B, Hq * Dh / 32] f32; this program's head is blocks head * Dh / 32 onwards.
    row = tl.program_id(0)
    seq_len = tl.load(positions_ptr + row) + 1
    num_used = tl.minimum((seq_len + SPLIT_TOKENS - 1) // SPLIT_TOKENS, NUM_SPLITS)
    _merge_head(part_max_ptr, part_sum_ptr, part_acc_ptr, row, tl.program_id(1), num_used, out_ptr, out_row_stride,
                out_head_stride, q_ptr, q_scale_ptr, q_sum_ptr, q_row_stride, q_scale_row_stride, NUM_Q_HEADS,
                HEAD_DIM, NUM_SPLITS, BLOCK_S, BLOCK_D, QUANTIZE)


@dataclass(frozen=True)
class DecodeAttentionWorkspace:
    """Per-split partial results of paged_decode_attention for up to `batch` sequences of up to
    `num_splits * split_tokens` tokens. Allocated once; reused by every launch (and every CUDA-graph replay)."""

    split_tokens: int
    part_max: torch.Tensor  # [batch, Hq, num_splits] f32: max score of the split, log2 units
    part_sum: torch.Tensor  # [batch, Hq, num_splits] f32: sum of exp2(score - max)
    part_acc: torch.Tensor  # [batch, Hq, num_splits, Dh] f32: sum of exp2(score - max) * v
    # [batch * Hq] int32, zero between launches: the splits of each (row, kv head) done so far in a launch that
    # merges in the attention kernel (fused_merge); the last one resets it
    counters: torch.Tensor | None = None

    def __post_init__(self):
        if self.split_tokens < MIN_SPLIT_TOKENS or self.split_tokens & (self.split_tokens - 1):
            raise InvalidParameterError(f"split_tokens must be a power of two >= {MIN_SPLIT_TOKENS}, "
                                        f"got {self.split_tokens}")
        check_tensor("part_max", self.part_max, torch.float32, (None, None, None))
        check_tensor("part_sum", self.part_sum, torch.float32, tuple(self.part_max.shape))
        check_tensor("part_acc", self.part_acc, torch.float32, (*self.part_max.shape, None))
        check_same_device(part_max=self.part_max, part_sum=self.part_sum, part_acc=self.part_acc)
        if self.counters is not None:
            check_tensor("counters", self.counters, torch.int32, (self.part_max.shape[0] * self.part_max.shape[1],))
            check_same_device(part_max=self.part_max, counters=self.counters)

    @classmethod
    def create(cls, batch: int, num_q_heads: int, head_dim: int, max_context_tokens: int,
               device: torch.device | str, split_tokens: int | None = None) -> DecodeAttentionWorkspace:
        """split_tokens None: the smallest power of two >= DEFAULT_MIN_SPLIT_TOKENS that covers
        max_context_tokens in at most TARGET_NUM_SPLITS splits."""
        for name, value in (("batch", batch), ("num_q_heads", num_q_heads), ("head_dim", head_dim),
                            ("max_context_tokens", max_context_tokens)):
            if not isinstance(value, int) or value < 1:
                raise InvalidParameterError(f"{name} must be a positive integer, got {value!r}")
        if split_tokens is None:
            split_tokens = max(DEFAULT_MIN_SPLIT_TOKENS, next_power_of_2(-(-max_context_tokens // TARGET_NUM_SPLITS)))
        num_splits = -(-max_context_tokens // split_tokens)
        f32 = dict(dtype=torch.float32, device=device)
        return cls(split_tokens=split_tokens,
                   part_max=torch.empty(batch, num_q_heads, num_splits, **f32),
                   part_sum=torch.empty(batch, num_q_heads, num_splits, **f32),
                   part_acc=torch.empty(batch, num_q_heads, num_splits, head_dim, **f32),
                   counters=torch.zeros(batch * num_q_heads, dtype=torch.int32, device=device))

    @property
    def num_splits(self) -> int:
        return self.part_max.shape[2]

    @property
    def max_context_tokens(self) -> int:
        """Longest sequence the workspace covers."""
        return self.num_splits * self.split_tokens

    @property
    def nbytes(self) -> int:
        parts = (self.part_max, self.part_sum, self.part_acc) + (() if self.counters is None else (self.counters,))
        return sum(t.numel() * t.element_size() for t in parts)


@dataclass(frozen=True)
class NewToken:
    """The step's new token, for paged_decode_attention to rotate and cache in its own launch (what
    kernels/rope.rope_and_cache_write does in a launch before it): k, v [B, Hkv, Dh] f32 (k not yet rotated;
    row strides free, so views of the fused QKV output serve), and the rope tables cos, sin
    [max_ctx, rope_dim / 2] f32 (rope scaling included) with their pairing, `neox` or normal (kernels/rope.py)."""

    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    neox: bool

    def check(self, batch: int, num_kv_heads: int, head_dim: int) -> None:
        check_tensor("new_token.k", self.k, torch.float32, (batch, num_kv_heads, head_dim), layout="rows")
        check_tensor("new_token.v", self.v, torch.float32, (batch, num_kv_heads, head_dim), layout="rows")
        check_tensor("new_token.cos", self.cos, torch.float32, (None, None))
        check_tensor("new_token.sin", self.sin, torch.float32, tuple(self.cos.shape))
        if not 1 <= 2 * self.cos.shape[1] <= head_dim:
            raise ValueError(f"new_token.cos: width {self.cos.shape[1]} gives rope_dim {2 * self.cos.shape[1]}, "
                             f"must be in 2..head_dim ({head_dim})")

    def launch_args(self) -> tuple:
        return (self.k, self.v, self.k.stride(0), self.k.stride(1), self.v.stride(0), self.v.stride(1), self.cos,
                self.sin, self.cos.stride(0))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           page_table: torch.Tensor, positions: torch.Tensor, scale: float, out: torch.Tensor,
                           workspace: DecodeAttentionWorkspace, *, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None, out_q8: QuantizedActivations | None = None,
                           pdl: bool = False, block_n: int | None = None, num_warps: int = 4,
                           early_v: bool = False, fused_merge: bool = False,
                           new_token: NewToken | None = None, int8_products: bool = False,
                           fma_products: bool = False) -> torch.Tensor:
    """out [B, Hq, Dh] f32 = softmax(scale * q k^T) v over tokens 0..positions[b] of each sequence b.

    q [B, Hq, Dh] f32 (rotated); k_cache, v_cache [pages, Hkv, page_size, Dh] f16 with Hq % Hkv == 0, or int8
    with their scales k_scale, v_scale [pages, Hkv, page_size] f32 (kernels/kv_cache.py; the result is then over
    the dequantized values); page_table [B, max_pages] int32; positions [B] int32. With `out_q8` (Dh a multiple
    of 32), the merge also writes out, viewed as [B, Hq * Dh], quantized (int8 or 16-bit) in blocks of 32, as
    quantize_activations would. `block_n` (tokens a tile; None: the largest that fits, up to 64), `num_warps` and
    `early_v` (V's tile loaded beside K's, not after the softmax) are the split kernel's launch shape, for tuning.
    With `fused_merge` the last split of each (sequence, kv head) to finish merges the splits itself (one launch
    instead of two; the workspace must have its counters, as `create` makes it); a sequence of one split then
    writes its result straight away. With `new_token` (f16 caches only), q is taken unrotated: the kernel rotates
    q, and the program whose split holds position positions[b] rotates the new k and writes it and v into the
    cache before reading its tiles (one launch instead of rope_and_cache_write's and this one; q itself is left
    as it is). `int8_products` (int8 caches only; opt-in, not yet measured on a GPU): both products on the
    integers themselves instead of f16 conversions of the tiles (the module docstring). `fma_products` (f16 or
    int8 caches; opt-in until measured): one program per q head, both products as f32 multiply-adds on the
    CUDA cores, no tensor cores and no tile layout changes (the module docstring); tiles up to 128 tokens, with
    the merge in its own kernel (not with fused_merge, new_token or int8_products). Returns `out`."""
    check_tensor("q", q, torch.float32, (None, None, None), layout="rows")
    batch, num_q_heads, head_dim = q.shape
    check_tensor("out", out, torch.float32, (batch, num_q_heads, head_dim), layout="rows")
    num_kv_heads = k_cache.shape[1] if k_cache.dim() == 4 else -1
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of the cache's kv heads "
                         f"(k_cache shape {list(k_cache.shape)})")
    page_size = check_paged_cache(k_cache, v_cache, page_table, positions, batch, num_kv_heads, head_dim,
                                  k_scale, v_scale)
    kv_int8 = k_cache.dtype == torch.int8
    ws = workspace
    if ws.part_acc.shape[0] < batch or ws.part_acc.shape[1:] != (num_q_heads, ws.num_splits, head_dim):
        raise ValueError(f"workspace shaped {list(ws.part_acc.shape)} (batch, Hq, splits, Dh) does not fit q "
                         f"{list(q.shape)}; create it with batch >= {batch}, {num_q_heads} q heads, Dh {head_dim}")
    if page_table.shape[1] * page_size > ws.max_context_tokens:
        raise ValueError(f"page_table holds up to {page_table.shape[1] * page_size} tokens per sequence but the "
                         f"workspace covers {ws.max_context_tokens}; create it with max_context_tokens >= "
                         f"{page_table.shape[1] * page_size}")
    if head_dim > 256:
        raise ValueError(f"head_dim {head_dim} > 256 is not supported by the decode attention kernel")
    if out_q8 is not None:
        if head_dim % ACTIVATION_BLOCK:
            raise ValueError(f"out_q8: the quantized copy is made per head and needs head_dim a multiple of "
                             f"{ACTIVATION_BLOCK}, got {head_dim}")
        check_activation_q8("out_q8", out_q8, batch, num_q_heads * head_dim)
    scales = dict(k_scale=k_scale, v_scale=v_scale) if k_scale is not None else {}
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, page_table=page_table, positions=positions, out=out,
                      workspace=ws.part_acc, **scales, **q8_tensors("out_q8", out_q8))
    if new_token is not None:
        if k_cache.dtype != torch.float16:
            raise ValueError(f"new_token writes the new k and v as f16 and cannot fill an {kv_cache_type(k_cache)} KV "
                             f"cache; write them with kernels/rope.rope_and_cache_write and call without new_token")
        new_token.check(batch, num_kv_heads, head_dim)
        check_same_device(q=q, new_k=new_token.k, new_v=new_token.v, cos=new_token.cos, sin=new_token.sin)
        rope_args = new_token.launch_args()
    else:
        rope_args = (q, q, 0, 0, 0, 0, q, q, 0)  # not read
    if batch == 0:
        return out
    if int8_products and not kv_int8:
        raise ValueError(f"int8_products multiplies an int8 KV cache's quants; this cache is {kv_cache_type(k_cache)}")
    if fma_products or k_cache.dtype == torch.uint8:  # a q4 cache has the CUDA-core products only
        return _fma_decode_attention(q, k_cache, v_cache, page_table, positions, scale, out, ws, k_scale, v_scale,
                                     out_q8, pdl, block_n, num_warps, early_v, fused_merge, new_token, int8_products)
    group_size = num_q_heads // num_kv_heads
    block_d = max(32 if int8_products else 16, next_power_of_2(head_dim))  # int8 products: k of 32 at least
    largest_tile = min(MAX_TILE_TOKENS, ws.split_tokens, MAX_TILE_ELEMENTS // block_d)
    if block_n is None:
        block_n = largest_tile
    elif block_n not in (16, 32, 64) or block_n > ws.split_tokens:
        raise ValueError(f"block_n must be 16, 32 or 64 and at most split_tokens ({ws.split_tokens}), got {block_n!r}")
    if int8_products and block_n < 32:
        raise ValueError(f"int8_products needs tiles of at least 32 tokens (the integer products' depth), got "
                         f"{block_n}: use split_tokens >= 32")
    if num_warps not in (1, 2, 4, 8):
        raise ValueError(f"num_warps must be 1, 2, 4 or 8, got {num_warps!r}")
    if fused_merge and ws.counters is None:
        raise ValueError("fused_merge needs the workspace's counters (DecodeAttentionWorkspace.create makes them)")
    out_q = q8_launch_args(out_q8, out)
    merge_shape = _merge_shape(ws, block_d, out_q8 is not None)
    _paged_decode_attention_kernel[(batch * num_kv_heads, ws.num_splits)](
        q, k_cache, v_cache, *scale_launch_args(k_cache, k_scale, v_scale), page_table, positions, ws.part_max,
        ws.part_sum, ws.part_acc, q.stride(0), q.stride(1), page_table.stride(0), float(scale) * math.log2(math.e),
        ws.counters if fused_merge else positions, out, out.stride(0), out.stride(1), *out_q, *rope_args,
        NUM_KV_HEADS=num_kv_heads, GROUP_SIZE=group_size, HEAD_DIM=head_dim, PAGE_SIZE=page_size,
        SPLIT_TOKENS=ws.split_tokens, NUM_SPLITS=ws.num_splits, BLOCK_G=max(16, next_power_of_2(group_size)),
        BLOCK_D=block_d, BLOCK_N=block_n, KV_INT8=kv_int8, INT8_PRODUCTS=bool(int8_products), EARLY_V=bool(early_v), FUSED_MERGE=bool(fused_merge),
        ROPE=new_token is not None, NEOX=bool(new_token is not None and new_token.neox),
        HALF_ROPE=new_token.cos.shape[1] if new_token is not None else 1,
        USE_FENCE=not under_interpreter(), num_warps=num_warps, **merge_shape,
        **launch_options(pdl))
    if not fused_merge:
        _launch_merge(ws, positions, out, out_q, merge_shape, pdl)
    return out


def _merge_shape(ws: DecodeAttentionWorkspace, block_d: int, quantize: bool) -> dict:
    return dict(BLOCK_S=min(16, next_power_of_2(ws.num_splits)), MERGE_BLOCK_D=max(block_d, ACTIVATION_BLOCK),
                QUANTIZE=quantize)


def _launch_merge(ws: DecodeAttentionWorkspace, positions: torch.Tensor, out: torch.Tensor, out_q: tuple,
                  merge_shape: dict, pdl: bool) -> None:
    """The merge kernel over the splits' partials in `ws`, into out [B, Hq, Dh] (and its quantized copy)."""
    batch, num_q_heads, head_dim = out.shape
    _merge_splits_kernel[(batch, num_q_heads)](
        ws.part_max, ws.part_sum, ws.part_acc, positions, out, out.stride(0), out.stride(1), *out_q,
        NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, SPLIT_TOKENS=ws.split_tokens, NUM_SPLITS=ws.num_splits,
        BLOCK_S=merge_shape["BLOCK_S"], BLOCK_D=merge_shape["MERGE_BLOCK_D"], QUANTIZE=merge_shape["QUANTIZE"],
        num_warps=1, **launch_options(pdl))


def _fma_decode_attention(q, k_cache, v_cache, page_table, positions, scale, out, ws, k_scale, v_scale, out_q8,
                          pdl, block_n, num_warps, early_v, fused_merge, new_token, int8_products) -> torch.Tensor:
    """paged_decode_attention's fma_products launches (those of every q4 cache), its arguments checked already."""
    what = "a q4 KV cache's attention" if k_cache.dtype == torch.uint8 else "fma_products"
    for name, chosen in (("fused_merge", fused_merge), ("new_token", new_token is not None),
                         ("int8_products", int8_products)):
        if chosen:
            raise ValueError(f"{what} has no {name} form: call without {name}")
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    kv_int8 = k_cache.dtype == torch.int8
    block_d = max(16, next_power_of_2(head_dim))
    # tiles of 16 KB at most (the largest tensor-core tile's bytes): 64 f16 or 128 int8 (or q4) tokens at head_dim
    # 128
    largest_tile = min(MAX_FMA_TILE_TOKENS, ws.split_tokens,
                       MAX_TILE_ELEMENTS * (1 if k_cache.dtype == torch.float16 else 2) // block_d)
    if block_n is None:
        block_n = max(MIN_SPLIT_TOKENS, largest_tile)
    elif block_n not in (16, 32, 64, 128) or block_n > ws.split_tokens:
        raise ValueError(f"block_n must be 16, 32, 64 or 128 and at most split_tokens ({ws.split_tokens}) with "
                         f"{what}, got {block_n!r}")
    if num_warps not in (1, 2, 4, 8):
        raise ValueError(f"num_warps must be 1, 2, 4 or 8, got {num_warps!r}")
    common = (q, k_cache, v_cache, *scale_launch_args(k_cache, k_scale, v_scale), page_table, positions, ws.part_max,
              ws.part_sum, ws.part_acc, q.stride(0), q.stride(1), page_table.stride(0),
              float(scale) * math.log2(math.e))
    shape = dict(NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, GROUP_SIZE=num_q_heads // num_kv_heads,
                 HEAD_DIM=head_dim, PAGE_SIZE=k_cache.shape[2], SPLIT_TOKENS=ws.split_tokens,
                 NUM_SPLITS=ws.num_splits, BLOCK_N=block_n, num_warps=num_warps, **launch_options(pdl))
    grid = (batch * num_q_heads, ws.num_splits)
    if k_cache.dtype == torch.uint8:  # early_v has no meaning here: the q4 kernel loads V after the softmax
        _paged_decode_attention_q4_kernel[grid](*common, BLOCK_B=next_power_of_2(head_dim // 64), **shape)
    else:
        _paged_decode_attention_fma_kernel[grid](*common, BLOCK_D=block_d, KV_INT8=kv_int8, EARLY_V=bool(early_v),
                                                 **shape)
    _launch_merge(ws, positions, out, q8_launch_args(out_q8, out), _merge_shape(ws, block_d, out_q8 is not None),
                  pdl)
    return out


def paged_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     page_table: torch.Tensor, positions: torch.Tensor, scale: float,
                                     k_scale: torch.Tensor | None = None,
                                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Dense softmax(scale * q k^T) v per sequence over its gathered cache (an int8 one dequantized with k_scale,
    v_scale), in float64; returns f32 [B, Hq, Dh]."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    group_size = q.shape[1] // k_cache.shape[1]
    for b, position in enumerate(positions.tolist()):
        k = gather_paged_cache_reference(k_cache, page_table[b], position + 1, k_scale).double()  # [Hkv, T, Dh]
        v = gather_paged_cache_reference(v_cache, page_table[b], position + 1, v_scale).double()
        k, v = k.repeat_interleave(group_size, dim=0), v.repeat_interleave(group_size, dim=0)  # [Hq, T, Dh]
        scores = torch.einsum("hd,htd->ht", q[b].double(), k) * scale
        out[b] = torch.einsum("ht,htd->hd", scores.softmax(dim=-1), v).float()
    return out
