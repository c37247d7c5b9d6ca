"""paged_prefill_attention against a dense float64 causal softmax(q k^T) v over the gathered cache.

Metric: max |kernel - reference| / max |reference| < 5e-3 (the kernel rounds q and the probabilities to f16:
2e-4..3e-4 on these data; a missing causal offset, a wrong GQA head or a wrong page is off by 1e-1 or more).
The page table is shuffled and points into a pool with spare pages; every slot past the sequence end (the
tail of its last page, the table's pages beyond it) and every page outside the table holds NaN, so a key read
past start+T or through a wrong page shows as NaN. The output is poisoned with NaN before each launch.
An int8 cache is the same cache quantized (kv_cache.quantize_kv_reference), its unwritten slots holding quant
-128 and a NaN scale; the reference dequantizes it, so the kernel's error is still only its f16 roundings and
the same tolerance holds.
A q4 cache likewise (kv_cache.quantize_kv_q4_reference), its unwritten slots holding byte 0 (nibbles of -8, which
no write produces) and NaN scales. The kernel rounds each dequantized value (relative to its tile's largest scale)
to f16 too: 3e-4..6e-4 on these data, still a tenth of the tolerance; a block read with a neighbour's scale, or
the two halves of a byte swapped, is off by 1e-1 or more.
"""

from __future__ import annotations

import pytest
import torch

from replayllm.kernels.kv_cache import quantize_kv_q4_reference, quantize_kv_reference
from replayllm.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_reference

TOLERANCE = 5e-3


def _max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _setup(num_tokens, start, num_q_heads, num_kv_heads, head_dim, page_size, device, seed, spare_pages=2):
    """q for positions start..start+T-1 and a cache holding keys 0..start+T-1 through a shuffled page table;
    NaN everywhere else in the cache."""
    gen = torch.Generator().manual_seed(seed)
    kv_len = start + num_tokens
    table_pages = -(-kv_len // page_size) + spare_pages
    num_pages = 2 * table_pages + 1
    shape = (num_pages, num_kv_heads, page_size, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=torch.float16)
    v_cache = torch.full(shape, float("nan"), dtype=torch.float16)
    page_table_row = torch.randperm(num_pages, generator=gen)[:table_pages].to(torch.int32)
    for pos in range(kv_len):
        page, slot = int(page_table_row[pos // page_size]), pos % page_size
        k_cache[page, :, slot] = torch.randn(num_kv_heads, head_dim, generator=gen).half()
        v_cache[page, :, slot] = torch.randn(num_kv_heads, head_dim, generator=gen).half()
    q = torch.randn(num_tokens, num_q_heads, head_dim, generator=gen)
    return q.to(device), k_cache.to(device), v_cache.to(device), page_table_row.to(device)


def _quantized(cache):
    """(quants, scales) of _setup's f16 cache as an int8 one; its NaN slots get quant -128 and a NaN scale."""
    written = ~cache.isnan().any(dim=-1)  # [pages, Hkv, page_size]
    quants, scales = quantize_kv_reference(cache.float().nan_to_num())
    quants[~written], scales[~written] = -128, float("nan")
    return quants, scales


def _setup_int8(*args, **kwargs):
    """_setup's q, cache pair and page table with the cache quantized to int8, and the scales as keywords."""
    q, k_cache, v_cache, page_table_row = _setup(*args, **kwargs)
    (k_quants, k_scale), (v_quants, v_scale) = _quantized(k_cache), _quantized(v_cache)
    return (q, k_quants, v_quants, page_table_row), dict(k_scale=k_scale, v_scale=v_scale)


def _quantized_q4(cache):
    """(packed, scales) of _setup's f16 cache as a q4 one; its NaN slots get byte 0 and NaN scales."""
    written = ~cache.isnan().any(dim=-1)  # [pages, Hkv, page_size]
    packed, scales = quantize_kv_q4_reference(cache.float().nan_to_num())
    packed[~written], scales[~written] = 0, float("nan")
    return packed, scales


def _setup_q4(*args, **kwargs):
    """_setup's q, cache pair and page table with the cache quantized to q4, and the scales as keywords."""
    q, k_cache, v_cache, page_table_row = _setup(*args, **kwargs)
    (k_packed, k_scale), (v_packed, v_scale) = _quantized_q4(k_cache), _quantized_q4(v_cache)
    return (q, k_packed, v_packed, page_table_row), dict(k_scale=k_scale, v_scale=v_scale)


def _run(q, k_cache, v_cache, page_table_row, start, scale=None, **options):
    out = torch.full(q.shape, float("nan"), device=q.device)
    assert paged_prefill_attention(q, k_cache, v_cache, page_table_row, start, out, scale, **options) is out
    return out


def test_reference_matches_torch_sdpa():
    q, k_cache, v_cache, page_table_row = _setup(9, 11, 4, 2, 16, 4, "cpu", seed=0)
    expected = paged_prefill_attention_reference(q, k_cache, v_cache, page_table_row, 11, scale=0.3)
    k, v = (c[page_table_row[:5].long()].permute(1, 0, 2, 3).reshape(2, 20, 16).double()
            for c in (k_cache, v_cache))
    visible = torch.arange(20)[None, :] <= 11 + torch.arange(9)[:, None]  # [T, keys]
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.double().transpose(0, 1), k, v, attn_mask=visible, scale=0.3, enable_gqa=True).transpose(0, 1)
    assert _max_relative_error(expected, sdpa) < 1e-6  # the reference returns f32


@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("num_kv_heads", [4, 2])
@pytest.mark.parametrize("num_tokens, start", [(1, 0), (1, 20), (7, 0), (7, 20), (37, 0), (37, 20)])
def test_matches_reference(num_tokens, start, num_kv_heads, head_dim, device):
    args = _setup(num_tokens, start, 4, num_kv_heads, head_dim, 16, device, seed=num_tokens + start + head_dim)
    out = _run(*args, start)
    assert out.isfinite().all()
    assert _max_relative_error(out, paged_prefill_attention_reference(*args, start)) < TOLERANCE


@pytest.mark.parametrize("start", [17, 21])
@pytest.mark.parametrize("page_size, block_m, block_n", [(16, 16, 16), (4, 16, 32), (32, 32, 16), (16, 64, 16)])
def test_many_query_blocks_and_key_tiles(page_size, block_m, block_n, start, device):
    # 37 queries: several query blocks, unmasked tiles before the diagonal and diagonal tiles not aligned to
    # the blocks; key tiles larger and smaller than a page. From position 17 a block's last query is the first
    # key of a tile, which the diagonal walk must not stop short of.
    args = _setup(37, start, 4, 2, 32, page_size, device, seed=page_size + block_m + block_n + start)
    out = _run(*args, start, block_m=block_m, block_n=block_n)
    assert out.isfinite().all()
    assert _max_relative_error(out, paged_prefill_attention_reference(*args, start)) < TOLERANCE


def test_first_query_of_a_sequence_returns_v_of_token_zero(device):
    q, k_cache, v_cache, page_table_row = _setup(5, 0, 4, 2, 16, 16, device, seed=3)
    out = _run(q, k_cache, v_cache, page_table_row, 0)
    v0 = v_cache[int(page_table_row[0]), :, 0].float().repeat_interleave(2, dim=0)  # [Hq, Dh]
    assert torch.equal(out[0], v0)  # one visible key: p = 1 exactly


def test_two_chunks_equal_one_chunk(device):
    # chunked prefill: the second chunk sees the first chunk's keys through the cache
    q, k_cache, v_cache, page_table_row = _setup(37, 0, 4, 2, 32, 16, device, seed=4)
    whole = _run(q, k_cache, v_cache, page_table_row, 0, block_m=16, block_n=16)
    first = _run(q[:20], k_cache, v_cache, page_table_row, 0, block_m=16, block_n=16)
    second = _run(q[20:], k_cache, v_cache, page_table_row, 20, block_m=16, block_n=16)
    assert _max_relative_error(torch.cat([first, second]), whole) < 1e-5


@pytest.mark.parametrize("rows, start", [(7, 0), (21, 9), (1, 30), (0, 12)])
def test_a_span_on_the_device_attends_its_rows_only(rows, start, device):
    # What a prefill graph launches: q of a 48-row bucket, of which the span's first `rows` are the chunk. Those
    # rows equal the host-span launch on q[:rows] bit for bit; the padding rows keep the output's poison.
    # The cache holds keys 0..start+rows-1 only (NaN past them), so a padding query block that loaded a key
    # would show too.
    q, k_cache, v_cache, page_table_row = _setup(max(rows, 1), start, 4, 2, 32, 16, device, seed=rows + start)
    padded_q = torch.randn(48, 4, 32, device=device)
    padded_q[:rows] = q[:rows]
    span = torch.tensor([start, rows], dtype=torch.int32, device=device)
    out = _run(padded_q, k_cache, v_cache, page_table_row, span, block_m=16, block_n=16)
    assert out[rows:].isnan().all()
    if rows:
        exact = _run(q[:rows], k_cache, v_cache, page_table_row, start, block_m=16, block_n=16)
        assert torch.equal(out[:rows], exact)
        assert _max_relative_error(out[:rows], paged_prefill_attention_reference(
            q[:rows], k_cache, v_cache, page_table_row, start)) < TOLERANCE


def test_q_and_out_as_strided_views(device):
    # prefill passes q as a view into its fused [T, (Hq + 2 Hkv) Dh] projection output
    q, k_cache, v_cache, page_table_row = _setup(19, 5, 4, 2, 16, 16, device, seed=5)
    qkv = torch.randn(19, (4 + 2 * 2) * 16, device=device)
    qkv[:, :64] = q.reshape(19, 64)
    q_view = qkv[:, :64].view(19, 4, 16)
    wide = torch.full((19, 6, 16), -7.0, device=device)
    out = wide[:, 1:5]
    paged_prefill_attention(q_view, k_cache, v_cache, page_table_row, 5, out)
    assert _max_relative_error(out, paged_prefill_attention_reference(q, k_cache, v_cache, page_table_row,
                                                                      5)) < TOLERANCE
    assert (wide[:, 0] == -7.0).all() and (wide[:, 5] == -7.0).all()


def test_large_scores_stay_finite(device):
    # every key shares a large component along q: scores of ~180 (natural units) that overflow exp without the
    # running max, while their differences stay moderate so the softmax is not one-hot
    q, k_cache, v_cache, page_table_row = _setup(24, 10, 2, 1, 32, 16, device, seed=6)
    k_cache[..., 0] += 20.0
    q[..., 0] = 50.0
    out = _run(q, k_cache, v_cache, page_table_row, 10)
    assert out.isfinite().all()
    assert _max_relative_error(out, paged_prefill_attention_reference(q, k_cache, v_cache, page_table_row,
                                                                      10)) < TOLERANCE


@pytest.mark.parametrize("head_dim", [8, 48])  # below the 16 a dot needs, and not a power of two: padded
def test_head_dims_that_are_not_a_power_of_two(head_dim, device):
    args = _setup(21, 5, 4, 2, head_dim, 16, device, seed=head_dim)
    out = _run(*args, 5)
    assert _max_relative_error(out, paged_prefill_attention_reference(*args, 5)) < TOLERANCE


def test_explicit_scale(device):
    args = _setup(13, 3, 4, 4, 16, 16, device, seed=7)
    out = _run(*args, 3, scale=0.05)
    assert _max_relative_error(out, paged_prefill_attention_reference(*args, 3, scale=0.05)) < TOLERANCE


@pytest.mark.parametrize("num_tokens, start, num_kv_heads, head_dim, page_size, block_m, block_n", [
    (7, 0, 4, 32, 16, 16, 16),  # one diagonal tile
    (37, 21, 2, 32, 4, 16, 32),  # GQA, several query blocks, unmasked tiles, tiles larger than a page
    (37, 17, 1, 48, 16, 32, 16),  # a padded head dim; key tiles smaller than the query block
])
def test_int8_cache_matches_the_dequantizing_reference(num_tokens, start, num_kv_heads, head_dim, page_size,
                                                       block_m, block_n, device):
    args, scales = _setup_int8(num_tokens, start, 4, num_kv_heads, head_dim, page_size, device,
                               seed=num_tokens + start + head_dim)
    out = _run(*args, start, block_m=block_m, block_n=block_n, **scales)
    assert out.isfinite().all()
    assert _max_relative_error(out, paged_prefill_attention_reference(*args, start, **scales)) < TOLERANCE


def test_int8_cache_of_small_values(device):
    # value scales of ~2e-5: probabilities times scales alone would underflow f16 (its normal range starts at 6e-5)
    q, k_cache, v_cache, page_table_row = _setup(16, 496, 2, 1, 32, 16, device, seed=12)
    (k_quants, k_scale), (v_quants, v_scale) = _quantized(k_cache), _quantized(v_cache * 1e-3)
    args, scales = (q, k_quants, v_quants, page_table_row), dict(k_scale=k_scale, v_scale=v_scale)
    out = _run(*args, 496, **scales)
    assert _max_relative_error(out, paged_prefill_attention_reference(*args, 496, **scales)) < TOLERANCE


def test_int8_span_on_the_device_attends_its_rows_only(device):
    # the prefill graph's launch over an int8 cache: padding rows keep their poison, real rows match the reference
    args, scales = _setup_int8(21, 9, 4, 2, 32, 16, device, seed=11)
    q = args[0]
    padded_q = torch.randn(48, 4, 32, device=device)
    padded_q[:21] = q
    span = torch.tensor([9, 21], dtype=torch.int32, device=device)
    out = _run(padded_q, *args[1:], span, block_m=16, block_n=16, **scales)
    assert out[21:].isnan().all()
    assert _max_relative_error(out[:21], paged_prefill_attention_reference(*args, 9, **scales)) < TOLERANCE


def test_int8_scales_are_applied(device):
    # guards the comparison above against a kernel and a reference that both ignore a scale: with either one
    # replaced by 1.0 (quants of up to 127 read as values) the output is far off
    args, scales = _setup_int8(19, 5, 4, 2, 32, 16, device, seed=10)
    expected = paged_prefill_attention_reference(*args, 5, **scales)
    for name in ("k_scale", "v_scale"):
        out = _run(*args, 5, block_m=16, block_n=16, **(scales | {name: torch.ones_like(scales[name])}))
        assert _max_relative_error(out, expected) > 0.3, name


@pytest.mark.parametrize("num_tokens, start, num_kv_heads, head_dim, page_size, block_m, block_n", [
    (7, 0, 4, 64, 16, 16, 16),  # one diagonal tile; each half of a row one block of 32
    (37, 21, 2, 128, 4, 16, 32),  # GQA, several query blocks, unmasked tiles, tiles larger than a page
    (37, 17, 1, 64, 16, 32, 16),  # key tiles smaller than the query block
    (1, 40, 2, 128, 16, 64, 64),  # one query after a prefix, the default blocks
    (21, 5, 2, 192, 8, 16, 16),  # halves of 96 dims, padded to 128
])
def test_q4_cache_matches_the_dequantizing_reference(num_tokens, start, num_kv_heads, head_dim, page_size,
                                                     block_m, block_n, device):
    args, scales = _setup_q4(num_tokens, start, 4, num_kv_heads, head_dim, page_size, device,
                             seed=num_tokens + start + head_dim)
    out = _run(*args, start, block_m=block_m, block_n=block_n, **scales)
    assert out.isfinite().all()
    assert _max_relative_error(out, paged_prefill_attention_reference(*args, start, **scales)) < TOLERANCE


@pytest.mark.parametrize("factor", [1e-6, 1e5])
def test_q4_cache_of_small_and_large_values(factor, device):
    # values of 1e-6 (nibble * scale below f16's normal range) or 1e5 (past its 65504): f16 of the values themselves
    # would be off by 1e-2 or overflow; relative to the tile's largest scale they keep f16's precision
    q, k_cache, v_cache, page_table_row = _setup(16, 96, 2, 1, 64, 16, device, seed=14)
    (k_packed, k_scale), (v_packed, v_scale) = _quantized_q4(k_cache), _quantized_q4(v_cache.float() * factor)
    args, scales = (q, k_packed, v_packed, page_table_row), dict(k_scale=k_scale, v_scale=v_scale)
    out = _run(*args, 96, block_m=16, block_n=16, **scales)
    assert _max_relative_error(out, paged_prefill_attention_reference(*args, 96, **scales)) < TOLERANCE


def test_q4_span_on_the_device_attends_its_rows_only(device):
    # the prefill graph's launch over a q4 cache: padding rows keep their poison, real rows match the reference
    args, scales = _setup_q4(21, 9, 4, 2, 64, 16, device, seed=15)
    q = args[0]
    padded_q = torch.randn(48, 4, 64, device=device)
    padded_q[:21] = q
    span = torch.tensor([9, 21], dtype=torch.int32, device=device)
    out = _run(padded_q, *args[1:], span, block_m=16, block_n=16, **scales)
    assert out[21:].isnan().all()
    assert _max_relative_error(out[:21], paged_prefill_attention_reference(*args, 9, **scales)) < TOLERANCE


def test_q4_blocks_keep_their_own_scales(device):
    # Each block of 32 dims of K and V 4x the magnitude of the one before: the kernel matches the reference, and
    # guards the comparison against a kernel and a reference that agree on a wrong scale. With either scale
    # replaced by 1.0 (nibbles read as values), or each block given its neighbour's scale, the output is far off.
    q, k_cache, v_cache, page_table_row = _setup(19, 5, 4, 2, 128, 16, device, seed=16)
    magnitudes = (4.0 ** torch.arange(4, device=device)).repeat_interleave(32) / 8  # [Dh]: 1/8 .. 8
    (k_packed, k_scale), (v_packed, v_scale) = (_quantized_q4(cache.float() * magnitudes)
                                                for cache in (k_cache, v_cache))
    args, scales = (q / magnitudes, k_packed, v_packed, page_table_row), dict(k_scale=k_scale, v_scale=v_scale)
    expected = paged_prefill_attention_reference(*args, 5, **scales)
    assert _max_relative_error(_run(*args, 5, block_m=16, block_n=16, **scales), expected) < TOLERANCE
    for name in ("k_scale", "v_scale"):
        for wrong in (torch.ones_like(scales[name]), scales[name].roll(1, dims=-1)):
            out = _run(*args, 5, block_m=16, block_n=16, **(scales | {name: wrong}))
            assert _max_relative_error(out, expected) > 0.3, name


def _cpu_args(**change):
    q, k_cache, v_cache, page_table_row = _setup(8, 4, 4, 2, 16, 4, "cpu", seed=8, spare_pages=0)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, page_table_row=page_table_row, start=4,
                out=torch.empty(8, 4, 16)) | change


@pytest.mark.parametrize("change, message", [
    (dict(q=torch.zeros(8, 4, 16, dtype=torch.float16)), "q: expected dtype torch.float32"),
    (dict(q=torch.zeros(8, 16, 4).transpose(1, 2)), "q: the last dimension must have stride 1"),
    (dict(q=torch.zeros(0, 4, 16), out=torch.zeros(0, 4, 16)), "at least one query token"),
    (dict(q=torch.zeros(8, 4, 512), out=torch.zeros(8, 4, 512)), "head_dim 512 is not supported"),
    (dict(q=torch.zeros(8, 3, 16), out=torch.zeros(8, 3, 16)), r"q heads \(3\) must be a multiple"),
    (dict(out=torch.zeros(8, 2, 16)), r"out: expected shape \[8, 4, 16\]"),
    (dict(v_cache=torch.zeros(8, 2, 4, 16)), "v_cache: expected dtype torch.float16"),
    (dict(k_cache=torch.zeros(8, 2, 3, 16).half(), v_cache=torch.zeros(8, 2, 3, 16).half()),
     "page size .* must be a power of two"),
    (dict(page_table_row=torch.zeros(3, dtype=torch.int64)), "page_table_row: expected dtype torch.int32"),
    (dict(start=-1), "start must be a non-negative integer"),
    (dict(start=5), r"start \+ T = 5 \+ 8 = 13 tokens exceed the 12 tokens"),
    (dict(block_m=48), "block_m must be a power of two in 16..256"),
    (dict(block_n=8), "block_n must be a power of two in 16..256"),
    (dict(num_warps=3), "num_warps must be one of"),
])
def test_rejects_bad_arguments(change, message):
    with pytest.raises(ValueError, match=message):
        paged_prefill_attention(**_cpu_args(**change))


def _int8_cache(**change):
    """An int8 cache pair and its scales of _cpu_args' shapes, with `change` applied."""
    return dict(k_cache=torch.zeros(7, 2, 4, 16, dtype=torch.int8), v_cache=torch.zeros(7, 2, 4, 16, dtype=torch.int8),
                k_scale=torch.zeros(7, 2, 4), v_scale=torch.zeros(7, 2, 4)) | change


@pytest.mark.parametrize("change, message", [
    (_int8_cache(k_scale=None, v_scale=None), r"an int8 KV cache needs its scales \(k_scale, v_scale\)"),
    (_int8_cache(k_scale=None), "an int8 KV cache needs its scales"),
    (dict(k_scale=torch.zeros(7, 2, 4), v_scale=torch.zeros(7, 2, 4)),
     "k_scale, v_scale belong to an int8 or q4 KV cache; this one is f16"),
    (_int8_cache(v_scale=torch.zeros(7, 2, 8)), r"v_scale: expected shape \[7, 2, 4\]"),
    (_int8_cache(k_scale=torch.zeros(7, 2, 4, dtype=torch.float64)), "k_scale: expected dtype torch.float32"),
    (_int8_cache(k_scale=torch.zeros(7, 4, 2).transpose(1, 2)), "k_scale: must be contiguous"),
    (_int8_cache(v_cache=torch.zeros(7, 2, 4, 16, dtype=torch.float16)), "v_cache: expected dtype torch.int8"),
])
def test_rejects_bad_int8_arguments(change, message):
    with pytest.raises(ValueError, match=message):
        paged_prefill_attention(**_cpu_args(**change))



def _q4_args(**change):
    """_cpu_args with head_dim 64 and a q4 cache pair and its scales, with `change` applied."""
    return _cpu_args(q=torch.zeros(8, 4, 64), out=torch.zeros(8, 4, 64),
                     k_cache=torch.zeros(7, 2, 4, 32, dtype=torch.uint8),
                     v_cache=torch.zeros(7, 2, 4, 32, dtype=torch.uint8),
                     k_scale=torch.zeros(7, 2, 4, 2), v_scale=torch.zeros(7, 2, 4, 2)) | change


@pytest.mark.parametrize("change, message", [
    (dict(q=torch.zeros(8, 4, 48), out=torch.zeros(8, 4, 48), k_cache=torch.zeros(7, 2, 4, 24, dtype=torch.uint8),
          v_cache=torch.zeros(7, 2, 4, 24, dtype=torch.uint8)),
     "a q4 KV cache needs head_dim a multiple of 64, got 48"),
    (dict(k_scale=None, v_scale=None), r"q4 KV cache needs its scales \(k_scale, v_scale\)"),
    (dict(v_scale=None), r"q4 KV cache needs its scales \(k_scale, v_scale\)"),
    (dict(k_cache=torch.zeros(7, 2, 4, 64, dtype=torch.uint8)), r"k_cache: expected shape \[\*, \*, \*, 32\]"),
    (dict(v_cache=torch.zeros(7, 2, 4, 32, dtype=torch.float16)), "v_cache: expected dtype torch.uint8"),
    (dict(v_scale=torch.zeros(7, 2, 4)), r"v_scale: expected shape \[7, 2, 4, 2\]"),
    (dict(k_scale=torch.zeros(7, 2, 4, 2, dtype=torch.float16)), "k_scale: expected dtype torch.float32"),
])
def test_rejects_bad_q4_arguments(change, message):
    with pytest.raises(ValueError, match=message):
        paged_prefill_attention(**_q4_args(**change))


@pytest.mark.gpu
@pytest.mark.parametrize("num_kv_heads", [8, 32])
@pytest.mark.parametrize("num_tokens, start", [(600, 0), (300, 700)])
def test_real_shapes(num_tokens, start, num_kv_heads):
    args = _setup(num_tokens, start, 32, num_kv_heads, 128, 16, "cuda", seed=9)
    out = _run(*args, start)
    assert out.isfinite().all()
    assert _max_relative_error(out, paged_prefill_attention_reference(*args, start)) < TOLERANCE


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens, start", [(600, 0), (300, 700)])
def test_int8_real_shapes(num_tokens, start):
    args, scales = _setup_int8(num_tokens, start, 32, 8, 128, 16, "cuda", seed=13)
    out = _run(*args, start, **scales)
    assert out.isfinite().all()
    assert _max_relative_error(out, paged_prefill_attention_reference(*args, start, **scales)) < TOLERANCE


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens, start", [(600, 0), (300, 700)])
def test_q4_real_shapes(num_tokens, start):
    args, scales = _setup_q4(num_tokens, start, 32, 8, 128, 16, "cuda", seed=17)
    out = _run(*args, start, **scales)
    assert out.isfinite().all()
    assert _max_relative_error(out, paged_prefill_attention_reference(*args, start, **scales)) < TOLERANCE
