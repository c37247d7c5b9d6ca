"""The F16 / BF16 decode GEMV with row tiles (kernels/float_matvec) against a float64 product."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType

from replayllm.errors import UnsupportedError
from replayllm.kernels.float_matvec import float_matvec, supports
from replayllm.kernels.quant_weight import QuantWeight, dequantize_reference, pack_weight

T = GGMLQuantizationType


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("ggml_type", [T.F16, T.BF16], ids=lambda t: t.name)
def test_matches_the_float64_product_at_every_row_tiling(ggml_type, rows, gguf_rows, device):
    # 37 rows (the last program partly past the end), 200 columns: 25 chunks, in steps of 8 chunks the last
    # step is partly past the row's end.
    n_rows, n_cols = 37, 200
    w = pack_weight(ggml_type, gguf_rows(ggml_type, n_rows, n_cols, seed=rows), n_cols).to(device)
    x = torch.randn(2, n_cols, generator=torch.Generator().manual_seed(1)).to(device)
    out = torch.full((2, n_rows), float("nan"), device=device)
    assert float_matvec(x, w, out, block_n=4, chunks=8, num_warps=1, rows=rows) is out
    want = x.double() @ dequantize_reference(w).double().T
    assert rel_err(out, want) < 1e-6  # f32 accumulation; a wrong element or row is off by percents


def test_bias_and_accumulate_into_a_column_slice(gguf_rows, device):
    w = pack_weight(T.F16, gguf_rows(T.F16, 19, 64, seed=3), 64).to(device)
    x = torch.randn(1, 64, device=device)
    bias = torch.randn(19, device=device)
    initial = torch.randn(1, 30, device=device)
    wide = initial.clone()
    float_matvec(x, w, wide[:, 5:24], bias=bias, accumulate=True)
    want = x.double() @ dequantize_reference(w).double().T + bias.double() + initial[:, 5:24].double()
    assert rel_err(wide[:, 5:24], want) < 1e-6
    assert torch.equal(wide[:, :5], initial[:, :5]) and torch.equal(wide[:, 24:], initial[:, 24:])


def test_other_weights_and_shapes_are_refused(gguf_rows):
    q4k = pack_weight(T.Q4_K, gguf_rows(T.Q4_K, 4, 256, seed=0), 256)
    odd = QuantWeight(T.F16, 4, 12, torch.zeros(4, 12, dtype=torch.float16))
    assert not supports(q4k) and not supports(odd)
    with pytest.raises(UnsupportedError, match="F16 / BF16 weights with a multiple of 8 columns, got Q4_K"):
        float_matvec(torch.zeros(1, 256), q4k, torch.zeros(1, 4))
    with pytest.raises(UnsupportedError, match="got F16 with 12 columns"):
        float_matvec(torch.zeros(1, 12), odd, torch.zeros(1, 4))
    f16 = QuantWeight(T.F16, 4, 16, torch.zeros(4, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"rows must be one of \(1, 2, 4\), got 3"):
        float_matvec(torch.zeros(1, 16), f16, torch.zeros(1, 4), rows=3)
    with pytest.raises(ValueError, match="x: expected shape"):
        float_matvec(torch.zeros(1, 8), f16, torch.zeros(1, 4))


@pytest.mark.gpu
def test_prefetch_before_the_pdl_wait_changes_nothing(gguf_rows):
    """The L2 prefetch of a program's weight rows before its PDL wait computes nothing: the same bits."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs a GPU of compute capability 9.0")
    n_rows, n_cols = 37, 200
    w = pack_weight(T.F16, gguf_rows(T.F16, n_rows, n_cols, seed=5), n_cols).to("cuda")
    x = torch.randn(2, n_cols, generator=torch.Generator().manual_seed(2)).cuda()
    outs = [float_matvec(x, w, torch.full((2, n_rows), float("nan"), device="cuda"), block_n=4, chunks=8,
                         num_warps=1, rows=2, pdl=True, prefetch=prefetch) for prefetch in (False, True)]
    assert torch.equal(outs[0], outs[1])
    assert rel_err(outs[1], x.double() @ dequantize_reference(w).double().T) < 1e-6
