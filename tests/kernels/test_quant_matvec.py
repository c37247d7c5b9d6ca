"""quant_matvec against x @ dequantize_reference(W)^T computed in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from replayllm.kernels.quant_matvec import MatvecConfig, quant_matvec
from replayllm.kernels.quant_weight import MATVEC_TYPES, dequantize_reference, pack_weight

T = GGMLQuantizationType
ALL_TYPES = sorted(MATVEC_TYPES, key=int)
# A wrong nibble, bit or scale anywhere moves the result by >1e-3 relative at these sizes; the kernels'
# own error (f32 accumulation, activations split into two f16 halves on tensor cores) is ~1e-7.
REL_TOL = 1e-5


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def expected(x: torch.Tensor, w, bias=None, initial=None) -> torch.Tensor:
    want = x.double() @ dequantize_reference(w).double().T
    if bias is not None:
        want = want + bias.double()
    if initial is not None:
        want = want + initial.double()
    return want


def make_weight(gguf_rows, ggml_type, n_rows, n_cols, device, seed=0):
    return pack_weight(ggml_type, gguf_rows(ggml_type, n_rows, n_cols, seed), n_cols).to(device)


# n_cols: two K-quant super-blocks; 288 = nine 32-blocks (the last step is mostly masked off);
# 100 for the float types (not a multiple of their 64-column groups: masked tail).
def shapes_for(ggml_type):
    if ggml_type in (T.F16, T.BF16, T.F32):
        return [512, 100]
    if ggml_type in (T.Q4_0, T.Q4_1, T.Q8_0):
        return [512, 288]
    return [512, 768]  # 768: 12 groups of 64 (Q4_K/Q5_K), 24 of 32 (Q6_K): a partly masked last step


CASES = [(t, k) for t in ALL_TYPES for k in shapes_for(t)]
# Both kernel paths, whatever the batch size: CUDA cores (one activation row per program) and tensor cores.
PATHS = {"cuda-cores": MatvecConfig(block_n=8, block_b=1, max_groups=16),
         "tensor-cores": MatvecConfig(block_n=16, block_b=16, max_groups=4)}
path_param = pytest.mark.parametrize("path", list(PATHS))


@pytest.mark.parametrize("ggml_type, n_cols", CASES, ids=lambda v: getattr(v, "name", str(v)))
@pytest.mark.parametrize("batch", [1, 3])
@path_param
def test_matches_reference(ggml_type, n_cols, batch, path, gguf_rows, device):
    n_rows = 37  # not a multiple of any block_n
    w = make_weight(gguf_rows, ggml_type, n_rows, n_cols, device, seed=batch)
    x = torch.randn(batch, n_cols, device=device)
    out = torch.full((batch, n_rows), float("nan"), device=device)
    assert quant_matvec(x, w, out, config=PATHS[path]) is out
    assert rel_err(out, expected(x, w)) < REL_TOL


@pytest.mark.parametrize("batch", [1, 4, 5, 40])
def test_default_config_for_every_batch_size(batch, gguf_rows, device):
    w = make_weight(gguf_rows, T.Q4_K, 16, 256, device, seed=9)
    x = torch.randn(batch, 256, device=device)  # 40 = 32 + 8: two tensor-core batch tiles, one partly masked
    out = torch.empty(batch, 16, device=device)
    quant_matvec(x, w, out)
    assert rel_err(out, expected(x, w)) < REL_TOL


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
@path_param
def test_bias_and_accumulate(ggml_type, path, gguf_rows, device):
    batch, config = 3, PATHS[path]
    n_rows, n_cols = 19, 256
    w = make_weight(gguf_rows, ggml_type, n_rows, n_cols, device, seed=7)
    x = torch.randn(batch, n_cols, device=device)
    bias = torch.randn(n_rows, device=device)
    out = torch.full((batch, n_rows), float("nan"), device=device)
    quant_matvec(x, w, out, bias=bias, config=config)
    assert rel_err(out, expected(x, w, bias)) < REL_TOL
    initial = torch.randn(batch, n_rows, device=device) * 10
    out = initial.clone()
    quant_matvec(x, w, out, accumulate=True, config=config)
    assert rel_err(out - initial, expected(x, w)) < REL_TOL
    out = initial.clone()
    quant_matvec(x, w, out, bias=bias, accumulate=True, config=config)
    assert rel_err(out, expected(x, w, bias, initial)) < REL_TOL


@pytest.mark.parametrize("ggml_type", [T.Q4_K, T.Q6_K, T.Q8_0, T.F16], ids=lambda t: t.name)
@path_param
def test_f16_activations(ggml_type, path, gguf_rows, device):
    batch = 3
    w = make_weight(gguf_rows, ggml_type, 21, 256, device, seed=11)
    x = torch.randn(batch, 256, device=device).half()
    out = torch.empty(batch, 21, device=device)
    quant_matvec(x, w, out, config=PATHS[path])
    assert rel_err(out, expected(x, w)) < REL_TOL


@pytest.mark.parametrize("ggml_type", [T.Q4_1, T.Q5_K], ids=lambda t: t.name)
def test_large_activations_keep_precision_on_tensor_cores(ggml_type, gguf_rows, device):
    # Outliers far beyond f16's range (65504) and tiny values in the same rows.
    w = make_weight(gguf_rows, ggml_type, 16, 256, device, seed=5)
    x = torch.randn(3, 256, device=device)
    x[0, 7], x[1, 200], x[2, :128] = 1.5e6, -3e5, 1e-6
    out = torch.empty(3, 16, device=device)
    quant_matvec(x, w, out, config=PATHS["tensor-cores"])
    assert rel_err(out, expected(x, w)) < REL_TOL


@pytest.mark.parametrize("ggml_type", [T.Q4_1, T.Q6_K, T.Q8_0, T.BF16], ids=lambda t: t.name)
@path_param
def test_fused_matrices_into_column_slices(ggml_type, path, gguf_rows, device, gguf_dequantize):
    """[A|B] packed from concatenated GGUF rows, written into a column slice of a wider buffer (the decode
    step's q|k|v layout), from an x that is itself a column slice."""
    n_cols, rows_a, rows_b, batch = 256, 24, 8, 3
    raw_a, raw_b = gguf_rows(ggml_type, rows_a, n_cols, 1), gguf_rows(ggml_type, rows_b, n_cols, 2)
    fused = pack_weight(ggml_type, np.concatenate([raw_a, raw_b]), n_cols).to(device)
    wide_x = torch.randn(batch, n_cols + 40, device=device)
    x = wide_x[:, 8:8 + n_cols]
    buf = torch.full((batch, 100), -7.0, device=device)
    out = buf[:, 10:10 + rows_a + rows_b]
    quant_matvec(x, fused, out, config=PATHS[path])
    ref = np.concatenate([gguf_dequantize(ggml_type, raw_a, n_cols), gguf_dequantize(ggml_type, raw_b, n_cols)])
    want = x.double() @ torch.from_numpy(ref).to(device).double().T
    assert rel_err(out, want) < REL_TOL
    assert (buf[:, :10] == -7).all() and (buf[:, 10 + rows_a + rows_b:] == -7).all()


@pytest.mark.parametrize("config", [
    MatvecConfig(block_n=4, block_b=1, max_groups=2),  # CUDA-core path, one batch row per program column
    MatvecConfig(block_n=16, block_b=16, max_groups=1),
    MatvecConfig(block_n=32, block_b=32, max_groups=8, num_warps=2),
], ids=["fma-per-row", "tc-1group", "tc-8groups"])
@pytest.mark.parametrize("ggml_type", [T.Q4_0, T.Q5_K, T.Q6_K, T.F32], ids=lambda t: t.name)
def test_launch_configs_agree(config, ggml_type, gguf_rows, device):
    w = make_weight(gguf_rows, ggml_type, 40, 512, device, seed=3)
    x = torch.randn(5, 512, device=device)
    out = torch.empty(5, 40, device=device)
    quant_matvec(x, w, out, config=config)
    assert rel_err(out, expected(x, w)) < REL_TOL


@pytest.fixture
def q4k(gguf_rows):
    return make_weight(gguf_rows, T.Q4_K, 8, 256, "cpu")


@pytest.mark.parametrize("x, out, bias, message", [
    (torch.randn(1, 256, dtype=torch.float64), torch.empty(1, 8), None, "x must be f32/f16"),
    (torch.randn(1, 255), torch.empty(1, 8), None, r"x must be f32/f16 \[B >= 1, 256\]"),
    (torch.randn(256), torch.empty(1, 8), None, "x must be"),
    (torch.randn(1, 256), torch.empty(1, 8, dtype=torch.float16), None, r"out must be f32 \[1, 8\]"),
    (torch.randn(2, 256), torch.empty(1, 8), None, r"out must be f32 \[2, 8\]"),
    (torch.randn(1, 256), torch.empty(8, 2).t()[:1], None, "out needs unit column stride"),
    (torch.randn(256, 2).t()[:1], torch.empty(1, 8), None, "x needs unit column stride"),
    (torch.randn(1, 256), torch.empty(1, 8), torch.empty(9), r"bias must be a contiguous f32 \[8\]"),
    (torch.randn(1, 256), torch.empty(1, 8), torch.empty(8, dtype=torch.float16), "bias must be"),
    (torch.randn(1, 256, device="meta"), torch.empty(1, 8), None, "x is on meta"),
])
def test_launcher_rejects_bad_arguments(q4k, x, out, bias, message):
    with pytest.raises(ValueError, match=message):
        quant_matvec(x, q4k, out, bias=bias)


def test_launcher_rejects_a_plain_tensor_weight():
    with pytest.raises(ValueError, match="w must be a QuantWeight"):
        quant_matvec(torch.randn(1, 32), torch.randn(4, 32), torch.empty(1, 4))


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_n=12, block_b=1), "block_n must be a positive power of two"),
    (dict(block_n=16, block_b=8), "block_b >= 16"),
    (dict(block_n=8, block_b=16), "block_n >= 16"),
    (dict(block_n=16, block_b=1, num_stages=0), "num_stages"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MatvecConfig(**kwargs)


def test_real_model_projection(default_model_path, device):
    """Q|K|V of layer 0 of the default model (Q4_1), fused as the runner fuses it."""
    from gguf import GGUFReader, quants

    reader = GGUFReader(default_model_path)
    tensors = {t.name: t for t in reader.tensors}
    parts = [tensors[f"blk.0.attn_{n}.weight"] for n in "qkv"]
    n_cols = int(parts[0].shape[0])
    raw = np.concatenate([np.asarray(t.data) for t in parts])
    w = pack_weight(parts[0].tensor_type, raw, n_cols).to(device)
    ref = torch.from_numpy(quants.dequantize(raw, parts[0].tensor_type)).to(device).double()
    for batch, path in ((1, "cuda-cores"), (2, "cuda-cores"), (2, "tensor-cores")):
        x = torch.randn(batch, n_cols, device=device)
        out = torch.empty(batch, w.n_rows, device=device)
        quant_matvec(x, w, out, config=PATHS[path])
        assert rel_err(out, x.double() @ ref.T) < REL_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
def test_real_shapes_on_gpu(ggml_type, gguf_rows):
    n_rows, n_cols = 4096, 11008  # llama-7B ffn_down: 43 K-quant super-blocks per row
    w = make_weight(gguf_rows, ggml_type, n_rows, n_cols, "cuda", seed=1)
    ref = dequantize_reference(w).double()
    for batch in (1, 3, 8, 32):  # default configs: CUDA cores up to 4, tensor cores above
        x = torch.randn(batch, n_cols, device="cuda")
        out = torch.empty(batch, n_rows, device="cuda")
        quant_matvec(x, w, out)
        assert rel_err(out, x.double() @ ref.T) < REL_TOL, batch


@pytest.mark.gpu
def test_graph_capture_replays_new_inputs(gguf_rows):
    w = make_weight(gguf_rows, T.Q4_K, 1024, 2048, "cuda", seed=1)
    x = torch.randn(2, 2048, device="cuda")
    out = torch.zeros(2, 1024, device="cuda")
    quant_matvec(x, w, out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        quant_matvec(x, w, out, accumulate=True)
    out.zero_()
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert rel_err(out, expected(x, w)) < REL_TOL
