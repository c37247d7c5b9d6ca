"""The experimental int8-activation Q4_K GEMV and its activation quantizer, against float64 references."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType

from replayllm.errors import UnsupportedError
from replayllm.kernels.quant_matvec_q8 import (
    ActivationQ8,
    quant_matvec_q8,
    quant_matvec_q8_reference,
    quantize_activations,
    quantize_activations_reference,
)
from replayllm.kernels.quant_weight import dequantize_reference, pack_weight

T = GGMLQuantizationType


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("batch, n_cols", [(1, 512), (3, 288)])
def test_quantize_activations_matches_the_reference(batch, n_cols, device):
    x = torch.randn(batch, n_cols, device=device) * 3
    x[0, :32] = 0.0  # an all-zero block: scale 0, quants 0
    out = quantize_activations(x, ActivationQ8.allocate(batch, n_cols, device))
    ref = quantize_activations_reference(x.cpu())
    assert torch.allclose(out.scale.cpu(), ref.scale, rtol=1e-6, atol=0)
    assert torch.allclose(out.block_sum.cpu(), ref.block_sum, rtol=1e-5, atol=1e-5)
    diff = (out.q.cpu().int() - ref.q.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-2  # rounding ties only
    assert out.q[0, :32].abs().max() == 0 and out.scale[0, 0] == 0
    recovered = out.q.float().view(batch, -1, 32) * out.scale[..., None]
    assert rel_err(recovered.view(batch, n_cols), x) < 1e-2


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("n_cols", [512, 768])  # 768: 12 chunks, a partly masked step of 16
def test_matvec_matches_its_reference_and_the_f32_product(batch, n_cols, gguf_rows, device):
    n_rows = 37
    w = pack_weight(T.Q4_K, gguf_rows(T.Q4_K, n_rows, n_cols, seed=batch), n_cols).to(device)
    x = torch.randn(batch, n_cols, device=device)
    xq = quantize_activations(x, ActivationQ8.allocate(batch, n_cols, device))
    out = torch.full((batch, n_rows), float("nan"), device=device)
    assert quant_matvec_q8(xq, w, out) is out
    assert rel_err(out, quant_matvec_q8_reference(xq, w)) < 1e-5
    exact = x.double() @ dequantize_reference(w).double().T
    assert rel_err(out, exact) < 2e-2  # the activations' int8 rounding


def test_bias_and_accumulate(gguf_rows, device):
    w = pack_weight(T.Q4_K, gguf_rows(T.Q4_K, 19, 256, seed=5), 256).to(device)
    x = torch.randn(1, 256, device=device)
    xq = quantize_activations(x, ActivationQ8.allocate(1, 256, device))
    bias = torch.randn(19, device=device)
    initial = torch.randn(1, 19, device=device)
    out = initial.clone()
    quant_matvec_q8(xq, w, out, bias=bias, accumulate=True)
    want = quant_matvec_q8_reference(xq, w) + bias.double() + initial.double()
    assert rel_err(out, want) < 1e-5


def test_other_types_are_refused(gguf_rows):
    w = pack_weight(T.Q6_K, gguf_rows(T.Q6_K, 4, 256, seed=0), 256)
    xq = ActivationQ8.allocate(1, 256, "cpu")
    with pytest.raises(UnsupportedError, match="Q4_K"):
        quant_matvec_q8(xq, w, torch.empty(1, 4))
