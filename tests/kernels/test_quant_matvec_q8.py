"""The integer-dot GEMVs (Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0) with int8 and 16-bit activations, and their
activation quantizer, against float64 references."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType

from replayllm.errors import UnsupportedError
from replayllm.kernels.int8_activations import (
    QuantizedActivations,
    quantize_activations,
    quantize_activations_reference,
    wide_values,
)
from replayllm.kernels.quant_matvec_q8 import quant_matvec_q8, quant_matvec_q8_reference
from replayllm.kernels.quant_weight import dequantize_reference, pack_weight

T = GGMLQuantizationType


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("wide", [False, True], ids=["int8", "16bit"])
@pytest.mark.parametrize("batch, n_cols", [(1, 512), (3, 288)])
def test_quantize_activations_matches_the_reference(batch, n_cols, wide, device):
    x = torch.randn(batch, n_cols, device=device) * 3
    x[0, :32] = 0.0  # an all-zero block: scale 0, quants 0
    out = quantize_activations(x, QuantizedActivations.allocate(batch, n_cols, device, wide=wide))
    ref = quantize_activations_reference(x.cpu(), wide=wide)
    assert out.q.dtype == (torch.int16 if wide else torch.int8)
    assert torch.allclose(out.scale.cpu(), ref.scale, rtol=1e-6, atol=0)
    assert torch.allclose(out.block_sum.cpu(), ref.block_sum, rtol=1e-5, atol=1e-5)
    diff = (wide_values(out.q.cpu()) - wide_values(ref.q)).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-2  # rounding ties only
    assert out.q[0, :32].abs().max() == 0 and out.scale[0, 0] == 0
    recovered = wide_values(out.q).float().view(batch, -1, 32) * out.scale[..., None]
    # Uniform rounding of a step amax / 127 or amax / 32512: ~5e-3 or ~2e-5 of the values' norm here.
    assert rel_err(recovered.view(batch, n_cols), x) < (5e-5 if wide else 1e-2)


def test_wide_quants_keep_both_bytes_in_signed_range():
    # The extremes and the values around each carry of the two-byte form decode back exactly, and every run of 4
    # quants is 8 bytes: its 4 high bytes (each in [-127, 127]), then its 4 low ones.
    v = torch.tensor([-32512, -32385, -32384, -257, -256, -129, -128, -1, 0, 1, 127, 128, 255, 256, 32383, 32384,
                      32512, 300, -300, 7], dtype=torch.float32)  # 20 values: 5 runs of 4
    x = torch.zeros(1, 32 * len(v))
    x.view(len(v), 32)[:, 0] = v
    x.view(len(v), 32)[:, 1] = 32512.0  # each block's amax: quants equal the values
    q = quantize_activations_reference(x, wide=True).q
    assert torch.equal(wide_values(q).view(len(v), 32)[:, 0], v.to(torch.int32))
    planes = q.view(torch.int8).view(-1, 2, 4).to(torch.int32)  # [runs, (high, low), 4]
    assert planes[:, 0].abs().max() <= 127
    first = planes.view(len(v), 8, 2, 4)[:, 0, :, 0]  # each block's quant 0: (high, low) bytes
    assert torch.equal(first[:, 0] * 256 + first[:, 1], v.to(torch.int32))


# (type, n_cols): the default step is 32 chunks (1024 weights of a row for Q4_0, Q4_1 and Q8_0, 2048 for Q4_K
# and Q5_K, 4096 for Q6_K), so each of these widths ends on a partly masked step (1280 takes two steps for the
# 32-weight types); other launch shapes, with more steps, are tested below.
MATVEC_CASES = [(T.Q4_0, 256), (T.Q4_0, 1280), (T.Q4_1, 256), (T.Q4_1, 1280), (T.Q4_K, 512), (T.Q4_K, 768),
                (T.Q5_K, 768), (T.Q5_K, 1280), (T.Q6_K, 256), (T.Q6_K, 512), (T.Q6_K, 1280),
                (T.Q8_0, 256), (T.Q8_0, 512), (T.Q8_0, 1280)]


@pytest.fixture
def case(gguf_rows, device):
    """case(type, n_rows, n_cols, batch, seed, wide) -> (weight, x, quantized x) on the test device."""
    def make(ggml_type, n_rows, n_cols, batch, seed, wide=False):
        w = pack_weight(ggml_type, gguf_rows(ggml_type, n_rows, n_cols, seed=seed), n_cols).to(device)
        x = torch.randn(batch, n_cols, generator=torch.Generator().manual_seed(seed)).to(device)
        return w, x, quantize_activations(x, QuantizedActivations.allocate(batch, n_cols, device, wide=wide))
    return make


@pytest.mark.parametrize("wide", [False, True], ids=["int8", "16bit"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("ggml_type, n_cols", MATVEC_CASES, ids=[f"{t.name}-{k}" for t, k in MATVEC_CASES])
def test_matvec_matches_its_reference_and_the_f32_product(ggml_type, n_cols, batch, wide, case, device):
    n_rows = 37  # not a multiple of block_n: the last program's rows past the end are masked
    w, x, xq = case(ggml_type, n_rows, n_cols, batch, seed=batch, wide=wide)
    out = torch.full((batch, n_rows), float("nan"), device=device)
    assert quant_matvec_q8(xq, w, out) is out
    assert rel_err(out, quant_matvec_q8_reference(xq, w)) < 1e-5
    exact = x.double() @ dequantize_reference(w).double().T
    # The activations' int8 rounding: ~0.5-1% here, up to ~2% where a min term cancels most of the product
    # (Q4_1); 16-bit quants round 256 times finer. A wrong nibble, bit, byte or scale is off by tens of percent.
    assert rel_err(out, exact) < (2e-4 if wide else 4e-2)


# 1792 columns are 56 Q4_0, Q4_1 and Q8_0 chunks, 28 Q4_K and Q5_K chunks, 14 Q6_K chunks: 4 steps each, the last
# one partly masked.
LAUNCH_CASES = [(T.Q4_0, 16), (T.Q4_1, 16), (T.Q4_K, 8), (T.Q5_K, 8), (T.Q6_K, 4), (T.Q8_0, 16)]


@pytest.mark.parametrize("wide", [False, True], ids=["int8", "16bit"])
@pytest.mark.parametrize("ggml_type, chunks", LAUNCH_CASES, ids=[t.name for t, _ in LAUNCH_CASES])
def test_other_launch_shapes_give_the_same_result(ggml_type, chunks, wide, case, device):
    w, _, xq = case(ggml_type, 37, 1792, 2, seed=7, wide=wide)
    out = torch.full((2, 37), float("nan"), device=device)
    quant_matvec_q8(xq, w, out, block_n=4, chunks=chunks, num_warps=2, num_stages=2)  # 37 rows = 9 * 4 + 1
    assert rel_err(out, quant_matvec_q8_reference(xq, w)) < 1e-5


@pytest.mark.parametrize("rows", [2, 4])
@pytest.mark.parametrize("wide", [False, True], ids=["int8", "16bit"])
@pytest.mark.parametrize("ggml_type", [T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0], ids=lambda t: t.name)
def test_row_tiles_give_the_same_result(ggml_type, wide, rows, case, device):
    # 37 rows in tiles of 4: the last program has 1 row (rows 2) or 5 (rows 4) of its 8 or 16, and 4 steps a row.
    w, _, xq = case(ggml_type, 37, 1792, 2, seed=11, wide=wide)
    out = torch.full((2, 37), float("nan"), device=device)
    chunks = {T.Q6_K: 4, T.Q8_0: 16}.get(ggml_type, 8)  # of 128, 32 or 64 weights: 4 steps
    quant_matvec_q8(xq, w, out, block_n=4, chunks=chunks, num_warps=2, rows=rows)
    assert rel_err(out, quant_matvec_q8_reference(xq, w)) < 1e-5
    one_tile = torch.full_like(out, float("nan"))
    quant_matvec_q8(xq, w, one_tile, block_n=4, chunks=chunks, num_warps=2, rows=1)
    # The same sums in the same order; compiled for a GPU, the multiply-adds may contract differently with
    # more tiles a thread, so equal to f32 rounding, far below the activations' own rounding.
    assert rel_err(out, one_tile) < 1e-6


def test_row_tiles_are_checked(gguf_rows):
    xq = QuantizedActivations.allocate(1, 256, "cpu")
    q4k = pack_weight(T.Q4_K, gguf_rows(T.Q4_K, 4, 256, seed=0), 256)
    with pytest.raises(ValueError, match=r"rows must be one of \(1, 2, 4\) for Q4_K, got 3"):
        quant_matvec_q8(xq, q4k, torch.empty(1, 4), rows=3)
    q40 = pack_weight(T.Q4_0, gguf_rows(T.Q4_0, 4, 256, seed=0), 256)
    with pytest.raises(ValueError, match=r"rows must be one of \(1,\) for Q4_0, got 2"):
        quant_matvec_q8(xq, q40, torch.empty(1, 4), rows=2)


@pytest.mark.parametrize("ggml_type", [T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0], ids=lambda t: t.name)
def test_bias_and_accumulate_into_a_column_slice(ggml_type, case, device):
    w, _, xq = case(ggml_type, 19, 256, 2, seed=5)
    bias = torch.randn(19, device=device)
    initial = torch.randn(2, 30, device=device)
    wide = initial.clone()
    out = wide[:, 5:24]  # row stride 30: a fused projection's slice
    quant_matvec_q8(xq, w, out, bias=bias, accumulate=True)
    want = quant_matvec_q8_reference(xq, w) + bias.double() + initial[:, 5:24].double()
    assert rel_err(out, want) < 1e-5
    assert torch.equal(wide[:, :5], initial[:, :5]) and torch.equal(wide[:, 24:], initial[:, 24:])


def test_other_types_are_refused(gguf_rows):
    w = pack_weight(T.F16, gguf_rows(T.F16, 4, 256, seed=0), 256)
    xq = QuantizedActivations.allocate(1, 256, "cpu")
    with pytest.raises(UnsupportedError, match="supports Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0 weights, got F16"):
        quant_matvec_q8(xq, w, torch.empty(1, 4))
    with pytest.raises(UnsupportedError, match="no kernel for F16"):
        quant_matvec_q8_reference(xq, w)


def test_launch_shapes_must_be_powers_of_two(gguf_rows):
    w = pack_weight(T.Q8_0, gguf_rows(T.Q8_0, 4, 256, seed=0), 256)
    xq = QuantizedActivations.allocate(1, 256, "cpu")
    with pytest.raises(ValueError, match="chunks must be a power of two, got 3"):
        quant_matvec_q8(xq, w, torch.empty(1, 4), chunks=3)


@pytest.mark.gpu
@pytest.mark.parametrize("ggml_type", [T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0], ids=lambda t: t.name)
def test_prefetch_before_the_pdl_wait_changes_nothing(ggml_type, case):
    """The L2 prefetch of a program's weight rows (before its PDL wait) computes nothing: with it, the same
    launch gives the same bits as without; several steps a row, a partly filled last program, batch 2."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs a GPU of compute capability 9.0")
    w, _, xq = case(ggml_type, 37, 1792, 2, seed=13, wide=True)
    shape = dict(block_n=4, chunks={T.Q6_K: 4, T.Q8_0: 16, T.Q4_0: 16}.get(ggml_type, 8), num_warps=2)
    if ggml_type != T.Q4_0:
        shape["rows"] = 2
    outs = []
    for prefetch in (False, True):
        out = torch.full((2, 37), float("nan"), device="cuda")
        outs.append(quant_matvec_q8(xq, w, out, pdl=True, prefetch=prefetch, **shape))
    assert torch.equal(outs[0], outs[1])
    assert rel_err(outs[1], quant_matvec_q8_reference(xq, w)) < 1e-5
