"""rope_and_cache_write: the rotation of q (in place) and of k (into the cache) in both pairings.

The torch reference is itself checked against an independent formulation, multiplication of complex numbers
by e^(i * position * frequency), so a shared misunderstanding of the pairing cannot pass both.
Metrics: q is f32, ||kernel - reference|| / ||reference|| < 1e-5; the cached k is f16, so each element must be
within one f16 ulp of the float64 result rounded to f16, and v must equal v rounded to f16 exactly. An int8
cache's quants must be within one of quantize_kv_reference's (a rounding tie may fall either way, the rotation
being f32) and its scales within 1e-6 relative; each dequantized value within half a quant step of the exact
value (plus f32 slack). A q4 cache is held to the same with quantize_kv_q4_reference, nibble by nibble and block
scale by block scale: the reference rotates in float64, the kernel in f32, so a block's max (and its scale) may
differ by an f32 ulp, and a nibble on a rounding tie may fall either way (almost none do).
Where the cache write lands is tested in test_kv_cache.py.
"""

from __future__ import annotations

import pytest
import torch

from replayllm.kernels.kv_cache import (KV_CACHE_DTYPES, dequantize_kv_q4_reference, gather_paged_cache_reference,
                                       kv_row_shape, quantize_kv_q4_reference, quantize_kv_reference)
from replayllm.kernels.rope import rope_and_cache_write, rope_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).norm() / expected.norm()).item()


def _angles(max_ctx: int, rope_dim: int, base: float = 10000.0) -> torch.Tensor:
    """[max_ctx, rope_dim/2] float64 rotation angles position * base^(-2i/rope_dim)."""
    freqs = base ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
    return torch.arange(max_ctx, dtype=torch.float64)[:, None] * freqs[None, :]


def _tables(max_ctx: int, rope_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = _angles(max_ctx, rope_dim)
    return angles.cos().float().to(DEVICE), angles.sin().float().to(DEVICE)


def _rotate_as_complex(x: torch.Tensor, positions: torch.Tensor, rope_dim: int, neox: bool) -> torch.Tensor:
    """Independent formulation: pair (a, b) is the complex number a + ib, rotated by e^(i angle)."""
    half = rope_dim // 2
    x64 = x.double().cpu()
    if neox:
        z = torch.complex(x64[..., :half], x64[..., half:rope_dim])
    else:
        z = torch.view_as_complex(x64[..., :rope_dim].reshape(*x.shape[:-1], half, 2).contiguous())
    angles = _angles(int(positions.max()) + 1, rope_dim)[positions.long().cpu()]  # [B, half]
    rotated = z * torch.polar(torch.ones_like(angles), angles)[:, None, :]
    out = x64.clone()
    if neox:
        out[..., :half], out[..., half:rope_dim] = rotated.real, rotated.imag
    else:
        out[..., :rope_dim] = torch.view_as_real(rotated).reshape(*x.shape[:-1], rope_dim)
    return out


def _assert_within_one_f16_ulp(actual: torch.Tensor, exact: torch.Tensor) -> None:
    """actual (f16) must be exact (float64) rounded to f16, give or take one f16 ulp."""
    actual, rounded = actual.double().cpu(), exact.half().double().cpu()
    ulp = torch.exp2(torch.floor(torch.log2(rounded.abs().clamp_min(2.0 ** -14))) - 10)
    assert ((actual - rounded).abs() <= ulp).all()


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("rope_dim", [16, 8])
def test_reference_matches_complex_rotation(neox, rope_dim):
    gen = torch.Generator().manual_seed(rope_dim)
    x = torch.randn(3, 2, 16, generator=gen)
    positions = torch.tensor([0, 5, 17], dtype=torch.int32)
    cos, sin = (t.cpu() for t in _tables(32, rope_dim))
    expected = _rotate_as_complex(x, positions, rope_dim, neox)
    assert _relative_error(rope_reference(x, cos, sin, positions, neox=neox), expected) < 1e-6
    assert torch.equal(rope_reference(x, cos, sin, positions, neox=neox)[..., rope_dim:], x[..., rope_dim:])


def test_the_two_pairings_differ():
    # guards the complex-rotation check against a layout it would accept for both modes
    x = torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([3], dtype=torch.int32)
    normal, neox = _rotate_as_complex(x, positions, 8, False), _rotate_as_complex(x, positions, 8, True)
    assert _relative_error(normal, neox) > 0.1


def _at_slots(t: torch.Tensor, page_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, ...]: what t (a cache [pages, Hkv, page_size, ...] or its scales [pages, Hkv, page_size, ...])
    holds in the slot of each row's position."""
    page_size = t.shape[2]
    return torch.stack([t[int(page_table[b, p // page_size]), :, p % page_size]
                        for b, p in enumerate(positions.tolist())])


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """A q4 cache's bytes [..., Dh/2] as their nibbles q + 8 [..., Dh] int32, in dim order (kv_cache.py)."""
    return torch.cat([packed & 15, packed >> 4], dim=-1).int()


def _run(batch, num_q_heads, num_kv_heads, head_dim, rope_dim, positions, neox, seed=0, page_size=4,
         kv_int8=False, kv_q4=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_q_heads, head_dim, generator=gen).to(DEVICE)
    k = torch.randn(batch, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    v = torch.randn(batch, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    max_pages = -(-(max(positions) + 1) // page_size)
    num_pages = batch * max_pages
    page_table = torch.randperm(num_pages, generator=gen).to(torch.int32).view(batch, max_pages).to(DEVICE)
    kv_type = "q4" if kv_q4 else "int8" if kv_int8 else "f16"
    row_shape, scale_shape = kv_row_shape(kv_type, head_dim)
    k_cache = torch.zeros(num_pages, num_kv_heads, page_size, *row_shape, dtype=KV_CACHE_DTYPES[kv_type],
                          device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    scales = {name: torch.zeros(*k_cache.shape[:3], *scale_shape, device=DEVICE)
              for name in ("k_scale", "v_scale")} if scale_shape is not None else {}
    positions = torch.tensor(positions, dtype=torch.int32, device=DEVICE)
    cos, sin = _tables(int(positions.max()) + 1, rope_dim)
    q_in, k_in, v_in = q.clone(), k.clone(), v.clone()
    rope_and_cache_write(q, k, v, cos, sin, positions, k_cache, v_cache, page_table, neox=neox, **scales)
    if scales:  # the raw quants (q4: packed bytes) and scales: the tests compare them, not the dequantized rows
        return dict(k_in=k_in, v_in=v_in, cos=cos, sin=sin, positions=positions,
                    k_quants=_at_slots(k_cache, page_table, positions),
                    v_quants=_at_slots(v_cache, page_table, positions),
                    k_scales=_at_slots(scales["k_scale"], page_table, positions),
                    v_scales=_at_slots(scales["v_scale"], page_table, positions))
    cached_k = torch.stack([gather_paged_cache_reference(k_cache, page_table[b], int(positions[b]) + 1)[:, -1]
                            for b in range(batch)])  # [B, Hkv, Dh]: the slot of each row's position
    cached_v = torch.stack([gather_paged_cache_reference(v_cache, page_table[b], int(positions[b]) + 1)[:, -1]
                            for b in range(batch)])
    return dict(q_in=q_in, k_in=k_in, v_in=v_in, q=q, k=k, v=v, cos=cos, sin=sin, positions=positions,
                cached_k=cached_k, cached_v=cached_v)


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("rope_dim", [32, 16])
def test_rotates_q_in_place_and_caches_rotated_k_and_v(neox, rope_dim):
    r = _run(batch=3, num_q_heads=4, num_kv_heads=2, head_dim=32, rope_dim=rope_dim, positions=[0, 9, 22],
             neox=neox)
    expected_q = rope_reference(r["q_in"], r["cos"], r["sin"], r["positions"], neox=neox)
    assert _relative_error(r["q"], expected_q) < 1e-5
    assert _relative_error(r["q"], _rotate_as_complex(r["q_in"], r["positions"], rope_dim, neox)) < 1e-5
    expected_k = _rotate_as_complex(r["k_in"], r["positions"], rope_dim, neox)
    _assert_within_one_f16_ulp(r["cached_k"], expected_k)
    assert torch.equal(r["cached_v"], r["v_in"].half().float())
    assert torch.equal(r["k"], r["k_in"]) and torch.equal(r["v"], r["v_in"])  # inputs k, v untouched


def test_position_zero_is_the_identity():
    r = _run(batch=2, num_q_heads=2, num_kv_heads=1, head_dim=16, rope_dim=16, positions=[0, 0], neox=False)
    assert torch.equal(r["q"], r["q_in"])
    assert torch.equal(r["cached_k"], r["k_in"].half().float())


def test_odd_head_dim_and_rope_dim_not_a_power_of_two():
    # head_dim 80 with rope_dim 48: blocks are padded to 64/32 and masked
    r = _run(batch=2, num_q_heads=3, num_kv_heads=1, head_dim=80, rope_dim=48, positions=[7, 30], neox=True)
    assert _relative_error(r["q"], _rotate_as_complex(r["q_in"], r["positions"], 48, True)) < 1e-5
    _assert_within_one_f16_ulp(r["cached_k"], _rotate_as_complex(r["k_in"], r["positions"], 48, True))
    assert torch.equal(r["cached_v"], r["v_in"].half().float())


@pytest.mark.parametrize("neox, head_dim, rope_dim", [(False, 32, 32), (True, 32, 16), (True, 80, 48)])
def test_int8_cache_holds_the_rotated_k_and_v_quantized(neox, head_dim, rope_dim):
    # head_dim 80: a padded block whose masked dims must not count towards the row's max
    r = _run(batch=3, num_q_heads=2, num_kv_heads=2, head_dim=head_dim, rope_dim=rope_dim, positions=[0, 9, 22],
             neox=neox, kv_int8=True)
    rotated_k = rope_reference(r["k_in"], r["cos"], r["sin"], r["positions"], neox=neox)
    exact_k = _rotate_as_complex(r["k_in"], r["positions"], rope_dim, neox)
    for name, rotated, exact in (("k", rotated_k, exact_k), ("v", r["v_in"], r["v_in"].double())):
        quants, scales = r[f"{name}_quants"].cpu(), r[f"{name}_scales"].cpu()
        expected_quants, expected_scales = quantize_kv_reference(rotated.cpu())
        assert (quants.int() - expected_quants.int()).abs().max() <= 1
        torch.testing.assert_close(scales, expected_scales, rtol=1e-6, atol=0)
        step = scales.double()[..., None]
        error = (quants.double() * step - exact.cpu()).abs()
        assert (error <= 0.5 * step + 1e-6 * exact.abs().amax(dim=-1, keepdim=True).cpu()).all()


def test_int8_cache_stores_a_row_of_zeros_as_zero_quants_and_scale():
    # amax 0: the inverse is taken as 0, not 127 / 0, so neither quants nor scale are NaN
    k, v = torch.zeros(2, 1, 16, device=DEVICE), torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(1))
    v = v.to(DEVICE)
    v[1] = 0.0
    k_cache = torch.full((1, 1, 4, 16), -128, dtype=torch.int8, device=DEVICE)
    v_cache = k_cache.clone()
    k_scale, v_scale = torch.full((1, 1, 4), -1.0, device=DEVICE), torch.full((1, 1, 4), -1.0, device=DEVICE)
    cos, sin = _tables(4, 16)
    positions, page_table = torch.tensor([1, 2], dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int32)
    rope_and_cache_write(torch.zeros(2, 1, 16, device=DEVICE), k, v, cos, sin, positions.to(DEVICE), k_cache,
                         v_cache, page_table.to(DEVICE), neox=False, k_scale=k_scale, v_scale=v_scale)
    assert (k_cache[0, 0, 1:3] == 0).all() and (k_scale[0, 0, 1:3] == 0.0).all()
    assert (v_cache[0, 0, 2] == 0).all() and v_scale[0, 0, 2] == 0.0
    assert v_scale[0, 0, 1] > 0.0  # the row that is not zero


@pytest.mark.parametrize("neox, head_dim, rope_dim", [(False, 64, 64), (True, 64, 32), (False, 128, 96),
                                                     (True, 128, 96), (True, 192, 192), (False, 256, 64)])
def test_q4_cache_holds_the_rotated_k_and_v_quantized(neox, head_dim, rope_dim):
    # rope_dim 96 of 128: pairs that straddle the two halves a byte joins (neox: partners 48 dims apart);
    # head_dim 192: three blocks a half, padded to four, whose masked cells must not be stored
    r = _run(batch=3, num_q_heads=1, num_kv_heads=2, head_dim=head_dim, rope_dim=rope_dim, positions=[0, 9, 22],
             neox=neox, kv_q4=True)
    rotated_k = rope_reference(r["k_in"], r["cos"], r["sin"], r["positions"], neox=neox)
    exact_k = _rotate_as_complex(r["k_in"], r["positions"], rope_dim, neox)
    for name, rotated, exact in (("k", rotated_k, exact_k), ("v", r["v_in"], r["v_in"].double())):
        packed, scales = r[f"{name}_quants"].cpu(), r[f"{name}_scales"].cpu()
        expected_packed, expected_scales = quantize_kv_q4_reference(rotated.cpu())
        nibbles, expected_nibbles = _nibbles(packed), _nibbles(expected_packed)
        assert (nibbles - expected_nibbles).abs().max() <= 1
        assert (nibbles != expected_nibbles).float().mean() <= 0.01  # a tie now and then, not a habit
        torch.testing.assert_close(scales, expected_scales, rtol=1e-6, atol=0)
        step = scales.double().repeat_interleave(32, dim=-1)  # each dim's block scale
        error = (dequantize_kv_q4_reference(packed, scales).double() - exact.cpu()).abs()
        assert (error <= 0.5 * step + 1e-6 * exact.abs().amax(dim=-1, keepdim=True).cpu()).all()


def test_q4_cache_stores_a_zero_block_as_nibble_8_and_scale_0():
    # amax 0: the inverse is taken as 0, not 7 / 0, so neither nibbles nor scale are NaN; byte 0 (the poison)
    # is never a q4 byte, nibbles being q + 8 in 1..15
    k, v = torch.zeros(2, 1, 64, device=DEVICE), torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(1))
    v = v.to(DEVICE)
    v[0, 0, 32:] = 0.0  # row 0: its second block (the high nibbles) zero, its first not
    v[1] = 0.0
    k_cache = torch.zeros((1, 1, 4, 32), dtype=torch.uint8, device=DEVICE)
    v_cache = k_cache.clone()
    k_scale, v_scale = torch.full((1, 1, 4, 2), -1.0, device=DEVICE), torch.full((1, 1, 4, 2), -1.0, device=DEVICE)
    cos, sin = _tables(4, 64)
    positions, page_table = torch.tensor([1, 2], dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int32)
    rope_and_cache_write(torch.zeros(2, 1, 64, device=DEVICE), k, v, cos, sin, positions.to(DEVICE), k_cache,
                         v_cache, page_table.to(DEVICE), neox=False, k_scale=k_scale, v_scale=v_scale)
    assert (k_cache[0, 0, 1:3] == 0x88).all() and (k_scale[0, 0, 1:3] == 0.0).all()
    assert (v_cache[0, 0, 2] == 0x88).all() and (v_scale[0, 0, 2] == 0.0).all()
    assert (v_cache[0, 0, 1] >> 4 == 8).all() and v_scale[0, 0, 1, 1] == 0.0
    assert v_scale[0, 0, 1, 0] > 0.0 and (v_cache[0, 0, 1] & 15 != 8).any()  # the block that is not zero
    assert (k_cache[0, 0, ::3] == 0).all() and (k_scale[0, 0, ::3] == -1.0).all()  # slots 0 and 3 untouched


def test_q4_cache_needs_head_dim_a_multiple_of_64():
    # 96: each half would be one and a half blocks
    q, k = torch.zeros(1, 2, 96), torch.zeros(1, 1, 96)
    k_cache, k_scale = torch.zeros(2, 1, 4, 48, dtype=torch.uint8), torch.zeros(2, 1, 4, 3)
    cos, sin = torch.zeros(8, 48), torch.zeros(8, 48)
    positions, page_table = torch.zeros(1, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="a q4 KV cache needs head_dim a multiple of 64, got 96"):
        rope_and_cache_write(q, k, k.clone(), cos, sin, positions, k_cache, k_cache.clone(), page_table, neox=True,
                             k_scale=k_scale, v_scale=k_scale.clone())


def test_rotation_preserves_relative_position():
    # q_m . k_n depends only on m - n: the property RoPE exists for
    gen = torch.Generator().manual_seed(9)
    q, k = torch.randn(1, 1, 32, generator=gen), torch.randn(1, 1, 32, generator=gen)
    cos, sin = (t.cpu() for t in _tables(64, 32))

    def score(m, n):
        qm = rope_reference(q, cos, sin, torch.tensor([m], dtype=torch.int32), neox=False)
        kn = rope_reference(k, cos, sin, torch.tensor([n], dtype=torch.int32), neox=False)
        return (qm * kn).sum().item()

    assert score(10, 4) == pytest.approx(score(40, 34), rel=1e-5)
    assert score(10, 4) != pytest.approx(score(10, 5), rel=1e-3)


def _int8_cache(**change):
    """Arguments of a valid int8 cache of test_rejects_bad_arguments' shapes, with `change` applied."""
    return dict(k_cache=torch.zeros(4, 2, 4, 16, dtype=torch.int8), v_cache=torch.zeros(4, 2, 4, 16, dtype=torch.int8),
                k_scale=torch.zeros(4, 2, 4), v_scale=torch.zeros(4, 2, 4)) | change


@pytest.mark.parametrize("bad, message", [
    (dict(q=torch.zeros(2, 4, 16, dtype=torch.float64)), "q: expected dtype torch.float32"),
    (dict(k=torch.zeros(2, 3, 16)), r"v: expected shape \[2, 3, 16\]"),
    (dict(cos=torch.zeros(8, 12), sin=torch.zeros(8, 12)), "rope_dim 24, must be in 2..head_dim"),
    (dict(positions=torch.zeros(2, dtype=torch.int64)), "positions: expected dtype torch.int32"),
    (dict(page_table=torch.zeros(3, 2, dtype=torch.int32)), r"page_table: expected shape \[2, \*\]"),
    (dict(k_cache=torch.zeros(4, 2, 3, 16, dtype=torch.float16),
          v_cache=torch.zeros(4, 2, 3, 16, dtype=torch.float16)), "page size .* must be a power of two"),
    (dict(v_cache=torch.zeros(4, 2, 4, 16, dtype=torch.float32)), "v_cache: expected dtype torch.float16"),
    (_int8_cache(k_scale=None, v_scale=None), r"an int8 KV cache needs its scales \(k_scale, v_scale\)"),
    (_int8_cache(v_scale=None), "an int8 KV cache needs its scales"),
    (dict(k_scale=torch.zeros(4, 2, 4), v_scale=torch.zeros(4, 2, 4)),
     "k_scale, v_scale belong to an int8 or q4 KV cache"),
    (_int8_cache(k_scale=torch.zeros(4, 2, 8)), r"k_scale: expected shape \[4, 2, 4\]"),
    (_int8_cache(v_scale=torch.zeros(4, 2, 4, dtype=torch.float16)), "v_scale: expected dtype torch.float32"),
    (_int8_cache(v_cache=torch.zeros(4, 2, 4, 16, dtype=torch.float16)), "v_cache: expected dtype torch.int8"),
])
def test_rejects_bad_arguments(bad, message):
    args = dict(q=torch.zeros(2, 4, 16), k=torch.zeros(2, 2, 16), v=torch.zeros(2, 2, 16),
                cos=torch.zeros(8, 8), sin=torch.zeros(8, 8), positions=torch.zeros(2, dtype=torch.int32),
                k_cache=torch.zeros(4, 2, 4, 16, dtype=torch.float16),
                v_cache=torch.zeros(4, 2, 4, 16, dtype=torch.float16),
                page_table=torch.zeros(2, 2, dtype=torch.int32))
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        rope_and_cache_write(**args, neox=False)


@pytest.mark.gpu
@pytest.mark.parametrize("neox", [False, True])
def test_real_shapes(neox):
    r = _run(batch=4, num_q_heads=32, num_kv_heads=8, head_dim=128, rope_dim=128, positions=[0, 15, 1000, 4095],
             neox=neox, page_size=16)
    assert _relative_error(r["q"], _rotate_as_complex(r["q_in"], r["positions"], 128, neox)) < 1e-5
    _assert_within_one_f16_ulp(r["cached_k"], _rotate_as_complex(r["k_in"], r["positions"], 128, neox))
    assert torch.equal(r["cached_v"], r["v_in"].half().float())


@pytest.mark.gpu
def test_int8_real_shapes():
    r = _run(batch=4, num_q_heads=32, num_kv_heads=8, head_dim=128, rope_dim=128, positions=[0, 15, 1000, 4095],
             neox=True, page_size=16, kv_int8=True)
    rotated_k = rope_reference(r["k_in"], r["cos"], r["sin"], r["positions"], neox=True)
    for name, rotated in (("k", rotated_k), ("v", r["v_in"])):
        expected_quants, expected_scales = quantize_kv_reference(rotated)
        assert (r[f"{name}_quants"].int() - expected_quants.int()).abs().max() <= 1
        torch.testing.assert_close(r[f"{name}_scales"], expected_scales, rtol=1e-6, atol=0)


@pytest.mark.gpu
def test_q4_real_shapes():
    r = _run(batch=4, num_q_heads=32, num_kv_heads=8, head_dim=128, rope_dim=128, positions=[0, 15, 1000, 4095],
             neox=True, page_size=16, kv_q4=True)
    rotated_k = rope_reference(r["k_in"], r["cos"], r["sin"], r["positions"], neox=True)
    for name, rotated in (("k", rotated_k), ("v", r["v_in"])):
        expected_packed, expected_scales = quantize_kv_q4_reference(rotated)
        nibbles, expected_nibbles = _nibbles(r[f"{name}_quants"]), _nibbles(expected_packed)
        assert (nibbles - expected_nibbles).abs().max() <= 1
        assert (nibbles != expected_nibbles).float().mean() <= 0.01
        torch.testing.assert_close(r[f"{name}_scales"], expected_scales, rtol=1e-6, atol=0)


@pytest.mark.parametrize("num_rows", [0, 2, 5])
def test_rows_past_num_rows_are_left_alone(num_rows):
    # A prefill graph's padding rows: neither rotated nor cached, and their positions (here past the tables)
    # and page-table rows beyond the first entry are never read.
    gen = torch.Generator().manual_seed(num_rows)
    batch, page_size = 5, 4
    q, k, v = (torch.randn(batch, h, 16, generator=gen).to(DEVICE) for h in (2, 1, 1))
    positions = torch.tensor([3, 6, 1000, 2000, 3000], dtype=torch.int32, device=DEVICE)
    positions[:num_rows] = torch.arange(num_rows, dtype=torch.int32) * 2 + 1
    page_table = torch.tensor([[1, 0, 2]] * batch, dtype=torch.int32, device=DEVICE)
    k_cache = torch.full((3, 1, page_size, 16), -5.0, dtype=torch.float16, device=DEVICE)
    v_cache = torch.full_like(k_cache, -5.0)
    cos, sin = _tables(16, 16)
    q_in = q.clone()
    limit = torch.tensor([num_rows], dtype=torch.int32, device=DEVICE)
    rope_and_cache_write(q, k, v, cos, sin, positions, k_cache, v_cache, page_table, neox=False, num_rows=limit)
    real = positions[:num_rows]
    assert torch.equal(q[num_rows:], q_in[num_rows:])
    expected = rope_reference(q_in[:num_rows], cos, sin, real, neox=False)
    if num_rows:
        assert _relative_error(q[:num_rows], expected) < 1e-5
    written = torch.zeros(3, page_size, dtype=torch.bool)
    for b, position in enumerate(real.tolist()):
        page, slot = int(page_table[b, position // page_size]), position % page_size
        written[page, slot] = True
        assert torch.equal(v_cache[page, 0, slot].cpu(), v[b, 0].half().cpu())
    untouched = ~written
    assert (k_cache[:, 0].cpu()[untouched] == -5.0).all() and (v_cache[:, 0].cpu()[untouched] == -5.0).all()


@pytest.mark.parametrize("num_rows", [0, 2])
def test_int8_rows_past_num_rows_write_no_quants_and_no_scales(num_rows):
    # the padding rows read row 0's position: a store they made would land in row 0's slot or its scale
    gen = torch.Generator().manual_seed(num_rows)
    batch, page_size = 5, 4
    q, k, v = (torch.randn(batch, h, 16, generator=gen).to(DEVICE) for h in (2, 1, 1))
    positions = torch.tensor([1, 6, 1000, 2000, 3000], dtype=torch.int32, device=DEVICE)
    page_table = torch.tensor([[1, 0, 2]] * batch, dtype=torch.int32, device=DEVICE)
    caches = [torch.full((3, 1, page_size, 16), -128, dtype=torch.int8, device=DEVICE) for _ in range(2)]
    scales = [torch.full((3, 1, page_size), -1.0, device=DEVICE) for _ in range(2)]
    cos, sin = _tables(16, 16)
    limit = torch.tensor([num_rows], dtype=torch.int32, device=DEVICE)
    rope_and_cache_write(q, k, v, cos, sin, positions, *caches, page_table, neox=False, num_rows=limit,
                         k_scale=scales[0], v_scale=scales[1])
    real = positions[:num_rows]
    rotated_k = rope_reference(k[:num_rows], cos, sin, real, neox=False)
    written = torch.zeros(3, page_size, dtype=torch.bool)
    for cache, scale, x in ((caches[0], scales[0], rotated_k), (caches[1], scales[1], v[:num_rows])):
        expected_quants, expected_scales = quantize_kv_reference(x.cpu())
        for b, position in enumerate(real.tolist()):
            page, slot = int(page_table[b, position // page_size]), position % page_size
            written[page, slot] = True
            assert (cache[page, 0, slot].cpu().int() - expected_quants[b, 0].int()).abs().max() <= 1
            torch.testing.assert_close(scale[page, 0, slot].cpu(), expected_scales[b, 0], rtol=1e-6, atol=0)
        assert (cache[:, 0].cpu()[~written] == -128).all() and (scale[:, 0].cpu()[~written] == -1.0).all()
    assert int(written.sum()) == num_rows


@pytest.mark.parametrize("num_rows", [0, 2])
def test_q4_rows_past_num_rows_write_no_bytes_and_no_scales(num_rows):
    # as the int8 test: a store by a padding row would land in row 0's slot or its scales; byte 0 is never
    # a q4 byte (nibbles are 1..15)
    gen = torch.Generator().manual_seed(num_rows)
    batch, page_size = 5, 4
    q, k, v = (torch.randn(batch, h, 64, generator=gen).to(DEVICE) for h in (2, 1, 1))
    positions = torch.tensor([1, 6, 1000, 2000, 3000], dtype=torch.int32, device=DEVICE)
    page_table = torch.tensor([[1, 0, 2]] * batch, dtype=torch.int32, device=DEVICE)
    caches = [torch.zeros((3, 1, page_size, 32), dtype=torch.uint8, device=DEVICE) for _ in range(2)]
    scales = [torch.full((3, 1, page_size, 2), -1.0, device=DEVICE) for _ in range(2)]
    cos, sin = _tables(16, 64)
    limit = torch.tensor([num_rows], dtype=torch.int32, device=DEVICE)
    rope_and_cache_write(q, k, v, cos, sin, positions, *caches, page_table, neox=False, num_rows=limit,
                         k_scale=scales[0], v_scale=scales[1])
    real = positions[:num_rows]
    rotated_k = rope_reference(k[:num_rows], cos, sin, real, neox=False)
    written = torch.zeros(3, page_size, dtype=torch.bool)
    for cache, scale, x in ((caches[0], scales[0], rotated_k), (caches[1], scales[1], v[:num_rows])):
        expected_packed, expected_scales = quantize_kv_q4_reference(x.cpu())
        for b, position in enumerate(real.tolist()):
            page, slot = int(page_table[b, position // page_size]), position % page_size
            written[page, slot] = True
            assert (_nibbles(cache[page, 0, slot].cpu()) - _nibbles(expected_packed[b, 0])).abs().max() <= 1
            torch.testing.assert_close(scale[page, 0, slot].cpu(), expected_scales[b, 0], rtol=1e-6, atol=0)
        assert (cache[:, 0].cpu()[~written] == 0).all() and (scale[:, 0].cpu()[~written] == -1.0).all()
    assert int(written.sum()) == num_rows
