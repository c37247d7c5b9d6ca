"""silu_mul against the float64 reference, which is itself checked against torch.nn.functional.silu.

Metric: ||kernel - reference|| / ||reference|| < 1e-5; outputs are poisoned with NaN first.
"""

from __future__ import annotations

import pytest
import torch

from replayllm.kernels.activation import silu_mul, silu_mul_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).norm() / expected.norm()).item()


def test_reference_is_silu_of_gate_times_up():
    gate_up = torch.tensor([[0.0, 1.0, -2.0, 3.0, 2.0, 0.5]])  # gate (0, 1, -2), up (3, 2, 0.5)
    silu = [0.0, 1.0 / (1.0 + torch.e ** -1.0), -2.0 / (1.0 + torch.e ** 2.0)]
    expected = torch.tensor([[silu[0] * 3.0, silu[1] * 2.0, silu[2] * 0.5]])
    assert torch.allclose(silu_mul_reference(gate_up), expected, rtol=1e-6)
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(silu_mul_reference(x), torch.nn.functional.silu(x[:, :5]) * x[:, 5:], rtol=1e-5)


@pytest.mark.parametrize("batch, ffn_size", [(1, 7), (3, 513), (2, 1536)])
def test_silu_mul_matches_reference(batch, ffn_size):
    gen = torch.Generator().manual_seed(ffn_size)
    gate_up = (torch.randn(batch, 2 * ffn_size, generator=gen) * 4).to(DEVICE)
    out = torch.full((batch, ffn_size), float("nan"), device=DEVICE)
    assert silu_mul(gate_up, out) is out
    assert _relative_error(out, silu_mul_reference(gate_up)) < 1e-5


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy
def test_large_negative_gate_gives_zero_not_nan():
    gate_up = torch.tensor([[-1000.0, -90.0, 1000.0, 5.0, 5.0, 5.0]], device=DEVICE)
    out = torch.full((1, 3), float("nan"), device=DEVICE)
    silu_mul(gate_up, out)
    # exp(90) overflows f32: silu(-90) must come out as (-)0, not as -90 * 0 * inf = nan
    assert torch.allclose(out.cpu(), silu_mul_reference(gate_up.cpu()), rtol=1e-6, atol=1e-30)


def test_accepts_row_strided_output():
    gen = torch.Generator().manual_seed(1)
    gate_up = torch.randn(2, 40, generator=gen).to(DEVICE)
    wide = torch.full((2, 32), float("nan"), device=DEVICE)
    silu_mul(gate_up, wide[:, 4:24])
    assert _relative_error(wide[:, 4:24], silu_mul_reference(gate_up)) < 1e-5
    assert wide[:, :4].isnan().all() and wide[:, 24:].isnan().all()


@pytest.mark.parametrize("batch, ffn_size", [(1, 7), (3, 513)])
def test_f16_output_is_the_f32_output_rounded(batch, ffn_size):
    """Prefill keeps the down projection's input in f16 (it is rounded to f16 there anyway): the f16 store must
    be bit for bit the f32 result rounded, or prefill's results would change."""
    gen = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(batch, 2 * ffn_size, generator=gen) * 4).to(DEVICE)
    wide = silu_mul(gate_up, torch.full((batch, ffn_size), float("nan"), device=DEVICE))
    half = torch.full((batch, ffn_size), float("nan"), dtype=torch.float16, device=DEVICE)
    assert silu_mul(gate_up, half) is half
    assert torch.equal(half, wide.to(torch.float16))
    assert not torch.equal(half.float(), wide)  # the rounding did happen: the comparison above can fail


@pytest.mark.parametrize("gate_up, out, message", [
    (torch.zeros(2, 7), torch.zeros(2, 3), "width must be even"),
    (torch.zeros(2, 8), torch.zeros(2, 8), r"out: expected shape \[2, 4\]"),
    (torch.zeros(2, 8, dtype=torch.float16), torch.zeros(2, 4), "gate_up: expected dtype"),
    (torch.zeros(2, 8), torch.zeros(2, 4, dtype=torch.bfloat16), "out: expected dtype"),
])
def test_rejects_bad_arguments(gate_up, out, message):
    with pytest.raises(ValueError, match=message):
        silu_mul(gate_up, out)


@pytest.mark.gpu
def test_real_shapes_in_cuda_graph():
    gen = torch.Generator().manual_seed(2)
    gate_up = torch.randn(8, 2 * 14336, generator=gen).cuda()
    out = torch.empty(8, 14336, device="cuda")
    silu_mul(gate_up, out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        silu_mul(gate_up, out)
    gate_up.copy_(torch.randn(8, 2 * 14336, generator=gen))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert _relative_error(out, silu_mul_reference(gate_up)) < 1e-5


@pytest.mark.parametrize("batch, ffn_size", [(1, 1088), (2, 64)])  # 1088: a last program with 2 of 16 blocks
def test_quantized_copy_equals_quantize_activations_of_the_output(batch, ffn_size):
    """The int8 copy written by the same launch is bit for bit what quantize_activations makes of `out`."""
    from replayllm.kernels.int8_activations import QuantizedActivations, quantize_activations

    gen = torch.Generator().manual_seed(5)
    gate_up = (torch.randn(batch, 2 * ffn_size, generator=gen) * 3).to(DEVICE)
    out = torch.full((batch, ffn_size), float("nan"), device=DEVICE)
    fused = QuantizedActivations.allocate(batch, ffn_size, DEVICE)
    silu_mul(gate_up, out, out_q8=fused)
    separate = quantize_activations(out, QuantizedActivations.allocate(batch, ffn_size, DEVICE))
    assert _relative_error(out, silu_mul_reference(gate_up)) < 1e-5
    assert torch.equal(fused.q, separate.q) and fused.q.abs().max() == 127
    assert torch.equal(fused.scale, separate.scale) and torch.equal(fused.block_sum, separate.block_sum)
