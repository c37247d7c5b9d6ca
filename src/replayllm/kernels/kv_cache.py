"""The paged KV cache layout as the kernels see it: checks shared by the launchers, and plain-torch references.

Per layer: k_cache, v_cache [num_pages, num_kv_heads, page_size, head_dim], contiguous, so one page of one head
is a dense [page_size, head_dim] tile. Token t of batch row b lives in page `page_table[b, t // page_size]`,
slot `t % page_size`. page_size is a power of two so the kernels divide with shifts.

Two element types:
- f16 (the default): the values rounded to f16.
- int8: each (token, kv head) row of head_dim values quantized symmetrically, with its own f32 scale in
  k_scale, v_scale [num_pages, num_kv_heads, page_size] (the same indexing without head_dim): value ~ q * scale,
  scale = max |x| / 127, q = floor(x / scale + 1/2) in [-127, 127]. About half the bytes of f16 (132 against 256
  at head_dim 128), which is what decode attention reads deep in a context. One scale a row, not a block of 32,
  because the kernels then apply it to a whole score (k) or probability (v) instead of to every element.

The page table and the positions are read on the device only; the caller guarantees
`positions[b] < page_table.shape[1] * page_size` and that the pages named are in range.
"""

from __future__ import annotations

import torch

from ._tensor_checks import check_tensor

KV_INT8_QMAX = 127.0
KV_CACHE_DTYPES = {"f16": torch.float16, "int8": torch.int8}


def check_paged_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                      positions: torch.Tensor, batch: int, num_kv_heads: int, head_dim: int,
                      k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> int:
    """Check the cache pair (f16, or int8 with its scales), page table [batch, *] int32 and positions [batch]
    int32; returns page_size."""
    check_cache_pair(k_cache, v_cache, num_kv_heads, head_dim, k_scale, v_scale)
    check_tensor("page_table", page_table, torch.int32, (batch, None), layout="rows")
    check_tensor("positions", positions, torch.int32, (batch,))
    if page_table.shape[1] < 1:
        raise ValueError("page_table: needs at least one page per sequence")
    return k_cache.shape[2]


def check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor, num_kv_heads: int | None, head_dim: int,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """k_cache, v_cache [pages, Hkv, page_size, Dh]: f16 without scales, or int8 with k_scale, v_scale
    [pages, Hkv, page_size] f32; page_size a power of two."""
    dtype = torch.int8 if k_cache.dtype == torch.int8 else torch.float16
    check_tensor("k_cache", k_cache, dtype, (None, num_kv_heads, None, head_dim))
    check_tensor("v_cache", v_cache, dtype, tuple(k_cache.shape))
    if dtype == torch.int8:
        if k_scale is None or v_scale is None:
            raise ValueError("an int8 KV cache needs its scales (k_scale, v_scale)")
        check_tensor("k_scale", k_scale, torch.float32, tuple(k_cache.shape[:3]))
        check_tensor("v_scale", v_scale, torch.float32, tuple(k_cache.shape[:3]))
    elif k_scale is not None or v_scale is not None:
        raise ValueError("k_scale, v_scale belong to an int8 KV cache; this one is f16")
    page_size = k_cache.shape[2]
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"k_cache: page size (dim 2) must be a power of two, got {page_size}")


def scale_launch_args(k_cache: torch.Tensor, k_scale: torch.Tensor | None,
                      v_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale pointers a kernel takes: the scales of an int8 cache, else the cache itself (never read)."""
    return (k_scale, v_scale) if k_scale is not None else (k_cache, k_cache)


def quantize_kv_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., Dh] quantized per row as an int8 cache holds it: (q [..., Dh] int8, scale [...] f32)."""
    x = x.float()
    amax = x.abs().amax(dim=-1)
    inverse = torch.where(amax > 0, KV_INT8_QMAX / amax.clamp_min(1e-30), torch.zeros_like(amax))
    q = torch.floor(x * inverse[..., None] + 0.5).clamp(-KV_INT8_QMAX, KV_INT8_QMAX).to(torch.int8)
    return q, amax / KV_INT8_QMAX


def dequantize_kv_reference(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[..., None]


def round_trip_kv_reference(x: torch.Tensor) -> torch.Tensor:
    """x [..., Dh] as an int8 cache gives it back (f32)."""
    return dequantize_kv_reference(*quantize_kv_reference(x))


def paged_cache_write_reference(k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                                positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Write k[b], v[b] ([B, Hkv, Dh]; rounded to f16, or quantized into an int8 cache and its scales) into the
    slot of token positions[b], in place (a host loop)."""
    page_size = k_cache.shape[2]
    for b, position in enumerate(positions.tolist()):
        page, slot = int(page_table[b, position // page_size]), position % page_size
        for cache, scales, x in ((k_cache, k_scale, k[b]), (v_cache, v_scale, v[b])):
            if cache.dtype == torch.int8:
                cache[page, :, slot], scales[page, :, slot] = quantize_kv_reference(x)
            else:
                cache[page, :, slot] = x.to(torch.float16)


def gather_paged_cache_reference(cache: torch.Tensor, page_table_row: torch.Tensor, length: int,
                                 scale: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens 0..length-1 of one sequence from a paged cache (an int8 one dequantized with its scales), as a
    dense [Hkv, length, Dh] f32 tensor."""
    page_size = cache.shape[2]
    num_pages = -(-length // page_size)
    pages = page_table_row[:num_pages].long()
    tiles = cache[pages].float()  # [num_pages, Hkv, page_size, Dh]
    if cache.dtype == torch.int8:
        tiles = tiles * scale[pages].float()[..., None]
    dense = tiles.permute(1, 0, 2, 3).reshape(cache.shape[1], num_pages * page_size, cache.shape[3])
    return dense[:, :length]
