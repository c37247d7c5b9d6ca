"""The paged KV cache layout as the kernels see it: checks shared by the launchers, and plain-torch references.

Per layer: k_cache, v_cache [num_pages, num_kv_heads, page_size, head_dim] f16, contiguous, so one page of one
head is a dense [page_size, head_dim] tile. Token t of batch row b lives in page `page_table[b, t // page_size]`,
slot `t % page_size`. page_size is a power of two so the kernels divide with shifts.

The page table and the positions are read on the device only; the caller guarantees
`positions[b] < page_table.shape[1] * page_size` and that the pages named are in range.
"""

from __future__ import annotations

import torch

from ._tensor_checks import check_tensor


def check_paged_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                      positions: torch.Tensor, batch: int, num_kv_heads: int, head_dim: int) -> int:
    """Check the cache pair, page table [batch, *] int32 and positions [batch] int32; returns page_size."""
    check_tensor("k_cache", k_cache, torch.float16, (None, num_kv_heads, None, head_dim))
    check_tensor("v_cache", v_cache, torch.float16, tuple(k_cache.shape))
    check_tensor("page_table", page_table, torch.int32, (batch, None), layout="rows")
    check_tensor("positions", positions, torch.int32, (batch,))
    page_size = k_cache.shape[2]
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"k_cache: page size (dim 2) must be a power of two, got {page_size}")
    if page_table.shape[1] < 1:
        raise ValueError("page_table: needs at least one page per sequence")
    return page_size


def paged_cache_write_reference(k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                                positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write k[b], v[b] ([B, Hkv, Dh], rounded to f16) into the slot of token positions[b], in place (a host loop)."""
    page_size = k_cache.shape[2]
    for b, position in enumerate(positions.tolist()):
        page = int(page_table[b, position // page_size])
        k_cache[page, :, position % page_size] = k[b].to(torch.float16)
        v_cache[page, :, position % page_size] = v[b].to(torch.float16)


def gather_paged_cache_reference(cache: torch.Tensor, page_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """Tokens 0..length-1 of one sequence from a paged cache, as a dense [Hkv, length, Dh] f32 tensor."""
    page_size = cache.shape[2]
    num_pages = -(-length // page_size)
    pages = page_table_row[:num_pages].long()
    tiles = cache[pages]  # [num_pages, Hkv, page_size, Dh]
    dense = tiles.permute(1, 0, 2, 3).reshape(cache.shape[1], num_pages * page_size, cache.shape[3])
    return dense[:, :length].float()
