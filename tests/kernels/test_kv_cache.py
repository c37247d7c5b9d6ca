"""The paged cache layout: the torch references, and where rope_and_cache_write puts each token.

The placement tests use identity rotation tables (cos 1, sin 0), so the written k is exactly k rounded to f16
and the whole cache can be compared bit for bit: every slot the page table names holds the token, every other
element still holds the poison written before the launch. An int8 cache is compared with the reference's
quantization of the same rows: quants within one (a compiler may fuse x * inverse + 1/2 into one rounding),
scales within 1e-6 relative, and the poison (quant -128, which the quantizer never produces, scale -1) kept
exactly everywhere else. The q4 references (4-bit blocks of 32 dims, kv_cache.py) are tested on their own here:
their packing on a hand-built row, their round-trip error, and the write and gather through the page table;
rope_and_cache_write's q4 path is compared with them in test_rope_kernel.py.
"""

from __future__ import annotations

import pytest
import torch

from replayllm.kernels.kv_cache import (check_cache_pair, check_paged_cache, dequantize_kv_q4_reference,
                                       gather_paged_cache_reference, paged_cache_write_reference,
                                       quantize_kv_q4_reference, quantize_kv_reference, round_trip_kv_reference)
from replayllm.kernels.rope import rope_and_cache_write

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
POISON = -1024.0  # exact in f16, far from any N(0, 1) sample
INT8_POISON = -128  # quants are in [-127, 127]
SCALE_POISON = -1.0  # scales are >= 0
Q4_POISON = 0  # both nibbles 0: nibbles are q + 8 in 1..15


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


def test_quantize_reference_and_the_gather_that_dequantizes():
    # amax 254 for exact arithmetic (scale 2): halves round up, floor(x / 2 + 1/2); a zero row: scale 0, quants 0
    x = torch.tensor([[-254.0, -3.0, 127.0, 62.5], [0.0, 0.0, 0.0, 0.0]])
    quants, scales = quantize_kv_reference(x)
    assert quants.tolist() == [[-127, -1, 64, 31], [0, 0, 0, 0]] and scales.tolist() == [2.0, 0.0]
    cache = quants.view(2, 1, 1, 4)  # two pages of one slot
    dense = gather_paged_cache_reference(cache, torch.tensor([1, 0], dtype=torch.int32), 2, scales.view(2, 1, 1))
    assert dense.tolist() == [[[0.0, 0.0, 0.0, 0.0], [-254.0, -2.0, 128.0, 62.0]]]


def test_q4_reference_packs_dim_j_low_and_dim_j_plus_half_high():
    # head_dim 128: byte j holds dims j and j + 64, which are two blocks apart (block i: dims 32i..32i+31).
    # Block maxima 7, 14, 0, 3.5 give scales 1, 2, 0, 0.5 and exact arithmetic; halves round up.
    x = torch.zeros(128)
    x[[0, 1, 2, 31]] = torch.tensor([3.0, 7.0, 0.5, -7.0])  # block 0: q 3, 7, 1, -7
    x[[32, 33, 34]] = torch.tensor([-14.0, 2.0, 14.0])  # block 1: q -7, 1, 7
    x[[96, 97, 98]] = torch.tensor([3.5, -0.75, 0.25])  # block 3: q 7, -1 (-1.5 rounds up), 1; block 2 zero
    packed, scales = quantize_kv_q4_reference(x)
    assert packed.dtype == torch.uint8 and packed.shape == (64,)
    assert scales.tolist() == [1.0, 2.0, 0.0, 0.5]
    expected = torch.full((64,), 8 | 8 << 4, dtype=torch.uint8)  # q 0 in both nibbles
    expected[[0, 1, 2, 31]] = torch.tensor([11 | 8 << 4, 15 | 8 << 4, 9 | 8 << 4, 1 | 8 << 4], dtype=torch.uint8)
    expected[[32, 33, 34]] = torch.tensor([1 | 15 << 4, 9 | 7 << 4, 15 | 9 << 4], dtype=torch.uint8)
    assert packed.tolist() == expected.tolist()
    back = x.clone()
    back[[2, 97, 98]] = torch.tensor([1.0, -0.5, 0.5])  # the three values that were not on the grid
    assert dequantize_kv_q4_reference(packed, scales).tolist() == back.tolist()


def test_q4_reference_stores_a_zero_block_as_scale_0_and_nibble_8():
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    x[0] = 0.0
    x[1, :32] = 0.0  # row 1: its first block (the low nibbles) zero, its second not
    packed, scales = quantize_kv_q4_reference(x)
    assert (packed[0] == 0x88).all() and scales[0].tolist() == [0.0, 0.0]
    assert (packed[1] & 15 == 8).all() and scales[1, 0] == 0.0 and scales[1, 1] > 0.0
    assert torch.equal(dequantize_kv_q4_reference(packed, scales)[:, :32], torch.zeros(2, 32))  # no NaN


def test_q4_reference_round_trip_is_within_half_a_step():
    # rows of very different magnitudes, and one block of each row much larger than the rest: every block has
    # its own step, so the small blocks keep their precision
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 128, generator=gen) * torch.tensor([1e-3, 1.0, 300.0])[:, None, None]
    x[..., 64:96] *= 50.0
    packed, scales = quantize_kv_q4_reference(x)
    assert packed.shape == (3, 2, 64) and scales.shape == (3, 2, 4)
    nibbles = torch.cat([packed & 15, packed >> 4], dim=-1)
    assert nibbles.min() >= 1 and nibbles.max() <= 15
    assert torch.equal(scales, x.unflatten(-1, (4, 32)).abs().amax(dim=-1) / 7.0)
    step = scales.double().repeat_interleave(32, dim=-1)
    error = (round_trip_kv_reference(x, "q4").double() - x.double()).abs()
    assert (error <= 0.5 * step * (1 + 1e-6)).all()
    assert (error > 0.25 * step).any()  # a real quantization, not the identity


def _poisoned_q4_cache(num_pages, num_kv_heads, page_size, head_dim):
    """k_cache, v_cache, k_scale, v_scale of a q4 cache, all poisoned."""
    shape = (num_pages, num_kv_heads, page_size)
    return (torch.full((*shape, head_dim // 2), Q4_POISON, dtype=torch.uint8),
            torch.full((*shape, head_dim // 2), Q4_POISON, dtype=torch.uint8),
            torch.full((*shape, head_dim // 32), SCALE_POISON), torch.full((*shape, head_dim // 32), SCALE_POISON))


def test_q4_write_and_gather_references_round_trip_through_the_page_table():
    # a prompt of 7 tokens written as prefill writes it (one row per token, one shared page-table row), then
    # gathered back across its pages: each token is its q4 round trip, and the slot after the last untouched
    gen = torch.Generator().manual_seed(5)
    tokens, hkv, dh, page_size = 7, 2, 64, 2
    row = torch.tensor([3, 0, 5, 1], dtype=torch.int32)
    k_cache, v_cache, k_scale, v_scale = _poisoned_q4_cache(6, hkv, page_size, dh)
    k, v = torch.randn(tokens, hkv, dh, generator=gen), torch.randn(tokens, hkv, dh, generator=gen)
    paged_cache_write_reference(k_cache, v_cache, row.expand(tokens, -1), torch.arange(tokens, dtype=torch.int32),
                                k, v, k_scale, v_scale)
    for cache, scale, x in ((k_cache, k_scale, k), (v_cache, v_scale, v)):
        dense = gather_paged_cache_reference(cache, row, tokens, scale)
        assert dense.shape == (hkv, tokens, dh)
        assert torch.equal(dense, round_trip_kv_reference(x, "q4").transpose(0, 1))
        assert (cache[1, :, 1] == Q4_POISON).all() and (scale[1, :, 1] == SCALE_POISON).all()  # token 7's slot
        assert int((scale != SCALE_POISON).sum()) == tokens * hkv * dh // 32  # only the tokens' slots written
    assert (k_cache[[2, 4]] == Q4_POISON).all()  # pages the row does not name


def _q4_pair(**change):
    """Arguments of check_cache_pair for a valid q4 cache (3 pages, 2 kv heads, page size 8, head_dim 64), with
    `change` applied."""
    return dict(k_cache=torch.zeros(3, 2, 8, 32, dtype=torch.uint8),
                v_cache=torch.zeros(3, 2, 8, 32, dtype=torch.uint8), num_kv_heads=2, head_dim=64,
                k_scale=torch.zeros(3, 2, 8, 2), v_scale=torch.zeros(3, 2, 8, 2)) | change


@pytest.mark.parametrize("bad, message", [
    (dict(k_cache=torch.zeros(3, 2, 8, 64, dtype=torch.uint8)), r"k_cache: expected shape \[\*, 2, \*, 32\]"),
    (dict(v_cache=torch.zeros(3, 2, 8, 64, dtype=torch.uint8)), r"v_cache: expected shape \[3, 2, 8, 32\]"),
    (dict(v_cache=torch.zeros(3, 2, 8, 32, dtype=torch.int8)), "v_cache: expected dtype torch.uint8"),
    (dict(k_scale=None, v_scale=None), r"q4 KV cache needs its scales \(k_scale, v_scale\)"),
    (dict(v_scale=None), "q4 KV cache needs its scales"),
    (dict(k_scale=torch.zeros(3, 2, 8)), r"k_scale: expected shape \[3, 2, 8, 2\]"),  # an int8 cache's scales
    (dict(v_scale=torch.zeros(3, 2, 8, 4)), r"v_scale: expected shape \[3, 2, 8, 2\]"),
    (dict(v_scale=torch.zeros(3, 2, 8, 2, dtype=torch.float16)), "v_scale: expected dtype torch.float32"),
    (dict(k_cache=torch.zeros(3, 2, 8, 48, dtype=torch.uint8), v_cache=torch.zeros(3, 2, 8, 48, dtype=torch.uint8),
          head_dim=96), "a q4 KV cache needs head_dim a multiple of 64, got 96"),
])
def test_check_cache_pair_names_what_a_q4_cache_lacks(bad, message):
    check_cache_pair(**_q4_pair())  # the valid pair passes
    with pytest.raises(ValueError, match=message):
        check_cache_pair(**_q4_pair(**bad))


def _identity_tables(max_ctx, rope_dim):
    return (torch.ones(max_ctx, rope_dim // 2, device=DEVICE), torch.zeros(max_ctx, rope_dim // 2, device=DEVICE))


def _poisoned_cache(num_pages, num_kv_heads, page_size, head_dim):
    shape = (num_pages, num_kv_heads, page_size, head_dim)
    return (torch.full(shape, POISON, dtype=torch.float16, device=DEVICE),
            torch.full(shape, POISON, dtype=torch.float16, device=DEVICE))


def _poisoned_int8_cache(num_pages, num_kv_heads, page_size, head_dim):
    """k_cache, v_cache, k_scale, v_scale of an int8 cache, all poisoned."""
    shape = (num_pages, num_kv_heads, page_size, head_dim)
    return (torch.full(shape, INT8_POISON, dtype=torch.int8, device=DEVICE),
            torch.full(shape, INT8_POISON, dtype=torch.int8, device=DEVICE),
            torch.full(shape[:3], SCALE_POISON, device=DEVICE), torch.full(shape[:3], SCALE_POISON, device=DEVICE))


def _placement_batch(page_size, dh, rope_dim):
    """A batch of 4 rows into a shuffled pool twice the size needed, at positions at the first and last slot of a
    page and in the last page, with identity tables."""
    gen = torch.Generator().manual_seed(page_size)
    batch, hq, hkv, max_pages = 4, 2, 2, 3
    num_pages = 2 * batch * max_pages  # a pool larger than needed: the table skips pages
    page_table = torch.randperm(num_pages, generator=gen)[: batch * max_pages].view(batch, max_pages)
    page_table = page_table.to(torch.int32).to(DEVICE)
    positions = torch.tensor([0, page_size - 1, page_size, max_pages * page_size - 1], dtype=torch.int32)
    positions = positions.to(DEVICE)
    q = torch.randn(batch, hq, dh, generator=gen).to(DEVICE)
    k = torch.randn(batch, hkv, dh, generator=gen).to(DEVICE)
    v = torch.randn(batch, hkv, dh, generator=gen).to(DEVICE)
    cos, sin = _identity_tables(max_pages * page_size, rope_dim)
    return dict(q=q, k=k, v=v, cos=cos, sin=sin, positions=positions, page_table=page_table, num_pages=num_pages)


@pytest.mark.parametrize("page_size, dh, rope_dim", [(1, 16, 16), (4, 24, 8), (16, 16, 16)])
def test_cache_write_lands_in_the_slot_the_page_table_names_and_nowhere_else(page_size, dh, rope_dim):
    # dh 24 and rope_dim 8: padded, masked blocks and the pass-through part of k
    b = _placement_batch(page_size, dh, rope_dim)
    batch, hkv = b["k"].shape[:2]
    k_cache, v_cache = _poisoned_cache(b["num_pages"], hkv, page_size, dh)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    rope_and_cache_write(b["q"], b["k"], b["v"], b["cos"], b["sin"], b["positions"], k_cache, v_cache,
                         b["page_table"], neox=False)
    paged_cache_write_reference(expected_k, expected_v, b["page_table"], b["positions"], b["k"], b["v"])
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)
    assert int((k_cache != POISON).sum()) == batch * hkv * dh  # exactly one slot per (row, kv head)


@pytest.mark.parametrize("page_size, dh, rope_dim", [(1, 16, 16), (4, 24, 8), (16, 16, 16)])
def test_int8_cache_write_lands_in_the_slot_the_page_table_names_and_nowhere_else(page_size, dh, rope_dim):
    b = _placement_batch(page_size, dh, rope_dim)
    batch, hkv = b["k"].shape[:2]
    k_cache, v_cache, k_scale, v_scale = cache = _poisoned_int8_cache(b["num_pages"], hkv, page_size, dh)
    expected = [t.clone() for t in cache]
    rope_and_cache_write(b["q"], b["k"], b["v"], b["cos"], b["sin"], b["positions"], k_cache, v_cache,
                         b["page_table"], neox=False, k_scale=k_scale, v_scale=v_scale)
    paged_cache_write_reference(expected[0], expected[1], b["page_table"], b["positions"], b["k"], b["v"],
                                expected[2], expected[3])
    for quants, expected_quants in ((k_cache, expected[0]), (v_cache, expected[1])):
        assert (quants.int() - expected_quants.int()).abs().max() <= 1
        assert torch.equal(quants == INT8_POISON, expected_quants == INT8_POISON)
        assert int((quants != INT8_POISON).sum()) == batch * hkv * dh  # exactly one slot per (row, kv head)
    for scales, expected_scales in ((k_scale, expected[2]), (v_scale, expected[3])):
        torch.testing.assert_close(scales, expected_scales, rtol=1e-6, atol=0)  # the poison kept exactly
        assert int((scales != SCALE_POISON).sum()) == batch * hkv


@pytest.mark.parametrize("page_size, dh, rope_dim", [(1, 64, 64), (4, 192, 32)])
def test_q4_cache_write_lands_in_the_slot_the_page_table_names_and_nowhere_else(page_size, dh, rope_dim):
    # dh 192: three blocks a half, padded to four in the kernel, whose cells must store nothing
    b = _placement_batch(page_size, dh, rope_dim)
    batch, hkv = b["k"].shape[:2]
    cache = [t.to(DEVICE) for t in _poisoned_q4_cache(b["num_pages"], hkv, page_size, dh)]
    expected = [t.clone() for t in cache]
    rope_and_cache_write(b["q"], b["k"], b["v"], b["cos"], b["sin"], b["positions"], cache[0], cache[1],
                         b["page_table"], neox=False, k_scale=cache[2], v_scale=cache[3])
    paged_cache_write_reference(*expected[:2], b["page_table"], b["positions"], b["k"], b["v"], *expected[2:])
    for packed, expected_packed in zip(cache[:2], expected[:2]):
        assert torch.equal(packed == Q4_POISON, expected_packed == Q4_POISON)
        assert int((packed != Q4_POISON).sum()) == batch * hkv * dh // 2  # exactly one slot per (row, kv head)
        nibbles = torch.stack([packed & 15, packed >> 4]).int()
        expected_nibbles = torch.stack([expected_packed & 15, expected_packed >> 4]).int()
        assert (nibbles - expected_nibbles).abs().max() <= 1  # a compiler may fuse x * inverse + 1/2
    for scales, expected_scales in zip(cache[2:], expected[2:]):
        torch.testing.assert_close(scales, expected_scales, rtol=1e-6, atol=0)  # the poison kept exactly
        assert int((scales != SCALE_POISON).sum()) == batch * hkv * dh // 32


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
