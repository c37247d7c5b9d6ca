"""The paged cache layout: the torch references, and where rope_and_cache_write puts each token.

The placement tests use identity rotation tables (cos 1, sin 0), so the written k is exactly k rounded to f16
and the whole cache can be compared bit for bit: every slot the page table names holds the token, every other
element still holds the poison written before the launch.
"""

from __future__ import annotations

import pytest
import torch

from replayllm.kernels.kv_cache import check_paged_cache, gather_paged_cache_reference, paged_cache_write_reference
from replayllm.kernels.rope import rope_and_cache_write

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
POISON = -1024.0  # exact in f16, far from any N(0, 1) sample


def test_gather_reference_follows_the_page_table():
    page_size, num_pages, heads, dim = 4, 6, 2, 3
    # element value encodes (page, head, slot, dim) so any mix-up shows
    cache = torch.arange(num_pages * heads * page_size * dim, dtype=torch.float32)
    cache = cache.view(num_pages, heads, page_size, dim).half()
    row = torch.tensor([5, 0, 3, 1], dtype=torch.int32)
    dense = gather_paged_cache_reference(cache, row, 10)
    assert dense.shape == (heads, 10, dim)
    for t in range(10):
        page, slot = int(row[t // page_size]), t % page_size
        assert torch.equal(dense[:, t], cache[page, :, slot].float())


def test_write_reference_writes_one_slot_per_row():
    cache_k = torch.zeros(4, 1, 2, 3, dtype=torch.float16)
    cache_v = torch.zeros_like(cache_k)
    page_table = torch.tensor([[2, 0], [3, 1]], dtype=torch.int32)
    k = torch.tensor([[[1.0, 2, 3]], [[4.0, 5, 6]]])
    paged_cache_write_reference(cache_k, cache_v, page_table, torch.tensor([3, 0], dtype=torch.int32), k, -k)
    # row 0, token 3 -> page_table[0][1] = page 0, slot 1; row 1, token 0 -> page 3, slot 0
    assert torch.equal(cache_k[0, 0, 1], k[0, 0].half()) and torch.equal(cache_k[3, 0, 0], k[1, 0].half())
    assert torch.equal(cache_v[0, 0, 1], -k[0, 0].half())
    assert int((cache_k != 0).sum()) == 6


def _identity_tables(max_ctx, rope_dim):
    return (torch.ones(max_ctx, rope_dim // 2, device=DEVICE), torch.zeros(max_ctx, rope_dim // 2, device=DEVICE))


def _poisoned_cache(num_pages, num_kv_heads, page_size, head_dim):
    shape = (num_pages, num_kv_heads, page_size, head_dim)
    return (torch.full(shape, POISON, dtype=torch.float16, device=DEVICE),
            torch.full(shape, POISON, dtype=torch.float16, device=DEVICE))


@pytest.mark.parametrize("page_size, dh, rope_dim", [(1, 16, 16), (4, 24, 8), (16, 16, 16)])
def test_cache_write_lands_in_the_slot_the_page_table_names_and_nowhere_else(page_size, dh, rope_dim):
    # dh 24 and rope_dim 8: padded, masked blocks and the pass-through part of k
    gen = torch.Generator().manual_seed(page_size)
    batch, hq, hkv, max_pages = 4, 2, 2, 3
    num_pages = 2 * batch * max_pages  # a pool larger than needed: the table skips pages
    page_table = torch.randperm(num_pages, generator=gen)[: batch * max_pages].view(batch, max_pages)
    page_table = page_table.to(torch.int32).to(DEVICE)
    # positions at the first and last slot of a page and in the last page
    positions = torch.tensor([0, page_size - 1, page_size, max_pages * page_size - 1], dtype=torch.int32)
    positions = positions.to(DEVICE)
    k_cache, v_cache = _poisoned_cache(num_pages, hkv, page_size, dh)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    q = torch.randn(batch, hq, dh, generator=gen).to(DEVICE)
    k = torch.randn(batch, hkv, dh, generator=gen).to(DEVICE)
    v = torch.randn(batch, hkv, dh, generator=gen).to(DEVICE)
    cos, sin = _identity_tables(max_pages * page_size, rope_dim)
    rope_and_cache_write(q, k, v, cos, sin, positions, k_cache, v_cache, page_table, neox=False)
    paged_cache_write_reference(expected_k, expected_v, page_table, positions, k, v)
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)
    assert int((k_cache != POISON).sum()) == batch * hkv * dh  # exactly one slot per (row, kv head)


def test_prefill_rows_fill_consecutive_slots_of_one_sequence():
    # prefill calls the kernel with one row per prompt token, all rows sharing the sequence's page table
    gen = torch.Generator().manual_seed(7)
    tokens, hkv, dh, page_size = 11, 1, 8, 4
    row = torch.tensor([6, 2, 4], dtype=torch.int32, device=DEVICE)
    page_table = row.unsqueeze(0).expand(tokens, -1).contiguous()
    k_cache, v_cache = _poisoned_cache(8, hkv, page_size, dh)
    k = torch.randn(tokens, hkv, dh, generator=gen).to(DEVICE)
    v = torch.randn(tokens, hkv, dh, generator=gen).to(DEVICE)
    q = torch.zeros(tokens, 2, dh, device=DEVICE)
    cos, sin = _identity_tables(tokens, dh)
    positions = torch.arange(tokens, dtype=torch.int32, device=DEVICE)
    rope_and_cache_write(q, k, v, cos, sin, positions, k_cache, v_cache, page_table, neox=True)
    assert torch.equal(gather_paged_cache_reference(k_cache, row, tokens), k.transpose(0, 1).half().float())
    assert torch.equal(gather_paged_cache_reference(v_cache, row, tokens), v.transpose(0, 1).half().float())
    assert (gather_paged_cache_reference(k_cache, row, 12)[:, 11] == POISON).all()  # slot after the last token


def test_check_paged_cache_returns_the_page_size_and_names_mismatches():
    k_cache = torch.zeros(3, 2, 8, 16, dtype=torch.float16)
    page_table, positions = torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    assert check_paged_cache(k_cache, k_cache.clone(), page_table, positions, 1, 2, 16) == 8
    with pytest.raises(ValueError, match=r"k_cache: expected shape \[\*, 4, \*, 16\]"):
        check_paged_cache(k_cache, k_cache, page_table, positions, 1, 4, 16)
    with pytest.raises(ValueError, match="v_cache: must be contiguous"):
        check_paged_cache(k_cache, k_cache.transpose(2, 3).contiguous().transpose(2, 3), page_table, positions,
                          1, 2, 16)
