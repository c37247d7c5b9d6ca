"""Rotary position embedding of q and k, fused with writing k and v into the paged KV cache (f16, int8 or q4).

Two pairings of the rotated dimensions exist, and the GGUF file decides which (see docs/architecture.md):
- normal (GGUF llama): pairs (x[2i], x[2i+1]),
- neox (qwen2/qwen3): pairs (x[i], x[i + rope_dim/2]),
each pair i rotated by the angle of row `position` and column i of the cos/sin tables, which already include any
rope scaling. With rope_dim < head_dim only the first rope_dim dimensions rotate; the rest pass through.

Each program handles one head of one batch row. q is rotated in place: each thread loads both elements of its
pairs and stores exactly those, so no thread reads what another writes. k goes to the cache, elsewhere, so it
is rotated by `_load_rotated`, each element loaded with its partner (decode attention's opt-in rope uses it
too).

An int8 cache (kv_cache.py) gets each rotated k row and each v row quantized as it is stored, with the row's
f32 scale: one (token, kv head) row is one program's, so its max is a reduction within the program. Both
divisions are IEEE-rounded, as kv_cache.quantize_kv_reference's torch divisions are. A q4 cache gets them in
blocks of 32 dims: the program loads (and rotates) the row as [Dh / 64, 32] cells twice, the low half of the
row and the high half, so that the two nibbles of each byte (dim j and dim j + Dh/2, kv_cache.py) are in the same
thread and each block's max is a reduction along a cell row.

`num_rows`, an int32 device scalar, limits the work to the first rows: a prefill CUDA graph captured for a
bucket of rows serves shorter chunks, and its padding rows must neither write the cache nor read a position
table row that may not exist.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tensor_checks import check_same_device, check_tensor, next_power_of_2
from .kv_cache import check_paged_cache, scale_launch_args
from .pdl import _pdl_wait, launch_options


@triton.jit
def _load_rotated(base, dims, mask, cos_row, sin_row, HALF_ROPE: tl.constexpr, NEOX: tl.constexpr):
    """x[base + dims] (f32) rotated by the angles at cos_row, sin_row (the row's cos and sin tables): each
    element is loaded with its pair partner (the pairing of the module docstring); dims at or past
    2 * HALF_ROPE pass through. base [G, 1] and dims [1, D], or both [D]. For a rotation written elsewhere than
    it was read: in place, a thread would read a partner another thread may have overwritten."""
    rotated = dims < 2 * HALF_ROPE
    if NEOX:  # pairs (i, i + HALF_ROPE)
        first = dims < HALF_ROPE
        pair = tl.where(first, dims, dims - HALF_ROPE)
        partner = tl.where(first, dims + HALF_ROPE, dims - HALF_ROPE)
    else:  # pairs (2i, 2i + 1)
        first = dims % 2 == 0
        pair = dims // 2
        partner = tl.where(first, dims + 1, dims - 1)
    x = tl.load(base + dims, mask=mask, other=0.0)
    x_partner = tl.load(base + tl.where(rotated, partner, dims), mask=mask & rotated, other=0.0)
    cos = tl.load(cos_row + tl.where(rotated, pair, 0), mask=rotated, other=1.0)
    sin = tl.load(sin_row + tl.where(rotated, pair, 0), mask=rotated, other=0.0)
    return tl.where(first, x * cos - x_partner * sin, x * cos + x_partner * sin)


@triton.jit
def _store_cache_row(x, row_ptr, scale_ptr, dims, dim_mask, KV_INT8: tl.constexpr):
    """Store x [BLOCK_D] f32, 0 where dim_mask is off, as the cache row at row_ptr + dims: rounded to f16, or
    quantized to int8 (as kv_cache.quantize_kv_reference) with its scale at scale_ptr. A row whose dim_mask is off
    everywhere (a padding row) stores nothing, not even a scale."""
    if KV_INT8:
        amax = tl.max(tl.abs(x), axis=0)  # masked dims hold 0: they do not count
        # div_rn, not Triton's approximate division: from the same row, the torch reference's scale exactly
        qmax = tl.zeros_like(amax) + 127.0  # kv_cache.KV_INT8_QMAX
        inverse = tl.where(amax > 0.0, tl.math.div_rn(qmax, tl.maximum(amax, 1e-30)), 0.0)  # a zero row: q = 0
        tl.store(row_ptr + dims, tl.floor(x * inverse + 0.5).to(tl.int8), mask=dim_mask)  # in [-127, 127]
        is_real = tl.max(dim_mask.to(tl.int32), axis=0) > 0
        tl.store(scale_ptr, tl.math.div_rn(amax, qmax), mask=is_real)
    else:
        tl.store(row_ptr + dims, x.to(tl.float16), mask=dim_mask)


@triton.jit
def _q4_nibbles(x, scale_ptr, block_mask):
    """x [BLOCK_B, 32] f32 (one half of a row, 0 where masked) as 4-bit nibbles q + 8 in 1..15 (int32), each
    block's scale max |x| / 7 stored at scale_ptr [BLOCK_B] where block_mask is on (kv_cache.quantize_kv_q4_reference;
    IEEE-rounded divisions, as its torch ones)."""
    amax = tl.max(tl.abs(x), axis=1)  # [BLOCK_B]; masked cells hold 0
    qmax = tl.zeros_like(amax) + 7.0  # kv_cache.KV_Q4_QMAX
    inverse = tl.where(amax > 0.0, tl.math.div_rn(qmax, tl.maximum(amax, 1e-30)), 0.0)  # a zero block: q = 0
    q = tl.minimum(tl.maximum(tl.floor(x * inverse[:, None] + 0.5), -7.0), 7.0)
    tl.store(scale_ptr, tl.math.div_rn(amax, qmax), mask=block_mask)
    return (q + 8.0).to(tl.int32)


@triton.jit
def _store_q4_cache_row(low, high, row_ptr, scale_ptr, cells, cell_mask, blocks, block_mask,
                        HALF_BLOCKS: tl.constexpr):
    """Store one q4 cache row from its halves low, high [BLOCK_B, 32] f32 (dims cells and cells + Dh/2, 0 where
    cell_mask is off): the bytes at row_ptr + cells, the low half's block scales at scale_ptr + blocks, the high
    half's at scale_ptr + HALF_BLOCKS + blocks. block_mask [BLOCK_B] says which blocks exist for this row (off
    everywhere on a padding row: nothing is stored)."""
    low_nibbles = _q4_nibbles(low, scale_ptr + blocks, block_mask)
    high_nibbles = _q4_nibbles(high, scale_ptr + HALF_BLOCKS + blocks, block_mask)
    tl.store(row_ptr + cells, (low_nibbles | (high_nibbles << 4)).to(tl.uint8), mask=cell_mask)


@triton.jit
def _rope_and_cache_write_kernel(
        q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, positions_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
        page_table_ptr, num_rows_ptr, q_row_stride, q_head_stride, k_row_stride, k_head_stride, v_row_stride,
        v_head_stride, table_row_stride, page_table_row_stride,
        NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_ROPE: tl.constexpr,
        PAGE_SIZE: tl.constexpr, NEOX: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
        USE_PDL: tl.constexpr, LIMIT_ROWS: tl.constexpr, KV_INT8: tl.constexpr, KV_Q4: tl.constexpr,
        BLOCK_B: tl.constexpr):
    _pdl_wait(USE_PDL)
    # q: [B, Hq, Dh] f32 (rotated in place); k, v: [B, Hkv, Dh] f32; cos, sin: [max_ctx, HALF_ROPE] f32
    # positions: [B] int32; page_table: [B, max_pages] int32; k_cache, v_cache: [pages, Hkv, PAGE_SIZE, Dh] f16,
    # or int8 (KV_INT8) with k_scale, v_scale: [pages, Hkv, PAGE_SIZE] f32 (not read otherwise), or q4 (KV_Q4):
    # [pages, Hkv, PAGE_SIZE, Dh / 2] uint8 with k_scale, v_scale [pages, Hkv, PAGE_SIZE, Dh / 32] f32
    # grid (B, Hq + Hkv): head < Hq rotates a q head, otherwise kv head (head - Hq) is rotated and cached.
    # LIMIT_ROWS: rows >= num_rows_ptr[0] are padding and left alone.
    row = tl.program_id(0)
    head = tl.program_id(1)
    pairs = tl.arange(0, BLOCK_HALF)
    dims = tl.arange(0, BLOCK_D)
    pair_mask = pairs < HALF_ROPE
    dim_mask = dims < HEAD_DIM
    if LIMIT_ROWS:
        num_rows = tl.load(num_rows_ptr)
        is_real = row < num_rows
        # compared as vectors: the interpreter refuses a vector mask combined with a scalar boolean
        pair_mask = pair_mask & ((pairs * 0 + row) < num_rows)
        dim_mask = dim_mask & ((dims * 0 + row) < num_rows)
        position = tl.load(positions_ptr + tl.where(is_real, row, 0))  # row 0's position: in the tables' range
    else:
        position = tl.load(positions_ptr + row)
    if NEOX:
        first = pairs
        second = pairs + HALF_ROPE
    else:
        first = 2 * pairs
        second = 2 * pairs + 1
    table_row = position.to(tl.int64) * table_row_stride
    cos = tl.load(cos_ptr + table_row + pairs, mask=pair_mask, other=1.0)  # [BLOCK_HALF]
    sin = tl.load(sin_ptr + table_row + pairs, mask=pair_mask, other=0.0)
    if head < NUM_Q_HEADS:
        q_head = q_ptr + row.to(tl.int64) * q_row_stride + head * q_head_stride
        x1 = tl.load(q_head + first, mask=pair_mask, other=0.0)
        x2 = tl.load(q_head + second, mask=pair_mask, other=0.0)
        tl.store(q_head + first, x1 * cos - x2 * sin, mask=pair_mask)
        tl.store(q_head + second, x2 * cos + x1 * sin, mask=pair_mask)
    else:
        kv_head = head - NUM_Q_HEADS
        # a padding row reads the entry of row 0's position in its own page-table row; its stores are masked
        page = tl.load(page_table_ptr + row.to(tl.int64) * page_table_row_stride + position // PAGE_SIZE)
        cache_row = (page.to(tl.int64) * NUM_KV_HEADS + kv_head) * PAGE_SIZE + position % PAGE_SIZE  # scale index
        k_head = k_ptr + row.to(tl.int64) * k_row_stride + kv_head * k_head_stride
        v_head = v_ptr + row.to(tl.int64) * v_row_stride + kv_head * v_head_stride
        if KV_Q4:
            HALF_DIM: tl.constexpr = HEAD_DIM // 2
            HALF_BLOCKS: tl.constexpr = HEAD_DIM // 64
            blocks = tl.arange(0, BLOCK_B)
            cells = blocks[:, None] * 32 + tl.arange(0, 32)[None, :]  # [BLOCK_B, 32]: dims of the low half
            block_mask = blocks < HALF_BLOCKS
            if LIMIT_ROWS:
                block_mask = block_mask & ((blocks * 0 + row) < num_rows)
            cell_mask = block_mask[:, None] & (cells < HALF_DIM)
            cos_row = cos_ptr + table_row
            sin_row = sin_ptr + table_row
            row_bytes = cache_row * HALF_DIM
            row_scales = cache_row * (2 * HALF_BLOCKS)
            _store_q4_cache_row(
                _load_rotated(k_head, cells, cell_mask, cos_row, sin_row, HALF_ROPE, NEOX),
                _load_rotated(k_head, cells + HALF_DIM, cell_mask, cos_row, sin_row, HALF_ROPE, NEOX),
                k_cache_ptr + row_bytes, k_scale_ptr + row_scales, cells, cell_mask, blocks, block_mask, HALF_BLOCKS)
            _store_q4_cache_row(
                tl.load(v_head + cells, mask=cell_mask, other=0.0),
                tl.load(v_head + cells + HALF_DIM, mask=cell_mask, other=0.0),
                v_cache_ptr + row_bytes, v_scale_ptr + row_scales, cells, cell_mask, blocks, block_mask, HALF_BLOCKS)
        else:
            slot = cache_row * HEAD_DIM
            k_rotated = _load_rotated(k_head, dims, dim_mask, cos_ptr + table_row, sin_ptr + table_row, HALF_ROPE,
                                      NEOX)
            _store_cache_row(k_rotated, k_cache_ptr + slot, k_scale_ptr + cache_row, dims, dim_mask, KV_INT8)
            v = tl.load(v_head + dims, mask=dim_mask, other=0.0)
            _store_cache_row(v, v_cache_ptr + slot, v_scale_ptr + cache_row, dims, dim_mask, KV_INT8)


def rope_and_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         page_table: torch.Tensor, *, neox: bool, pdl: bool = False,
                         num_rows: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None) -> None:
    """Rotate q [B, Hq, Dh] in place; write rotated k [B, Hkv, Dh] and v [B, Hkv, Dh] into the cache slot of
    positions[b] for each batch row b (k and v themselves are left unchanged): rounded to f16, or, into an int8
    cache, quantized per (token, kv head) row with the row's scale written to k_scale, v_scale
    [pages, Hkv, page_size] f32 (as kv_cache.quantize_kv_reference), or into a q4 cache in blocks of 32 with
    their scales in k_scale, v_scale [pages, Hkv, page_size, Dh / 32] (kv_cache.quantize_kv_q4_reference). cos, sin: [max_ctx, rope_dim/2] f32 with
    rope_dim <= Dh; the caller guarantees positions[b] < max_ctx (read on the device, never checked on the host).
    `num_rows`: an int32 [1] device tensor n <= B; rows b >= n are neither rotated nor cached, quants and scales
    alike (positions[b] and page_table[b] are not used beyond their first entry)."""
    check_tensor("q", q, torch.float32, (None, None, None), layout="rows")
    batch, num_q_heads, head_dim = q.shape
    check_tensor("k", k, torch.float32, (batch, None, head_dim), layout="rows")
    num_kv_heads = k.shape[1]
    check_tensor("v", v, torch.float32, (batch, num_kv_heads, head_dim), layout="rows")
    check_tensor("cos", cos, torch.float32, (None, None))
    check_tensor("sin", sin, torch.float32, tuple(cos.shape))
    half_rope = cos.shape[1]
    if not 1 <= 2 * half_rope <= head_dim:
        raise ValueError(f"cos: width {half_rope} gives rope_dim {2 * half_rope}, must be in 2..head_dim "
                         f"({head_dim})")
    page_size = check_paged_cache(k_cache, v_cache, page_table, positions, batch, num_kv_heads, head_dim,
                                  k_scale, v_scale)
    check_same_device(q=q, k=k, v=v, cos=cos, sin=sin, positions=positions, k_cache=k_cache, v_cache=v_cache,
                      page_table=page_table)
    if k_scale is not None:
        check_same_device(q=q, k_scale=k_scale, v_scale=v_scale)
    if num_rows is not None:
        check_tensor("num_rows", num_rows, torch.int32, (1,))
        check_same_device(q=q, num_rows=num_rows)
    if batch == 0:
        return
    _rope_and_cache_write_kernel[(batch, num_q_heads + num_kv_heads)](
        q, k, v, cos, sin, positions, k_cache, v_cache, *scale_launch_args(k_cache, k_scale, v_scale), page_table,
        num_rows,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), page_table.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF_ROPE=half_rope,
        PAGE_SIZE=page_size, NEOX=bool(neox), BLOCK_HALF=next_power_of_2(half_rope),
        BLOCK_D=next_power_of_2(head_dim), LIMIT_ROWS=num_rows is not None, KV_INT8=k_cache.dtype == torch.int8,
        KV_Q4=k_cache.dtype == torch.uint8, BLOCK_B=next_power_of_2(max(1, head_dim // 64)), num_warps=1,
        **launch_options(pdl))


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, *,
                   neox: bool) -> torch.Tensor:
    """Rotate x [B, H, Dh] (not modified) at positions [B]; returns a new f32 tensor. Math in float64."""
    half = cos.shape[1]
    rows = positions.long()
    c = cos.double()[rows][:, None, :]  # [B, 1, half]
    s = sin.double()[rows][:, None, :]
    out = x.double().clone()
    if neox:
        x1, x2 = x.double()[..., :half], x.double()[..., half:2 * half]
        out[..., :half], out[..., half:2 * half] = x1 * c - x2 * s, x2 * c + x1 * s
    else:
        x1, x2 = x.double()[..., 0:2 * half:2], x.double()[..., 1:2 * half:2]
        out[..., 0:2 * half:2], out[..., 1:2 * half:2] = x1 * c - x2 * s, x2 * c + x1 * s
    return out.float()
