"""dequantize_into (f16, for prefill) and gather_rows (embedding lookup) against the torch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType

from replayllm.kernels.quant_dequant import _small_int_to_f32, dequantize_into, gather_rows, plan_steps
from replayllm.kernels.quant_weight import MATVEC_TYPES, dequantize_reference, pack_weight

T = GGMLQuantizationType
ALL_TYPES = sorted(MATVEC_TYPES, key=int)


def n_cols_for(ggml_type) -> int:
    return 100 if ggml_type in (T.F16, T.BF16, T.F32) else 768  # 100: a masked tail for the float types


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_into_is_the_reference_rounded_to_f16(ggml_type, gguf_rows, device):
    n_rows, n_cols = 21, n_cols_for(ggml_type)
    w = pack_weight(ggml_type, gguf_rows(ggml_type, n_rows, n_cols, seed=2), n_cols).to(device)
    out = torch.full((n_rows, n_cols), float("nan"), dtype=torch.float16, device=device)
    assert dequantize_into(w, out) is out
    # Kernel and reference compute each weight in f32 with the same single rounding, then round to f16 once.
    assert torch.equal(out, dequantize_reference(w).half())


@pytest.mark.parametrize("ggml_type", [T.Q4_K, T.Q6_K, T.Q8_0, T.F16], ids=lambda t: t.name)
def test_dequantize_into_a_slice_of_rows(ggml_type, gguf_rows, device):
    n_rows, n_cols = 21, n_cols_for(ggml_type)
    w = pack_weight(ggml_type, gguf_rows(ggml_type, n_rows, n_cols, seed=4), n_cols).to(device)
    out = torch.full((9, n_cols), float("nan"), dtype=torch.float16, device=device)
    dequantize_into(w, out, row_start=11)
    assert torch.equal(out, dequantize_reference(w)[11:20].half())
    with pytest.raises(ValueError, match="outside the weight"):
        dequantize_into(w, out, row_start=13)


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_gather_rows_equals_reference_rows(ggml_type, id_dtype, gguf_rows, device, gguf_dequantize):
    n_rows, n_cols = 50, n_cols_for(ggml_type)
    raw = gguf_rows(ggml_type, n_rows, n_cols, seed=3)
    w = pack_weight(ggml_type, raw, n_cols).to(device)
    ids = torch.tensor([49, 0, 7, 7, 23], dtype=id_dtype, device=device)
    out = torch.full((5, n_cols), float("nan"), device=device)
    assert gather_rows(w, ids, out) is out
    want = gguf_dequantize(ggml_type, raw, n_cols)[ids.cpu().numpy()]
    np.testing.assert_array_equal(out.cpu().numpy(), want)


def test_gather_rows_into_strided_rows_and_clamps_bad_ids(gguf_rows, device):
    w = pack_weight(T.Q6_K, gguf_rows(T.Q6_K, 10, 256, seed=4), 256).to(device)
    wide = torch.zeros(3, 300, device=device)
    out = wide[:, 20:276]
    gather_rows(w, torch.tensor([2, -5, 99], device=device), out)
    ref = dequantize_reference(w)
    assert torch.equal(out, ref[[2, 0, 9]])  # out-of-range ids are clamped, never read out of bounds
    assert (wide[:, :20] == 0).all() and (wide[:, 276:] == 0).all()


def test_gather_no_rows_is_a_no_op(gguf_rows, device):
    w = pack_weight(T.Q8_0, gguf_rows(T.Q8_0, 4, 64, seed=5), 64).to(device)
    out = torch.empty(0, 64, device=device)
    assert gather_rows(w, torch.empty(0, dtype=torch.int64, device=device), out) is out


def test_plan_steps_covers_the_row_in_groups(gguf_rows):
    def plan(ggml_type, n_cols, max_groups):
        w = pack_weight(ggml_type, gguf_rows(ggml_type, 1, n_cols, seed=0), n_cols)
        p = plan_steps(w, max_groups)
        return p.groups, p.width, p.n_groups, p.n_steps

    assert plan(T.Q4_0, 288, 8) == (8, 16, 9, 2)  # nine blocks: the second step has one live group
    assert plan(T.Q4_0, 512, 8) == (8, 16, 16, 2)
    assert plan(T.Q4_0, 64, 8) == (2, 16, 2, 1)  # never wider than the row
    assert plan(T.Q4_K, 768, 8) == (8, 32, 12, 2)  # groups of 64 weights
    assert plan(T.Q6_K, 768, 4) == (4, 16, 24, 6)  # groups of 32 weights
    assert plan(T.F16, 100, 8) == (2, 32, 2, 1)  # 2 groups of 64 columns cover 100, the tail masked
    assert plan(T.F32, 1000, 4) == (4, 32, 16, 4)


@pytest.mark.parametrize("call, message", [
    (lambda w: dequantize_into(w, torch.empty(4, 256)), r"out must be torch.float16 \[4, 256\]"),
    (lambda w: dequantize_into(w, torch.empty(4, 255, dtype=torch.float16)), "out must be"),
    (lambda w: dequantize_into(w, torch.empty(256, 4, dtype=torch.float16).t()), "stride"),
    (lambda w: dequantize_into(torch.empty(4, 256), torch.empty(4, 256)), "QuantWeight"),
    (lambda w: gather_rows(w, torch.tensor([0.0]), torch.empty(1, 256)), "int32/int64"),
    (lambda w: gather_rows(w, torch.tensor([[0]]), torch.empty(1, 256)), "1-D"),
    (lambda w: gather_rows(w, torch.tensor([0, 1]), torch.empty(1, 256)), r"out must be torch.float32 \[2, 256\]"),
    (lambda w: gather_rows(w, torch.tensor([0, 1], device="meta"), torch.empty(2, 256)), "on cpu"),
    (lambda w: gather_rows(w, torch.tensor([0]), torch.empty(1, 256, device="meta")), "out is on meta"),
])
def test_launchers_reject_bad_arguments(call, message, gguf_rows):
    w = pack_weight(T.Q4_K, gguf_rows(T.Q4_K, 4, 256, seed=0), 256)
    with pytest.raises(ValueError, match=message):
        call(w)


@pytest.mark.gpu
@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
def test_real_shapes_on_gpu(ggml_type, gguf_rows):
    n_rows, n_cols = 4096, 11008
    w = pack_weight(ggml_type, gguf_rows(ggml_type, n_rows, n_cols, seed=1), n_cols).to("cuda")
    ref = dequantize_reference(w)
    out = torch.empty(n_rows, n_cols, dtype=torch.float16, device="cuda")
    dequantize_into(w, out)
    assert torch.equal(out, ref.half())
    ids = torch.tensor([4095, 0, 1234], device="cuda")
    rows = torch.empty(3, n_cols, device="cuda")
    gather_rows(w, ids, rows)
    assert torch.equal(rows, ref[ids])


@triton.jit
def _to_f32_kernel(q_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, _small_int_to_f32(tl.load(q_ptr + i, mask=i < n)), mask=i < n)


def test_small_int_to_f32_is_exact_over_its_range(device):
    edges = [-(2**22) + 1, -(2**22) + 2, -1000003, -1, 0, 1, 65535, 2**21 + 7, 2**22 - 1]
    q = torch.tensor(list(range(-300, 300)) + edges, dtype=torch.int32, device=device)
    out = torch.full(q.shape, float("nan"), device=device)
    _to_f32_kernel[(triton.cdiv(q.numel(), 256),)](q, out, q.numel(), BLOCK=256)
    assert torch.equal(out, q.float())
