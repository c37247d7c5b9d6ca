"""rmsnorm / add_rmsnorm against the float64 torch reference (and the reference against torch's own RMSNorm).

Metric: ||kernel - reference|| / ||reference|| < 1e-5 (f32 math; a wrong mean, eps or weight is off by >1e-3).
Outputs are poisoned with NaN first so an element the kernel never writes fails the check.
"""

from __future__ import annotations

import pytest
import torch

from replayllm.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_reference, rmsnorm, rmsnorm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = 1e-5


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def _poisoned(*shape) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=torch.float32, device=DEVICE)


def test_reference_matches_torch_rms_norm():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 40, generator=gen), torch.randn(40, generator=gen)
    expected = torch.nn.functional.rms_norm(x.double(), (40,), w.double(), eps=1e-6)
    assert _relative_error(rmsnorm_reference(x, w, 1e-6), expected) < 1e-7


@pytest.mark.parametrize("rows, row_size", [(1, 64), (3, 100), (5, 1000)])
def test_rmsnorm_matches_reference(rows, row_size):
    gen = torch.Generator().manual_seed(rows * row_size)
    x = (torch.randn(rows, row_size, generator=gen) * 3 + 0.5).to(DEVICE)
    w = torch.randn(row_size, generator=gen).to(DEVICE)
    out = _poisoned(rows, row_size)
    assert rmsnorm(x, w, 1e-5, out) is out
    assert _relative_error(out, rmsnorm_reference(x, w, 1e-5)) < TOLERANCE


def test_eps_is_added_to_the_mean_square():
    # tiny inputs: the result depends on eps as much as on x
    x = torch.full((2, 16), 1e-3, device=DEVICE)
    w = torch.ones(16, device=DEVICE)
    out = _poisoned(2, 16)
    rmsnorm(x, w, 1e-6, out)
    expected = 1e-3 / (1e-6 + 1e-6) ** 0.5
    assert torch.allclose(out, torch.full_like(out, expected), rtol=1e-6)


def test_rmsnorm_in_place_on_head_view():
    # qwen3's QK norm: q [B, H, Dh] normalised per head, out aliasing the input
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 32, generator=gen).to(DEVICE)
    w = torch.randn(32, generator=gen).to(DEVICE)
    expected = rmsnorm_reference(q.view(-1, 32), w, 1e-6).view(2, 3, 32)
    flat = q.view(-1, 32)
    rmsnorm(flat, w, 1e-6, flat)
    assert _relative_error(q, expected) < TOLERANCE


def test_rmsnorm_accepts_row_strided_views():
    gen = torch.Generator().manual_seed(2)
    wide = torch.randn(4, 96, generator=gen).to(DEVICE)
    x = wide[:, 16:80]  # row stride 96
    w = torch.randn(64, generator=gen).to(DEVICE)
    out_wide = _poisoned(4, 128)
    out = out_wide[:, :64]
    rmsnorm(x, w, 1e-6, out)
    assert _relative_error(out, rmsnorm_reference(x, w, 1e-6)) < TOLERANCE
    assert out_wide[:, 64:].isnan().all()  # nothing written outside the view


@pytest.mark.parametrize("rows, row_size", [(1, 48), (4, 576)])
def test_add_rmsnorm_updates_residual_and_normalises_the_sum(rows, row_size):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(rows, row_size, generator=gen).to(DEVICE)
    residual = (torch.randn(rows, row_size, generator=gen) * 4).to(DEVICE)
    w = torch.randn(row_size, generator=gen).to(DEVICE)
    expected_out, expected_residual = add_rmsnorm_reference(x, residual, w, 1e-5)
    out = _poisoned(rows, row_size)
    add_rmsnorm(x, residual, w, 1e-5, out)
    assert _relative_error(residual, expected_residual) < 1e-7
    assert _relative_error(out, expected_out) < TOLERANCE


def test_add_rmsnorm_reference_is_rmsnorm_of_the_sum():
    gen = torch.Generator().manual_seed(4)
    x, r, w = torch.randn(2, 8, generator=gen), torch.randn(2, 8, generator=gen), torch.randn(8, generator=gen)
    out, summed = add_rmsnorm_reference(x, r, w, 1e-6)
    assert torch.equal(summed, x + r)
    assert _relative_error(out, rmsnorm_reference(x + r, w, 1e-6)) < 1e-6


@pytest.mark.parametrize("make_args, message", [
    (lambda: (torch.zeros(2, 8, dtype=torch.float16), torch.ones(8), torch.zeros(2, 8)), "x: expected dtype"),
    (lambda: (torch.zeros(2, 8), torch.ones(7), torch.zeros(2, 8)), r"weight: expected shape \[8\]"),
    (lambda: (torch.zeros(2, 8), torch.ones(8), torch.zeros(3, 8)), r"out: expected shape \[2, 8\]"),
    (lambda: (torch.zeros(8, 2).t(), torch.ones(8), torch.zeros(2, 8)), "x: the last dimension must have stride 1"),
])
def test_rmsnorm_rejects_bad_arguments(make_args, message):
    x, w, out = make_args()
    with pytest.raises(ValueError, match=message):
        rmsnorm(x, w, 1e-6, out)


def test_add_rmsnorm_rejects_residual_aliasing_out():
    x, r = torch.zeros(2, 8), torch.zeros(2, 8)
    with pytest.raises(ValueError, match="residual must not share memory"):
        add_rmsnorm(x, r, torch.ones(8), 1e-6, r)


@pytest.mark.gpu
def test_rmsnorm_at_model_shapes_and_in_cuda_graph():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 4096, generator=gen).cuda()
    residual = torch.randn(8, 4096, generator=gen).cuda()
    w = torch.randn(4096, generator=gen).cuda()
    out = torch.empty_like(x)
    add_rmsnorm(x, residual.clone(), w, 1e-5, out)  # compile outside the capture
    start = residual.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        add_rmsnorm(x, residual, w, 1e-5, out)
    residual.copy_(start)
    for _ in range(2):  # each replay adds x again
        expected_out, expected_residual = add_rmsnorm_reference(x, residual, w, 1e-5)
        graph.replay()
        torch.cuda.synchronize()
        assert _relative_error(residual, expected_residual) < 1e-7
        assert _relative_error(out, expected_out) < TOLERANCE


@pytest.mark.parametrize("wide", [False, True], ids=["int8", "16bit"])
@pytest.mark.parametrize("rows, row_size", [(1, 4096), (2, 96)])  # 96: a masked block past the row in BLOCK_D
def test_quantized_copy_equals_quantize_activations_of_the_output(wide, rows, row_size):
    """The int8 or 16-bit copy written by the same launch has the quants and scales quantize_activations makes of
    `out`, bit for bit, and its block sums."""
    from replayllm.kernels.int8_activations import QuantizedActivations, quantize_activations, wide_values

    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(rows, row_size, generator=gen) * 4).to(DEVICE)
    w = torch.randn(row_size, generator=gen).to(DEVICE)
    out, fused = _poisoned(rows, row_size), QuantizedActivations.allocate(rows, row_size, DEVICE, wide=wide)
    rmsnorm(x, w, 1e-5, out, out_q8=fused)
    separate = quantize_activations(out, QuantizedActivations.allocate(rows, row_size, DEVICE, wide=wide))
    assert _relative_error(out, rmsnorm_reference(x, w, 1e-5)) < TOLERANCE
    assert torch.equal(fused.q, separate.q) and wide_values(fused.q).abs().max() == (32512 if wide else 127)
    assert torch.equal(fused.scale, separate.scale)
    # The block sums come from two kernels' reductions, which add in different orders on a GPU (f32 rounding).
    assert torch.allclose(fused.block_sum, separate.block_sum, rtol=1e-5, atol=1e-5)


def test_quantized_copy_needs_whole_blocks():
    from replayllm.kernels.int8_activations import QuantizedActivations

    x = torch.zeros(1, 40, device=DEVICE)
    q8 = QuantizedActivations(torch.zeros(1, 40, dtype=torch.int8), torch.zeros(1, 1), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="multiple of 32"):
        rmsnorm(x, torch.ones(40, device=DEVICE), 1e-5, torch.zeros_like(x), out_q8=q8)


@pytest.mark.parametrize("wide", [False, True], ids=["int8", "16bit"])
@pytest.mark.parametrize("rows, row_size", [(1, 4096), (3, 576)])  # 576: the last slice of each row is partial
def test_sliced_rows_give_what_one_program_a_row_gives(wide, rows, row_size):
    """At decode batch sizes a row is cut into slices, one program each (each re-reads the row for its mean
    square). Against the reference, and against the one-program-a-row kernel (taken by rows past
    SLICED_MAX_ROWS): the same normalised values within f32 rounding, the same quants but where a value sits on
    a rounding boundary."""
    import importlib

    module = importlib.import_module("replayllm.kernels.rmsnorm")  # the package exports the function by this name
    from replayllm.kernels.int8_activations import QuantizedActivations, wide_values

    assert module.sliced(rows, row_size, has_residual=False, out_overlaps_x=False)
    gen = torch.Generator().manual_seed(rows + row_size)
    x = (torch.randn(rows, row_size, generator=gen) * 2 + 0.25).to(DEVICE)
    w = torch.randn(row_size, generator=gen).to(DEVICE)
    out, q = _poisoned(rows, row_size), QuantizedActivations.allocate(rows, row_size, DEVICE, wide=wide)
    rmsnorm(x, w, 1e-5, out, out_q8=q)
    assert _relative_error(out, rmsnorm_reference(x, w, 1e-5)) < TOLERANCE
    padded = module.SLICED_MAX_ROWS + 1  # the same rows, then copies: one program a row
    many = x.repeat(-(-padded // rows), 1)[:padded]
    assert not module.sliced(padded, row_size, has_residual=False, out_overlaps_x=False)
    out_one, q_one = _poisoned(padded, row_size), QuantizedActivations.allocate(padded, row_size, DEVICE, wide=wide)
    rmsnorm(many, w, 1e-5, out_one, out_q8=q_one)
    assert torch.allclose(out, out_one[:rows], rtol=1e-6, atol=1e-6)
    step = (wide_values(q.q) - wide_values(q_one.q[:rows])).abs()
    assert step.max() <= 1 and (step > 0).float().mean() < 1e-3
    assert torch.allclose(q.scale, q_one.scale[:rows], rtol=1e-6)
    assert torch.allclose(q.block_sum, q_one.block_sum[:rows], rtol=1e-5, atol=1e-5)


def test_rows_are_sliced_only_where_no_program_reads_what_another_writes():
    import importlib

    module = importlib.import_module("replayllm.kernels.rmsnorm")  # the package exports the function by this name

    assert module.sliced(1, 4096, has_residual=False, out_overlaps_x=False)
    assert not module.sliced(1, 4096, has_residual=True, out_overlaps_x=False)  # residual += x, read by all
    assert not module.sliced(1, 4096, has_residual=False, out_overlaps_x=True)  # in place
    assert not module.sliced(1, module.SLICED_MIN_ROW_SIZE - 1, has_residual=False, out_overlaps_x=False)
    x = torch.zeros(2, 1024)
    assert module._overlaps(x, x) and module._overlaps(x[1:], x) and not module._overlaps(x[:1], x[1:])


def test_in_place_rmsnorm_of_a_long_row_is_not_sliced_and_stays_correct():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 2048, generator=gen).to(DEVICE)
    w = torch.randn(2048, generator=gen).to(DEVICE)
    expected = rmsnorm_reference(x, w, 1e-5)
    rmsnorm(x, w, 1e-5, x)
    assert _relative_error(x, expected) < TOLERANCE
