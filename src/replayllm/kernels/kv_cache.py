"""The paged KV cache layout as the kernels see it: checks shared by the launchers, and plain-torch references.

Per layer: k_cache, v_cache [num_pages, num_kv_heads, page_size, head_dim], contiguous, so one page of one head
is a dense [page_size, head_dim] tile. Token t of batch row b lives in page `page_table[b, t // page_size]`,
slot `t % page_size`. page_size is a power of two so the kernels divide with shifts.

Three element types:
- f16 (the default): the values rounded to f16.
- int8: each (token, kv head) row of head_dim values quantized symmetrically, with its own f32 scale in
  k_scale, v_scale [num_pages, num_kv_heads, page_size] (the same indexing without head_dim): value ~ q * scale,
  scale = max |x| / 127, q = floor(x / scale + 1/2) in [-127, 127]. About half the bytes of f16 (132 against 256
  at head_dim 128), which is what decode attention reads deep in a context. One scale a row, not a block of 32,
  because the kernels then apply it to a whole score (k) or probability (v) instead of to every element.
- q4: 4-bit values in blocks of 32 dims, each block with its own f32 scale: scale = max |x| / 7 over the block,
  q = floor(x / scale + 1/2) in [-7, 7], stored as the nibble q + 8. The row of head_dim values is head_dim / 2
  bytes, [..., Dh / 2] uint8, byte j holding dim j in its low nibble and dim j + Dh/2 in its high one, so a
  kernel unpacks the two halves of a row with a mask and a shift and never interleaves them; the scales are
  k_scale, v_scale [num_pages, num_kv_heads, page_size, Dh / 32], block i covering dims 32i..32i+31. 80 bytes
  a row at head_dim 128 (against 132 for int8): what decode attention reads deep in a context, where the
  cache's bytes decide the step. Blocks, not rows, because 4 bits over a whole row lose the small dims next to
  the large ones. head_dim must be a multiple of 64 (each half a whole number of blocks).

The page table and the positions are read on the device only; the caller guarantees
`positions[b] < page_table.shape[1] * page_size` and that the pages named are in range.
"""

from __future__ import annotations

import torch

from ._tensor_checks import check_tensor

KV_INT8_QMAX = 127.0
KV_Q4_QMAX = 7.0
KV_Q4_BLOCK = 32  # dims per scale of a q4 cache
KV_CACHE_DTYPES = {"f16": torch.float16, "int8": torch.int8, "q4": torch.uint8}


def kv_cache_type(cache: torch.Tensor) -> str:
    """The element type ("f16", "int8" or "q4") a cache tensor holds, from its dtype."""
    return {torch.int8: "int8", torch.uint8: "q4"}.get(cache.dtype, "f16")


def kv_row_shape(dtype: str, head_dim: int) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(the trailing shape of one cached row, the trailing shape of its scales) for a cache of `dtype`:
    f16 ((Dh,), none), int8 ((Dh,), ()), q4 ((Dh / 2,), (Dh / 32,))."""
    if dtype == "q4":
        if head_dim % (2 * KV_Q4_BLOCK):
            raise ValueError(f"a q4 KV cache needs head_dim a multiple of {2 * KV_Q4_BLOCK}, got {head_dim}")
        return (head_dim // 2,), (head_dim // KV_Q4_BLOCK,)
    return (head_dim,), (() if dtype == "int8" else None)


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
    """k_cache, v_cache [pages, Hkv, page_size, Dh]: f16 without scales, int8 with k_scale, v_scale
    [pages, Hkv, page_size] f32, or q4 ([pages, Hkv, page_size, Dh / 2] uint8) with k_scale, v_scale
    [pages, Hkv, page_size, Dh / 32] f32; page_size a power of two."""
    dtype = kv_cache_type(k_cache)
    row, scale_row = kv_row_shape(dtype, head_dim)
    check_tensor("k_cache", k_cache, KV_CACHE_DTYPES[dtype], (None, num_kv_heads, None, *row))
    check_tensor("v_cache", v_cache, KV_CACHE_DTYPES[dtype], tuple(k_cache.shape))
    if scale_row is not None:
        if k_scale is None or v_scale is None:
            article = "an" if dtype == "int8" else "a"
            raise ValueError(f"{article} {dtype} KV cache needs its scales (k_scale, v_scale)")
        check_tensor("k_scale", k_scale, torch.float32, (*k_cache.shape[:3], *scale_row))
        check_tensor("v_scale", v_scale, torch.float32, (*k_cache.shape[:3], *scale_row))
    elif k_scale is not None or v_scale is not None:
        raise ValueError("k_scale, v_scale belong to an int8 or q4 KV cache; this one is f16")
    page_size = k_cache.shape[2]
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"k_cache: page size (dim 2) must be a power of two, got {page_size}")


def scale_launch_args(k_cache: torch.Tensor, k_scale: torch.Tensor | None,
                      v_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale pointers a kernel takes: the scales of an int8 or q4 cache, else the cache itself (never read)."""
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


def quantize_kv_q4_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., Dh] quantized as a q4 cache holds it: (packed [..., Dh / 2] uint8, scale [..., Dh / 32] f32)."""
    x = x.float()
    blocks = x.unflatten(-1, (-1, KV_Q4_BLOCK))  # [..., Dh / 32, 32]
    amax = blocks.abs().amax(dim=-1)
    inverse = torch.where(amax > 0, KV_Q4_QMAX / amax.clamp_min(1e-30), torch.zeros_like(amax))
    q = torch.floor(blocks * inverse[..., None] + 0.5).clamp(-KV_Q4_QMAX, KV_Q4_QMAX).flatten(-2)
    nibbles = (q + 8).to(torch.uint8)  # 1..15
    half = x.shape[-1] // 2
    return nibbles[..., :half] | (nibbles[..., half:] << 4), amax / KV_Q4_QMAX


def dequantize_kv_q4_reference(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """packed [..., Dh / 2] uint8 and scale [..., Dh / 32] f32 back to the values [..., Dh] f32."""
    nibbles = torch.cat([packed & 15, packed >> 4], dim=-1).float() - 8.0  # dims 0..Dh/2-1, then the rest
    return (nibbles.unflatten(-1, (-1, KV_Q4_BLOCK)) * scale[..., None]).flatten(-2)


def round_trip_kv_reference(x: torch.Tensor, dtype: str = "int8") -> torch.Tensor:
    """x [..., Dh] as an int8 (or q4) cache gives it back (f32)."""
    if dtype == "q4":
        return dequantize_kv_q4_reference(*quantize_kv_q4_reference(x))
    return dequantize_kv_reference(*quantize_kv_reference(x))


def paged_cache_write_reference(k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                                positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Write k[b], v[b] ([B, Hkv, Dh]; rounded to f16, or quantized into an int8 or q4 cache and its scales) into
    the slot of token positions[b], in place (a host loop)."""
    page_size = k_cache.shape[2]
    for b, position in enumerate(positions.tolist()):
        page, slot = int(page_table[b, position // page_size]), position % page_size
        for cache, scales, x in ((k_cache, k_scale, k[b]), (v_cache, v_scale, v[b])):
            if cache.dtype == torch.int8:
                cache[page, :, slot], scales[page, :, slot] = quantize_kv_reference(x)
            elif cache.dtype == torch.uint8:
                cache[page, :, slot], scales[page, :, slot] = quantize_kv_q4_reference(x)
            else:
                cache[page, :, slot] = x.to(torch.float16)


def gather_paged_cache_reference(cache: torch.Tensor, page_table_row: torch.Tensor, length: int,
                                 scale: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens 0..length-1 of one sequence from a paged cache (an int8 or q4 one dequantized with its scales), as
    a dense [Hkv, length, Dh] f32 tensor."""
    page_size = cache.shape[2]
    num_pages = -(-length // page_size)
    pages = page_table_row[:num_pages].long()
    if cache.dtype == torch.uint8:
        tiles = dequantize_kv_q4_reference(cache[pages], scale[pages])  # [num_pages, Hkv, page_size, Dh]
    else:
        tiles = cache[pages].float()
        if cache.dtype == torch.int8:
            tiles = tiles * scale[pages].float()[..., None]
    dense = tiles.permute(1, 0, 2, 3).reshape(cache.shape[1], num_pages * page_size, tiles.shape[3])
    return dense[:, :length]
