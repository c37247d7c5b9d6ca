"""paged_decode_attention against a dense float64 softmax(q k^T) v over the gathered cache.

Metric: ||kernel - reference|| / ||reference|| < 1e-5 over the whole output (the kernel keeps f32 accuracy; a
plain f16 or TF32 product, or a split merged twice or missed, is off by 1e-4 or more). The output and the
workspace are poisoned with NaN before each launch, so an unwritten output element or a partial result read
from an unused split fails.
Small splits (16 tokens) and pages (4 tokens) make short sequences cross page and split boundaries.
An int8 (or q4) cache is the f16 one quantized (quantize_kv_reference, quantize_kv_q4_reference); the reference
dequantizes it, and the kernel must match that as closely as it matches an f16 cache.
"""

from __future__ import annotations

import pytest
import torch

from replayllm.errors import InvalidParameterError
from replayllm.kernels.decode_attention import (
    DecodeAttentionWorkspace,
    paged_decode_attention,
    paged_decode_attention_reference,
)
from replayllm.kernels.kv_cache import (
    gather_paged_cache_reference,
    paged_cache_write_reference,
    quantize_kv_q4_reference,
    quantize_kv_reference,
)
from replayllm.kernels.rope import rope_and_cache_write, rope_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = 1e-5


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).norm() / expected.norm()).item()


def _setup(lengths, num_q_heads, num_kv_heads, head_dim, page_size, max_context, seed, q_scale=1.0):
    """A random cache with shuffled pages (pool twice the size needed) and q for sequences of `lengths`."""
    gen = torch.Generator().manual_seed(seed)
    batch, max_pages = len(lengths), -(-max_context // page_size)
    num_pages = 2 * batch * max_pages
    shape = (num_pages, num_kv_heads, page_size, head_dim)
    k_cache = torch.randn(shape, generator=gen).half().to(DEVICE)
    v_cache = torch.randn(shape, generator=gen).half().to(DEVICE)
    page_table = torch.randperm(num_pages, generator=gen)[: batch * max_pages].view(batch, max_pages)
    page_table = page_table.to(torch.int32).to(DEVICE)
    q = (torch.randn(batch, num_q_heads, head_dim, generator=gen) * q_scale).to(DEVICE)
    positions = torch.tensor([n - 1 for n in lengths], dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, page_table, positions


def _int8_cache(k_cache, v_cache):
    """The f16 cache quantized as an int8 cache holds it: (k_cache, v_cache, k_scale, v_scale)."""
    (k_q, k_scale), (v_q, v_scale) = quantize_kv_reference(k_cache), quantize_kv_reference(v_cache)
    return k_q, v_q, k_scale, v_scale


def _q4_cache(k_cache, v_cache):
    """The f16 cache quantized as a q4 cache holds it: (k_cache, v_cache, k_scale, v_scale)."""
    (k_q, k_scale), (v_q, v_scale) = quantize_kv_q4_reference(k_cache), quantize_kv_q4_reference(v_cache)
    return k_q, v_q, k_scale, v_scale


def _quantized(kind, k_cache, v_cache):
    """(k_cache, v_cache, the scales as keyword arguments) of the f16 cache as a cache of `kind` holds it."""
    if kind == "f16":
        return k_cache, v_cache, {}
    k_q, v_q, k_scale, v_scale = (_int8_cache if kind == "int8" else _q4_cache)(k_cache, v_cache)
    return k_q, v_q, dict(k_scale=k_scale, v_scale=v_scale)


def _run(q, k_cache, v_cache, page_table, positions, workspace, scale, **options):
    out = torch.full(q.shape, float("nan"), device=q.device)
    for t in (workspace.part_max, workspace.part_sum, workspace.part_acc):
        t.fill_(float("nan"))
    assert paged_decode_attention(q, k_cache, v_cache, page_table, positions, scale, out, workspace, **options) is out
    return out


def test_reference_matches_torch_sdpa():
    q, k_cache, v_cache, page_table, positions = _setup([5, 13], 4, 2, 8, 4, 16, seed=0)
    expected = paged_decode_attention_reference(q, k_cache, v_cache, page_table, positions, 0.3)
    for b, n in enumerate([5, 13]):
        k = gather_paged_cache_reference(k_cache, page_table[b], n).double()  # [Hkv, n, Dh]
        v = gather_paged_cache_reference(v_cache, page_table[b], n).double()
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q[b].double()[:, None, :], k, v, scale=0.3, enable_gqa=True)[:, 0]
        assert _relative_error(expected[b], sdpa) < 1e-7  # the reference returns f32


@pytest.mark.parametrize("group_size", [1, 3, 4])
def test_matches_reference_for_gqa_groups_and_mixed_lengths(group_size):
    # lengths: one token; the last slot of a page; the first of the next; one split exactly; several splits
    lengths = [1, 4, 5, 16, 17, 53]
    num_kv_heads, head_dim = 2, 16
    args = _setup(lengths, group_size * num_kv_heads, num_kv_heads, head_dim, 4, 64, seed=group_size)
    workspace = DecodeAttentionWorkspace.create(len(lengths), group_size * num_kv_heads, head_dim, 64, DEVICE,
                                                split_tokens=16)
    assert workspace.num_splits == 4
    out = _run(*args, workspace, head_dim ** -0.5)
    expected = paged_decode_attention_reference(*args, head_dim ** -0.5)
    assert _relative_error(out, expected) < TOLERANCE
    for b in range(len(lengths)):  # each row on its own: a short row must not hide behind a long one
        assert _relative_error(out[b], expected[b]) < TOLERANCE


def test_length_one_returns_v_of_the_only_token():
    q, k_cache, v_cache, page_table, positions = _setup([1], 2, 1, 16, 4, 16, seed=3)
    workspace = DecodeAttentionWorkspace.create(1, 2, 16, 16, DEVICE, split_tokens=16)
    out = _run(q, k_cache, v_cache, page_table, positions, workspace, 0.25)
    v0 = v_cache[int(page_table[0, 0]), 0, 0].float()
    assert torch.allclose(out[0], v0.expand(2, 16), rtol=0, atol=0)


def test_large_scores_stay_finite():
    # scores of several hundred: a softmax without the running max would overflow exp
    args = _setup([40, 7], 4, 2, 32, 8, 64, seed=4, q_scale=60.0)
    workspace = DecodeAttentionWorkspace.create(2, 4, 32, 64, DEVICE, split_tokens=16)
    out = _run(*args, workspace, 32 ** -0.5)
    assert out.isfinite().all()
    assert _relative_error(out, paged_decode_attention_reference(*args, 32 ** -0.5)) < TOLERANCE


def test_several_tiles_per_split_rescale_the_running_sums():
    # split 128 with 64-token tiles: the online softmax must rescale earlier tiles when the max grows
    lengths = [64, 65, 130, 200]
    args = _setup(lengths, 2, 1, 16, 16, 256, seed=12, q_scale=8.0)
    workspace = DecodeAttentionWorkspace.create(4, 2, 16, 256, DEVICE, split_tokens=128)
    out = _run(*args, workspace, 0.25)
    expected = paged_decode_attention_reference(*args, 0.25)
    for b in range(len(lengths)):
        assert _relative_error(out[b], expected[b]) < TOLERANCE


def test_head_dim_not_a_power_of_two_and_page_size_one():
    args = _setup([3, 20], 6, 2, 24, 1, 32, seed=5)
    workspace = DecodeAttentionWorkspace.create(2, 6, 24, 32, DEVICE, split_tokens=16)
    out = _run(*args, workspace, 0.2)
    assert _relative_error(out, paged_decode_attention_reference(*args, 0.2)) < TOLERANCE


def _assert_same_copy(fused, separate):
    """The attention kernel's quantized copy against quantize_activations(out): the kernel quantizes its result
    as it holds it in registers, and on an H100 that differed from the stored out in the last bit of some values
    (scales a few ulps apart at head_dim 32), so quants may differ by one and scales by f32 rounding; the block
    sums to f32 rounding (each kernel adds a block's values in the order its layout gives)."""
    from replayllm.kernels.int8_activations import wide_values

    assert (wide_values(fused.q) - wide_values(separate.q)).abs().max() <= 1
    assert torch.allclose(fused.scale, separate.scale, rtol=1e-6, atol=0)
    assert torch.allclose(fused.block_sum, separate.block_sum, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("wide", [False, True], ids=["int8", "16bit"])
@pytest.mark.parametrize("head_dim", [32, 96])  # 96: the head's blocks do not fill BLOCK_D (128)
def test_quantized_copy_equals_quantize_activations_of_the_output(wide, head_dim):
    """The merge's int8 or 16-bit copy of out (as [B, Hq * Dh]) is what quantize_activations makes of it, to the
    last bit of a value (_assert_same_copy)."""
    from replayllm.kernels.int8_activations import QuantizedActivations, quantize_activations, wide_values

    args = _setup([5, 40], 4, 2, head_dim, 4, 64, seed=11, q_scale=2.0)
    workspace = DecodeAttentionWorkspace.create(2, 4, head_dim, 64, DEVICE, split_tokens=16)
    out = torch.full(args[0].shape, float("nan"), device=DEVICE)
    fused = QuantizedActivations.allocate(2, 4 * head_dim, DEVICE, wide=wide)
    paged_decode_attention(*args, 0.3, out, workspace, out_q8=fused)
    assert _relative_error(out, paged_decode_attention_reference(*args, 0.3)) < TOLERANCE
    separate = quantize_activations(out.view(2, -1), QuantizedActivations.allocate(2, 4 * head_dim, DEVICE, wide=wide))
    assert wide_values(fused.q).abs().max() == (32512 if wide else 127)
    _assert_same_copy(fused, separate)


@pytest.mark.parametrize("block_n, num_warps", [(16, 2), (32, 8)])
def test_other_launch_shapes_give_the_same_result(block_n, num_warps):
    args = _setup([9, 70], 4, 2, 32, 4, 96, seed=13)
    workspace = DecodeAttentionWorkspace.create(2, 4, 32, 96, DEVICE, split_tokens=32)
    out = torch.full(args[0].shape, float("nan"), device=DEVICE)
    paged_decode_attention(*args, 0.3, out, workspace, block_n=block_n, num_warps=num_warps)
    assert _relative_error(out, paged_decode_attention_reference(*args, 0.3)) < TOLERANCE
    with pytest.raises(ValueError, match="block_n must be 16, 32 or 64"):
        paged_decode_attention(*args, 0.3, out, workspace, block_n=64)  # larger than a 32-token split


def test_merge_of_more_splits_than_one_pass_holds():
    """The merge takes 16 splits a pass and merges the passes' maxima online: 37 splits of 16 tokens (3 passes,
    the last partly used), against a sequence of 1 split in the same batch; the V tile loaded beside the K tile
    (early_v) gives the same result."""
    args = _setup([590, 7], 4, 4, 32, 8, 640, seed=17, q_scale=3.0)
    workspace = DecodeAttentionWorkspace.create(2, 4, 32, 640, DEVICE, split_tokens=16)
    assert workspace.num_splits == 40
    expected = paged_decode_attention_reference(*args, 0.3)
    assert _relative_error(_run(*args, workspace, 0.3), expected) < TOLERANCE
    early = torch.full(args[0].shape, float("nan"), device=DEVICE)
    paged_decode_attention(*args, 0.3, early, workspace, early_v=True)
    assert _relative_error(early, expected) < TOLERANCE


@pytest.mark.parametrize("group_size", [1, 4])
def test_the_last_split_merges_in_the_same_launch(group_size):
    """fused_merge: the last split of each (sequence, kv head) to finish merges all of them. Mixed lengths (1,
    2 and 37 splits of 16 tokens: several merge passes), GQA groups, with the quantized copy; three launches in a
    row, so the counters must be back at zero after each (a count left over would merge early, or never)."""
    from replayllm.kernels.int8_activations import QuantizedActivations, quantize_activations

    args = _setup([7, 20, 590], 4 * group_size, 4, 32, 8, 640, seed=19 + group_size, q_scale=3.0)
    workspace = DecodeAttentionWorkspace.create(3, 4 * group_size, 32, 640, DEVICE, split_tokens=16)
    expected = paged_decode_attention_reference(*args, 0.3)
    for _ in range(3):
        for t in (workspace.part_max, workspace.part_sum, workspace.part_acc):  # a merge too early reads NaN
            t.fill_(float("nan"))
        out = torch.full(args[0].shape, float("nan"), device=DEVICE)
        fused = QuantizedActivations.allocate(3, 4 * group_size * 32, DEVICE, wide=True)
        paged_decode_attention(*args, 0.3, out, workspace, out_q8=fused, fused_merge=True)
        assert _relative_error(out, expected) < TOLERANCE
        assert int(workspace.counters.abs().sum()) == 0
    separate = quantize_activations(out.view(3, -1), QuantizedActivations.allocate(3, 4 * group_size * 32, DEVICE,
                                                                                   wide=True))
    _assert_same_copy(fused, separate)
    two_launches = torch.full_like(out, float("nan"))
    paged_decode_attention(*args, 0.3, two_launches, workspace)
    assert torch.allclose(out, two_launches, rtol=1e-6, atol=1e-6)


def _rope_tables(max_context, half_rope, seed):
    gen = torch.Generator().manual_seed(seed)
    angles = torch.rand(max_context, half_rope, generator=gen, dtype=torch.float64) * 6.3
    return angles.cos().float().to(DEVICE), angles.sin().float().to(DEVICE)


@pytest.mark.parametrize("neox, half_rope, group_size, fused_merge", [
    (False, 16, 1, False), (True, 16, 4, True), (False, 12, 4, True), (True, 10, 1, True)])
def test_new_token_rotated_and_cached_in_the_attention_launch(neox, half_rope, group_size, fused_merge):
    """new_token: q unrotated, the new k and v not yet cached; the launch must give what rope_and_cache_write then
    attention give, leave the same cache and leave q as it was. Lengths 1, 16 (the token at the end of a split),
    17 (alone in a new split and page), 40 (3 splits); rope_dim below head_dim (passthrough dims); both
    pairings; with the merge in the same launch or not, and with the 16-bit copy."""
    from replayllm.kernels.decode_attention import NewToken
    from replayllm.kernels.int8_activations import QuantizedActivations

    lengths, hkv, dh = [1, 16, 17, 40], 2, 32
    hq = hkv * group_size
    q, k_cache, v_cache, page_table, positions = _setup(lengths, hq, hkv, dh, 8, 64, seed=23 + half_rope, q_scale=2.0)
    gen = torch.Generator().manual_seed(5)
    k_new, v_new = (torch.randn(len(lengths), hkv, dh, generator=gen).to(DEVICE) for _ in range(2))
    cos, sin = _rope_tables(64, half_rope, seed=half_rope)
    workspace = DecodeAttentionWorkspace.create(4, hq, dh, 64, DEVICE, split_tokens=16)

    q_rot, k_cache_sep, v_cache_sep = q.clone(), k_cache.clone(), v_cache.clone()
    rope_and_cache_write(q_rot, k_new, v_new, cos, sin, positions, k_cache_sep, v_cache_sep, page_table, neox=neox)
    expected = paged_decode_attention_reference(q_rot, k_cache_sep, v_cache_sep, page_table, positions, 0.3)
    separate_q8 = QuantizedActivations.allocate(4, hq * dh, DEVICE, wide=True)
    separate = torch.full_like(q, float("nan"))
    paged_decode_attention(q_rot, k_cache_sep, v_cache_sep, page_table, positions, 0.3, separate, workspace,
                           out_q8=separate_q8)

    q_in = q.clone()
    for t in (workspace.part_max, workspace.part_sum, workspace.part_acc):
        t.fill_(float("nan"))
    out = torch.full_like(q, float("nan"))
    fused_q8 = QuantizedActivations.allocate(4, hq * dh, DEVICE, wide=True)
    paged_decode_attention(q, k_cache, v_cache, page_table, positions, 0.3, out, workspace, out_q8=fused_q8,
                           fused_merge=fused_merge, new_token=NewToken(k_new, v_new, cos, sin, neox))
    assert torch.equal(q, q_in)
    for cache, cache_sep in ((k_cache, k_cache_sep), (v_cache, v_cache_sep)):
        assert (cache.float() - cache_sep.float()).abs().max().item() <= 1e-3  # an f16 rounding at most
    assert _relative_error(out, expected) < TOLERANCE
    assert torch.allclose(out, separate, rtol=1e-5, atol=1e-6)
    ok = torch.equal(fused_q8.q, separate_q8.q) or (fused_q8.q.long() - separate_q8.q.long()).abs().max() <= 1
    assert ok and torch.allclose(fused_q8.scale, separate_q8.scale, rtol=1e-5)
    if fused_merge:
        assert int(workspace.counters.abs().sum()) == 0


def test_new_token_is_checked():
    from replayllm.kernels.decode_attention import NewToken

    q, k_cache, v_cache, page_table, positions = _setup([5], 4, 2, 32, 4, 32, seed=3)
    ws = DecodeAttentionWorkspace.create(1, 4, 32, 32, DEVICE, split_tokens=16)
    cos, sin = _rope_tables(32, 16, seed=1)
    k, v = torch.zeros(1, 2, 32, device=DEVICE), torch.zeros(1, 2, 32, device=DEVICE)
    for token, message in ((NewToken(k[:, :1], v, cos, sin, False), "new_token.k"),
                           (NewToken(k, v, cos, sin[:, :8], False), "new_token.sin"),
                           (NewToken(k, v, torch.zeros(32, 17, device=DEVICE), torch.zeros(32, 17, device=DEVICE),
                                     False), "rope_dim 34")):
        with pytest.raises(ValueError, match=message):
            paged_decode_attention(q, k_cache, v_cache, page_table, positions, 0.3, torch.zeros_like(q), ws,
                                   new_token=token)


@pytest.mark.parametrize("group_size, head_dim, fused_merge, early_v", [
    (1, 32, False, False), (4, 32, True, True), (3, 24, True, False), (2, 32, False, True)])
def test_int8_cache_matches_the_dequantized_reference(group_size, head_dim, fused_merge, early_v):
    """lengths: one token; a page boundary; one split exactly; one token into a second split; several splits. The
    per-token scales must be read at the same slot as the tokens, through shuffled pages."""
    lengths = [1, 5, 16, 17, 53]
    q, k_cache, v_cache, page_table, positions = _setup(lengths, 2 * group_size, 2, head_dim, 4, 64,
                                                        seed=31 + group_size, q_scale=2.0)
    k_q, v_q, k_scale, v_scale = _int8_cache(k_cache, v_cache)
    workspace = DecodeAttentionWorkspace.create(len(lengths), 2 * group_size, head_dim, 64, DEVICE, split_tokens=16)
    out = _run(q, k_q, v_q, page_table, positions, workspace, 0.3, k_scale=k_scale, v_scale=v_scale,
               fused_merge=fused_merge, early_v=early_v)
    expected = paged_decode_attention_reference(q, k_q, v_q, page_table, positions, 0.3, k_scale, v_scale)
    for b in range(len(lengths)):
        assert _relative_error(out[b], expected[b]) < TOLERANCE


def test_int8_cache_scales_are_applied_to_scores_and_values():
    """The int8 result is the f16 cache's up to the quantization (small, not zero); with either cache's scales
    replaced by ones (a kernel that ignored them) it is far off."""
    args = _setup([9, 40], 4, 2, 32, 4, 64, seed=37, q_scale=2.0)
    q, k_cache, v_cache, page_table, positions = args
    k_q, v_q, k_scale, v_scale = _int8_cache(k_cache, v_cache)
    workspace = DecodeAttentionWorkspace.create(2, 4, 32, 64, DEVICE, split_tokens=16)
    int8 = _run(q, k_q, v_q, page_table, positions, workspace, 0.3, k_scale=k_scale, v_scale=v_scale)
    expected = paged_decode_attention_reference(q, k_q, v_q, page_table, positions, 0.3, k_scale, v_scale)
    assert _relative_error(int8, expected) < TOLERANCE
    assert 1e-4 < _relative_error(int8, _run(*args, workspace, 0.3)) < 0.05
    ones = torch.ones_like(k_scale)
    for k_s, v_s in ((ones, v_scale), (k_scale, ones)):
        unscaled = _run(q, k_q, v_q, page_table, positions, workspace, 0.3, k_scale=k_s, v_scale=v_s)
        assert _relative_error(unscaled, expected) > 0.5


def test_int8_cache_with_the_quantized_copy():
    from replayllm.kernels.int8_activations import QuantizedActivations, quantize_activations

    q, k_cache, v_cache, page_table, positions = _setup([5, 40], 4, 2, 32, 4, 64, seed=41, q_scale=2.0)
    k_q, v_q, k_scale, v_scale = _int8_cache(k_cache, v_cache)
    workspace = DecodeAttentionWorkspace.create(2, 4, 32, 64, DEVICE, split_tokens=16)
    expected = paged_decode_attention_reference(q, k_q, v_q, page_table, positions, 0.3, k_scale, v_scale)
    for fused_merge, wide in ((False, False), (True, True)):
        fused = QuantizedActivations.allocate(2, 4 * 32, DEVICE, wide=wide)
        out = _run(q, k_q, v_q, page_table, positions, workspace, 0.3, k_scale=k_scale, v_scale=v_scale,
                   out_q8=fused, fused_merge=fused_merge)
        assert _relative_error(out, expected) < TOLERANCE
        _assert_same_copy(fused, quantize_activations(out.view(2, -1),
                                                      QuantizedActivations.allocate(2, 4 * 32, DEVICE, wide=wide)))


@pytest.mark.parametrize("case, message", [
    ("int8 without scales", "an int8 KV cache needs its scales"),
    ("f16 with scales", "k_scale, v_scale belong to an int8 or q4 KV cache"),
    ("scales of the wrong shape", r"v_scale: expected shape \[16, 1, 4\]"),
    ("int8 with new_token", "new_token .* cannot fill an int8 KV cache"),
])
def test_int8_cache_rejects_bad_arguments(case, message):
    from replayllm.kernels.decode_attention import NewToken

    q, k_cache, v_cache, page_table, positions = (t.cpu() for t in _setup([3], 2, 1, 16, 4, 32, seed=43))
    k_q, v_q, k_scale, v_scale = _int8_cache(k_cache, v_cache)
    caches, options = {
        "int8 without scales": ((k_q, v_q), {}),
        "f16 with scales": ((k_cache, v_cache), dict(k_scale=k_scale, v_scale=v_scale)),
        "scales of the wrong shape": ((k_q, v_q), dict(k_scale=k_scale, v_scale=v_scale[:, :, :2])),
        "int8 with new_token": ((k_q, v_q), dict(k_scale=k_scale, v_scale=v_scale, new_token=NewToken(
            torch.zeros(1, 1, 16), torch.zeros(1, 1, 16), torch.zeros(32, 8), torch.zeros(32, 8), False))),
    }[case]
    workspace = DecodeAttentionWorkspace.create(1, 2, 16, 32, "cpu", split_tokens=16)
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(q, *caches, page_table, positions, 0.25, torch.empty_like(q), workspace, **options)


def test_fused_merge_needs_the_counters():
    args = _setup([5], 2, 2, 32, 4, 32, seed=3)
    ws = DecodeAttentionWorkspace.create(1, 2, 32, 32, DEVICE)
    bare = DecodeAttentionWorkspace(ws.split_tokens, ws.part_max, ws.part_sum, ws.part_acc)
    with pytest.raises(ValueError, match="counters"):
        paged_decode_attention(*args, 0.3, torch.zeros_like(args[0]), bare, fused_merge=True)


def test_int8_copy_needs_heads_of_whole_blocks():
    from replayllm.kernels.int8_activations import QuantizedActivations

    args = _setup([3], 2, 2, 24, 4, 16, seed=2)
    workspace = DecodeAttentionWorkspace.create(1, 2, 24, 16, DEVICE, split_tokens=16)
    with pytest.raises(ValueError, match="head_dim a multiple of 32"):
        paged_decode_attention(*args, 0.3, torch.empty_like(args[0]), workspace,
                               out_q8=QuantizedActivations.allocate(1, 64, DEVICE))


def test_default_split_and_larger_workspace_batch():
    args = _setup([150, 9], 4, 1, 16, 16, 256, seed=6)
    workspace = DecodeAttentionWorkspace.create(4, 4, 16, 256, DEVICE)  # built for the batch-4 bucket
    assert workspace.split_tokens == 128 and workspace.num_splits == 2
    out = _run(*args, workspace, 0.25)
    assert _relative_error(out, paged_decode_attention_reference(*args, 0.25)) < TOLERANCE


def test_q_as_view_of_a_fused_qkv_row():
    # the batch-1 decode step passes q as a view into its fused [1, (Hq + 2 Hkv) Dh] projection output
    q, k_cache, v_cache, page_table, positions = _setup([30], 4, 2, 16, 4, 32, seed=7)
    qkv = torch.randn(1, (4 + 2 * 2) * 16, device=DEVICE)
    qkv[:, :64] = q.view(1, 64)
    q_view = qkv[:, :64].view(1, 4, 16)
    workspace = DecodeAttentionWorkspace.create(1, 4, 16, 32, DEVICE, split_tokens=16)
    out = _run(q_view, k_cache, v_cache, page_table, positions, workspace, 0.25)
    assert _relative_error(out, paged_decode_attention_reference(q, k_cache, v_cache, page_table, positions,
                                                                 0.25)) < TOLERANCE


def test_default_split_tokens_choice():
    assert DecodeAttentionWorkspace.create(1, 1, 16, 100, "cpu").split_tokens == 128
    assert DecodeAttentionWorkspace.create(1, 1, 16, 4096, "cpu").split_tokens == 128
    ws = DecodeAttentionWorkspace.create(1, 1, 16, 32768, "cpu")
    assert (ws.split_tokens, ws.num_splits, ws.max_context_tokens) == (512, 64, 32768)
    assert DecodeAttentionWorkspace.create(1, 1, 16, 5000, "cpu").max_context_tokens >= 5000


@pytest.mark.parametrize("kwargs, message", [
    (dict(split_tokens=24), "split_tokens must be a power of two >= 16"),
    (dict(split_tokens=8), "split_tokens must be a power of two >= 16"),
    (dict(max_context_tokens=0), "max_context_tokens must be a positive integer"),
])
def test_workspace_rejects_bad_parameters(kwargs, message):
    params = dict(batch=1, num_q_heads=2, head_dim=16, max_context_tokens=64, device="cpu") | kwargs
    with pytest.raises(InvalidParameterError, match=message):
        DecodeAttentionWorkspace.create(**params)


def test_rejects_page_table_longer_than_the_workspace_covers():
    q, k_cache, v_cache, page_table, positions = _setup([3], 2, 1, 16, 4, 64, seed=8)
    workspace = DecodeAttentionWorkspace.create(1, 2, 16, 32, "cpu", split_tokens=16)
    with pytest.raises(ValueError, match="page_table holds up to 64 tokens .* workspace covers 32"):
        paged_decode_attention(q, k_cache, v_cache, page_table, positions, 0.25, torch.empty_like(q), workspace)


@pytest.mark.parametrize("change, message", [
    (dict(q=torch.zeros(1, 3, 16), out=torch.zeros(1, 3, 16), k_cache=torch.zeros(8, 2, 4, 16).half(),
          v_cache=torch.zeros(8, 2, 4, 16).half()), "q heads \\(3\\) must be a multiple of the cache's kv heads"),
    (dict(out=torch.zeros(1, 2, 16, dtype=torch.float16)), "out: expected dtype torch.float32"),
    (dict(workspace=DecodeAttentionWorkspace.create(1, 4, 16, 64, "cpu")), "workspace shaped"),
    (dict(positions=torch.zeros(1, 1, dtype=torch.int32)), r"positions: expected shape \[1\]"),
])
def test_rejects_bad_arguments(change, message):
    q, k_cache, v_cache, page_table, positions = _setup([3], 2, 1, 16, 4, 64, seed=9)
    args = dict(q=q.cpu(), k_cache=k_cache.cpu(), v_cache=v_cache.cpu(), page_table=page_table.cpu(),
                positions=positions.cpu(), scale=0.25, out=torch.empty(1, 2, 16),
                workspace=DecodeAttentionWorkspace.create(1, 2, 16, 64, "cpu")) | change
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("group_size", [1, 4])
def test_real_shapes(group_size):
    lengths = [1, 17, 2048, 4096]
    args = _setup(lengths, 32, 32 // group_size, 128, 16, 4096, seed=10)
    workspace = DecodeAttentionWorkspace.create(4, 32, 128, 4096, "cuda")
    out = _run(*args, workspace, 128 ** -0.5)
    expected = paged_decode_attention_reference(*args, 128 ** -0.5)
    for b in range(len(lengths)):
        assert _relative_error(out[b], expected[b]) < TOLERANCE


@pytest.mark.gpu
@pytest.mark.parametrize("one_launch", [False, True])
def test_rope_and_attention_replayed_in_a_cuda_graph_with_advancing_positions(one_launch):
    """Real shapes in a CUDA graph, positions advancing across a page boundary and from split 0 into split 1: rope
    with the cache write, then attention; or (one_launch) both and the merge in the attention launch."""
    from replayllm.kernels.decode_attention import NewToken

    batch, hq, hkv, dh, page_size, max_context = 2, 32, 8, 128, 16, 4096
    gen = torch.Generator().manual_seed(11)
    _, k_cache, v_cache, page_table, _ = _setup([1] * batch, hq, hkv, dh, page_size, max_context, seed=11)
    angles = torch.arange(max_context, dtype=torch.float64)[:, None] * 10000.0 ** (
        -torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    cos, sin = angles.cos().float().cuda(), angles.sin().float().cuda()
    positions = torch.tensor([126, 3000], dtype=torch.int32, device="cuda")  # page and split boundaries next
    q, k, v = (torch.zeros(batch, h, dh, device="cuda") for h in (hq, hkv, hkv))
    out = torch.zeros(batch, hq, dh, device="cuda")
    workspace = DecodeAttentionWorkspace.create(batch, hq, dh, max_context, "cuda")

    def step():
        if one_launch:
            paged_decode_attention(q, k_cache, v_cache, page_table, positions, dh ** -0.5, out, workspace,
                                   fused_merge=True, new_token=NewToken(k, v, cos, sin, neox=False))
        else:
            rope_and_cache_write(q, k, v, cos, sin, positions, k_cache, v_cache, page_table, neox=False)
            paged_decode_attention(q, k_cache, v_cache, page_table, positions, dh ** -0.5, out, workspace)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(4):
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, generator=gen))
        q_in, k_in = q.clone(), k.clone()
        graph.replay()
        torch.cuda.synchronize()
        q_rotated = rope_reference(q_in, cos, sin, positions, neox=False)
        if one_launch:
            assert torch.equal(q, q_in)
        else:
            assert _relative_error(q, q_rotated) < TOLERANCE
        for b in range(batch):  # the new token is in the cache at its position
            cached = gather_paged_cache_reference(k_cache, page_table[b], int(positions[b]) + 1)[:, -1]
            assert _relative_error(cached, rope_reference(k_in, cos, sin, positions, neox=False)[b]) < 1e-3
        expected = paged_decode_attention_reference(q_rotated, k_cache, v_cache, page_table, positions, dh ** -0.5)
        assert _relative_error(out, expected) < TOLERANCE
        positions.add_(1)


@pytest.mark.gpu
@pytest.mark.parametrize("fused_merge", [False, True])
def test_int8_cache_attention_replayed_in_a_cuda_graph_with_advancing_positions(fused_merge):
    """Real shapes, an int8 cache: the captured launch reads the cache and its scales through the same pointers at
    every replay; between replays the new token is quantized into its slot (outside the graph) at positions that
    cross a page boundary and go from split 0 into split 1."""
    batch, hq, hkv, dh, page_size, max_context = 2, 32, 8, 128, 16, 4096
    gen = torch.Generator().manual_seed(13)
    q, k_cache, v_cache, page_table, _ = _setup([1] * batch, hq, hkv, dh, page_size, max_context, seed=13)
    k_cache, v_cache, k_scale, v_scale = _int8_cache(k_cache, v_cache)
    positions = torch.tensor([126, 3000], dtype=torch.int32, device="cuda")
    out = torch.zeros(batch, hq, dh, device="cuda")
    workspace = DecodeAttentionWorkspace.create(batch, hq, dh, max_context, "cuda")

    def step():
        paged_decode_attention(q, k_cache, v_cache, page_table, positions, dh ** -0.5, out, workspace,
                               k_scale=k_scale, v_scale=v_scale, fused_merge=fused_merge)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(4):
        q.copy_(torch.randn(q.shape, generator=gen))
        k_new, v_new = (torch.randn(batch, hkv, dh, generator=gen).cuda() for _ in range(2))
        paged_cache_write_reference(k_cache, v_cache, page_table, positions, k_new, v_new, k_scale, v_scale)
        graph.replay()
        torch.cuda.synchronize()
        expected = paged_decode_attention_reference(q, k_cache, v_cache, page_table, positions, dh ** -0.5,
                                                    k_scale, v_scale)
        assert _relative_error(out, expected) < TOLERANCE
        positions.add_(1)


# int8_products rounds q and each tile's probabilities (times the v scales) to 16-bit integers: 1/65024 of a
# row's largest value, so ~1e-5 of the result, not the f16 split's ~1e-7; a wrong byte or scale is off by O(1).
INT8_PRODUCTS_TOLERANCE = 1e-4


@pytest.mark.parametrize("group_size, head_dim, fused_merge, early_v",
                         [(1, 32, False, False), (4, 32, True, False), (2, 24, False, True), (4, 64, True, True)])
def test_int8_products_match_the_dequantized_reference(group_size, head_dim, fused_merge, early_v):
    """int8_products: the integer products on the cache's quants. Lengths from one token to several 32-token
    splits, through shuffled pages; head_dim 24 pads its tiles to 32 (the integer products' depth)."""
    lengths = [1, 5, 32, 33, 90]
    q, k_cache, v_cache, page_table, positions = _setup(lengths, 2 * group_size, 2, head_dim, 4, 96,
                                                        seed=41 + group_size, q_scale=2.0)
    k_q, v_q, k_scale, v_scale = _int8_cache(k_cache, v_cache)
    workspace = DecodeAttentionWorkspace.create(len(lengths), 2 * group_size, head_dim, 96, DEVICE, split_tokens=32)
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    out = _run(q, k_q, v_q, page_table, positions, workspace, 0.3, **scales, fused_merge=fused_merge,
               early_v=early_v, int8_products=True)
    expected = paged_decode_attention_reference(q, k_q, v_q, page_table, positions, 0.3, k_scale, v_scale)
    f16_products = _run(q, k_q, v_q, page_table, positions, workspace, 0.3, **scales, fused_merge=fused_merge,
                        early_v=early_v)
    for b in range(len(lengths)):
        assert _relative_error(out[b], expected[b]) < INT8_PRODUCTS_TOLERANCE
        assert 0 < _relative_error(out[b], f16_products[b]) < INT8_PRODUCTS_TOLERANCE


def test_int8_products_need_an_int8_cache_and_tiles_of_32_tokens():
    q, k_cache, v_cache, page_table, positions = _setup([5, 40], 4, 2, 32, 4, 64, seed=43)
    k_q, v_q, k_scale, v_scale = _int8_cache(k_cache, v_cache)
    out = torch.empty_like(q)
    with pytest.raises(ValueError, match="int8_products multiplies an int8 KV cache"):
        paged_decode_attention(q, k_cache, v_cache, page_table, positions, 0.3, out,
                               DecodeAttentionWorkspace.create(2, 4, 32, 64, DEVICE, split_tokens=32),
                               int8_products=True)
    with pytest.raises(ValueError, match="at least 32 tokens"):
        paged_decode_attention(q, k_q, v_q, page_table, positions, 0.3, out,
                               DecodeAttentionWorkspace.create(2, 4, 32, 64, DEVICE, split_tokens=16),
                               k_scale=k_scale, v_scale=v_scale, int8_products=True)


# fma_products: f32 multiply-adds of the cache's f16 or int8 values, exact in f32, so the f16 cache's tolerance.
@pytest.mark.parametrize("int8", [False, True], ids=["f16", "int8"])
@pytest.mark.parametrize("group_size, head_dim, block_n, early_v", [
    (1, 32, None, False), (4, 32, 16, True), (2, 24, 32, False), (1, 64, 64, True)])
def test_fma_products_match_the_reference(int8, group_size, head_dim, block_n, early_v):
    """fma_products: one program per q head, products on the CUDA cores. Lengths from one token to several
    tiles and splits, through shuffled pages; head_dim 24 pads its tiles; tiles of 16 tokens rescale the
    running sums within a split."""
    lengths = [1, 5, 64, 65, 150]
    q, k_cache, v_cache, page_table, positions = _setup(lengths, 2 * group_size, 2, head_dim, 4, 160,
                                                        seed=51 + group_size, q_scale=2.0)
    scales = {}
    if int8:
        k_cache, v_cache, k_scale, v_scale = _int8_cache(k_cache, v_cache)
        scales = dict(k_scale=k_scale, v_scale=v_scale)
    workspace = DecodeAttentionWorkspace.create(len(lengths), 2 * group_size, head_dim, 160, DEVICE, split_tokens=64)
    out = _run(q, k_cache, v_cache, page_table, positions, workspace, 0.3, **scales, block_n=block_n,
               early_v=early_v, fma_products=True)
    expected = paged_decode_attention_reference(q, k_cache, v_cache, page_table, positions, 0.3, **scales)
    for b in range(len(lengths)):
        assert _relative_error(out[b], expected[b]) < TOLERANCE


def test_fma_products_with_the_quantized_copy():
    """The merge writes the quantized copy after fma_products' splits as after the default kernel's."""
    from replayllm.kernels.int8_activations import QuantizedActivations, quantize_activations

    args = _setup([5, 40], 4, 2, 32, 4, 64, seed=53, q_scale=2.0)
    workspace = DecodeAttentionWorkspace.create(2, 4, 32, 64, DEVICE, split_tokens=16)
    out = torch.full(args[0].shape, float("nan"), device=DEVICE)
    fused = QuantizedActivations.allocate(2, 4 * 32, DEVICE, wide=True)
    paged_decode_attention(*args, 0.3, out, workspace, out_q8=fused, fma_products=True)
    assert _relative_error(out, paged_decode_attention_reference(*args, 0.3)) < TOLERANCE
    _assert_same_copy(fused, quantize_activations(out.view(2, -1), QuantizedActivations.allocate(2, 128, DEVICE,
                                                                                                 wide=True)))


@pytest.mark.parametrize("options, message", [
    (dict(fused_merge=True), "no fused_merge form"),
    (dict(int8_products=True), "int8_products multiplies an int8 KV cache"),
    (dict(block_n=128), "block_n must be 16, 32, 64 or 128"),
    (dict(num_warps=3), "num_warps must be"),
])
def test_fma_products_reject_what_they_do_not_do(options, message):
    args = _setup([5, 40], 4, 2, 32, 4, 64, seed=55)
    out = torch.empty_like(args[0])
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(*args, 0.3, out, DecodeAttentionWorkspace.create(2, 4, 32, 64, DEVICE, split_tokens=32),
                               fma_products=True, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["f16", "int8", "q4"])
@pytest.mark.parametrize("group_size", [1, 4])
def test_fma_products_at_real_shapes(kind, group_size):
    lengths = [1, 17, 2048, 4096]
    q, k_cache, v_cache, page_table, positions = _setup(lengths, 32, 32 // group_size, 128, 16, 4096, seed=57)
    k_cache, v_cache, scales = _quantized(kind, k_cache, v_cache)
    workspace = DecodeAttentionWorkspace.create(4, 32, 128, 4096, "cuda")
    out = _run(q, k_cache, v_cache, page_table, positions, workspace, 128 ** -0.5, **scales, fma_products=True)
    expected = paged_decode_attention_reference(q, k_cache, v_cache, page_table, positions, 128 ** -0.5, **scales)
    for b in range(len(lengths)):
        assert _relative_error(out[b], expected[b]) < TOLERANCE


# A q4 cache: its own kernel (CUDA-core products over half rows of 4-bit cells, a scale per block of 32 dims),
# whatever fma_products says; its values times their scales are exact in f32, so the f16 cache's tolerance.
@pytest.mark.parametrize("group_size, head_dim, block_n, fma_products", [
    (1, 64, None, False), (4, 64, 16, True), (2, 128, 32, False), (1, 192, 64, True)])
def test_q4_cache_matches_the_dequantized_reference(group_size, head_dim, block_n, fma_products):
    """Lengths from one token to several tiles and splits through shuffled pages; head_dim 64 (one block a
    half), 128 (two) and 192 (three: the cells pad to four blocks); tiles of 16 tokens rescale the running sums
    within a split."""
    lengths = [1, 5, 64, 65, 150]
    q, k_cache, v_cache, page_table, positions = _setup(lengths, 2 * group_size, 2, head_dim, 4, 160,
                                                        seed=61 + group_size, q_scale=2.0)
    k_cache, v_cache, scales = _quantized("q4", k_cache, v_cache)
    workspace = DecodeAttentionWorkspace.create(len(lengths), 2 * group_size, head_dim, 160, DEVICE, split_tokens=64)
    out = _run(q, k_cache, v_cache, page_table, positions, workspace, 0.3, **scales, block_n=block_n,
               fma_products=fma_products)
    expected = paged_decode_attention_reference(q, k_cache, v_cache, page_table, positions, 0.3, **scales)
    for b in range(len(lengths)):
        assert _relative_error(out[b], expected[b]) < TOLERANCE


def test_q4_cache_block_scales_reach_scores_and_values():
    """Each block's own scale, not its row's or its neighbour's: a cache whose blocks have scales a thousand
    times apart, where one misplaced scale moves the output far past the tolerance."""
    q, k_cache, v_cache, page_table, positions = _setup([3, 37], 4, 2, 128, 4, 64, seed=63)
    k_q, v_q, scales = _quantized("q4", k_cache, v_cache)
    spread = torch.tensor([1e-3, 1.0, 0.3, 3e-2], device=DEVICE)  # per block of 32 dims
    scales = {name: (t * spread).contiguous() for name, t in scales.items()}
    workspace = DecodeAttentionWorkspace.create(2, 4, 128, 64, DEVICE, split_tokens=16)
    out = _run(q, k_q, v_q, page_table, positions, workspace, 0.5, **scales)
    expected = paged_decode_attention_reference(q, k_q, v_q, page_table, positions, 0.5, **scales)
    assert _relative_error(out, expected) < TOLERANCE
    swapped = {name: t.flip(-1).contiguous() for name, t in scales.items()}
    assert _relative_error(out, paged_decode_attention_reference(q, k_q, v_q, page_table, positions, 0.5,
                                                                 **swapped)) > 1e-2


def test_q4_cache_with_the_quantized_copy():
    from replayllm.kernels.int8_activations import QuantizedActivations, quantize_activations

    q, k_cache, v_cache, page_table, positions = _setup([5, 40], 4, 2, 64, 4, 64, seed=65, q_scale=2.0)
    k_q, v_q, scales = _quantized("q4", k_cache, v_cache)
    workspace = DecodeAttentionWorkspace.create(2, 4, 64, 64, DEVICE, split_tokens=16)
    out = torch.full(q.shape, float("nan"), device=DEVICE)
    fused = QuantizedActivations.allocate(2, 4 * 64, DEVICE, wide=True)
    paged_decode_attention(q, k_q, v_q, page_table, positions, 0.3, out, workspace, out_q8=fused, **scales)
    expected = paged_decode_attention_reference(q, k_q, v_q, page_table, positions, 0.3, **scales)
    assert _relative_error(out, expected) < TOLERANCE
    _assert_same_copy(fused, quantize_activations(out.view(2, -1), QuantizedActivations.allocate(2, 256, DEVICE,
                                                                                                 wide=True)))


@pytest.mark.parametrize("options, message", [
    (dict(fused_merge=True), "q4 KV cache's attention has no fused_merge form"),
    (dict(int8_products=True), "int8_products multiplies an int8 KV cache's quants; this cache is q4"),
    (dict(block_n=8), "block_n must be 16, 32, 64 or 128"),
    (dict(k_scale=None), "needs its scales"),
    (dict(head_dim=96), "head_dim a multiple of 64"),
])
def test_q4_cache_rejects_what_it_does_not_do(options, message):
    head_dim = options.pop("head_dim", 64)
    q, k_cache, v_cache, page_table, positions = _setup([5, 40], 4, 2, head_dim, 4, 64, seed=67)
    if head_dim % 64:  # a q4 cache's shape with an odd number of blocks a half
        k_q = torch.zeros(*k_cache.shape[:3], head_dim // 2, dtype=torch.uint8, device=DEVICE)
        scales = dict(k_scale=torch.ones(*k_cache.shape[:3], head_dim // 32, device=DEVICE))
        scales["v_scale"], v_q = scales["k_scale"].clone(), k_q.clone()
    else:
        k_q, v_q, scales = _quantized("q4", k_cache, v_cache)
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(q, k_q, v_q, page_table, positions, 0.3, torch.empty_like(q),
                               DecodeAttentionWorkspace.create(2, 4, head_dim, 64, DEVICE, split_tokens=32),
                               **{**scales, **options})
