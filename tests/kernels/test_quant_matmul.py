"""quant_matmul (prefill's quantized GEMM) against f16-rounded operands multiplied in float64."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType

from replayllm.kernels.quant_matmul import MatmulConfig, quant_matmul, quant_matmul_reference
from replayllm.kernels.quant_weight import MATVEC_TYPES, dequantize_reference, pack_weight

T = GGMLQuantizationType
ALL_TYPES = sorted(MATVEC_TYPES, key=int)
SMALL = MatmulConfig(block_n=16, block_m=16, max_groups=2, num_warps=4, num_stages=1)
# Against the same f16-rounded operands only the f32 summation order differs (~1e-7); a wrong nibble, scale
# or column anywhere moves the result by far more than 1e-3 at these sizes.
REL_TOL = 1e-5


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.cpu().double() - want).norm() / want.norm()).item()


def make_weight(gguf_rows, ggml_type, n_rows, n_cols, device, seed=0):
    return pack_weight(ggml_type, gguf_rows(ggml_type, n_rows, n_cols, seed), n_cols).to(device)


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
def test_every_type_matches_the_reference(ggml_type, gguf_rows, device):
    # 21 activation rows and 19 weight rows: both tails of a 16-tile; 512 columns: two K-quant super-blocks.
    n_cols = 96 if ggml_type in (T.F16, T.BF16, T.F32) else 512  # 96: a masked tail of the float groups
    w = make_weight(gguf_rows, ggml_type, 19, n_cols, device, seed=int(ggml_type))
    x = torch.randn(21, n_cols, device=device)
    out = torch.full((21, 19), float("nan"), device=device)
    assert quant_matmul(x, w, out, config=SMALL) is out
    assert rel_err(out, quant_matmul_reference(x, w)) < REL_TOL
    exact = x.cpu().double() @ dequantize_reference(w.to("cpu")).double().T
    assert rel_err(out, exact) < 2e-3  # the f16 rounding of both operands


def test_bias_accumulate_f16_input_and_a_column_slice(gguf_rows, device):
    w = make_weight(gguf_rows, T.Q4_K, 24, 256, device, seed=3)
    x = torch.randn(17, 256, device=device).to(torch.float16)
    bias = torch.randn(24, device=device)
    wide = torch.randn(17, 40, device=device)
    initial = wide.clone()
    quant_matmul(x, w, wide[:, 8:32], bias=bias, accumulate=True, config=SMALL)
    want = quant_matmul_reference(x, w) + bias.cpu().double() + initial[:, 8:32].cpu().double()
    assert rel_err(wide[:, 8:32], want) < REL_TOL
    assert torch.equal(wide[:, :8], initial[:, :8]) and torch.equal(wide[:, 32:], initial[:, 32:])


def test_the_default_config_matches_too(gguf_rows, device):
    w = make_weight(gguf_rows, T.Q6_K, 130, 256, device, seed=4)  # 130: past one 128-row tile
    x = torch.randn(70, 256, device=device)
    out = torch.empty(70, 130, device=device)
    quant_matmul(x, w, out)
    assert rel_err(out, quant_matmul_reference(x, w)) < REL_TOL


def test_bad_arguments_are_refused(gguf_rows):
    w = make_weight(gguf_rows, T.Q4_0, 4, 64, "cpu")
    out = torch.empty(3, 4)
    with pytest.raises(ValueError, match="x must be f32 or f16"):
        quant_matmul(torch.zeros(3, 64, dtype=torch.float64), w, out)
    with pytest.raises(ValueError, match="x: expected shape"):
        quant_matmul(torch.zeros(3, 32), w, out)
    with pytest.raises(ValueError, match="out: expected shape"):
        quant_matmul(torch.zeros(3, 64), w, torch.empty(3, 5))
    with pytest.raises(ValueError, match="w must be a QuantWeight"):
        quant_matmul(torch.zeros(3, 64), torch.zeros(4, 64), out)
    with pytest.raises(ValueError, match="block_m"):
        MatmulConfig(block_m=8)


@pytest.mark.gpu
@pytest.mark.parametrize("ggml_type", [T.Q4_K, T.Q6_K, T.Q8_0, T.F16], ids=lambda t: t.name)
def test_real_shapes_on_the_gpu(ggml_type, gguf_rows):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    w = make_weight(gguf_rows, ggml_type, 4096, 4096, "cuda", seed=7)
    x = torch.randn(300, 4096, device="cuda")
    out = torch.empty(300, 4096, device="cuda")
    quant_matmul(x, w, out)
    assert rel_err(out, quant_matmul_reference(x, w)) < REL_TOL
