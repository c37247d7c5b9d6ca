"""The decode GEMVs' load-time launch-shape tuning (runner/gemv_tuning), with a stand-in timer: which shape wins,
what the cache keeps, and what the decode step's projections then launch."""

from __future__ import annotations

import json

import pytest
import torch
from gguf import GGMLQuantizationType

from replayllm.kernels.int8_activations import QuantizedActivations, quantize_activations
from replayllm.kernels.quant_matvec_q8 import quant_matvec_q8_reference
from replayllm.kernels.quant_weight import pack_weight
from replayllm.runner.decode_step import project
from replayllm.runner.gemv_tuning import (
    DEFAULT_SHAPE,
    GemvShape,
    GemvShapeCache,
    GemvShapes,
    candidates_for,
    matrices_by_shape,
    shape_key,
    tune_gemv_shapes,
)
from replayllm.synth.random_rows import random_gguf_rows

T = GGMLQuantizationType


@pytest.fixture
def matrices():
    """Two Q4_K matrices of one shape, one Q8_0, one F16 (float_matvec's), one F32 (the general GEMV: not tuned)."""
    def make(ggml_type, n_rows, n_cols, seed):
        return pack_weight(ggml_type, random_gguf_rows(ggml_type, n_rows, n_cols, seed=seed), n_cols)
    return [make(T.Q4_K, 12, 256, 0), make(T.Q4_K, 12, 256, 1), make(T.Q8_0, 8, 64, 2), make(T.F16, 4, 64, 3),
            make(T.F32, 4, 64, 4)]


class FakeTimer:
    """Runs each body (so every candidate's launch is exercised) and answers the next of `times` (ms); raises
    for the call numbers in `failing`."""

    def __init__(self, times, failing=()):
        self.times, self.failing, self.calls = list(times), set(failing), 0

    def __call__(self, body):
        self.calls += 1
        if self.calls in self.failing:
            raise RuntimeError("out of resources")
        body()
        return self.times.pop(0)


def test_candidates_keep_row_tiles_for_the_types_that_take_them():
    q4k, q40 = candidates_for(T.Q4_K), candidates_for(T.Q4_0)
    assert q4k[0] == DEFAULT_SHAPE and {s.rows for s in q4k} == {1, 2, 4}
    assert {s.rows for s in q40} == {1} and len(set(q40)) == len(q40) < len(q4k)


def test_matrices_are_grouped_by_type_and_shape_each_once(matrices):
    groups = matrices_by_shape([*matrices, matrices[0]])  # a tied embedding appears twice
    assert list(groups) == [("Q4_K", 12, 256), ("Q8_0", 8, 64), ("F16", 4, 64)]  # F32: not tuned
    assert [len(g) for g in groups.values()] == [2, 1, 1]


def test_the_fastest_candidate_wins_and_the_cache_keeps_it(matrices, tmp_path):
    n_q4k, n_q80, n_f16 = (len(candidates_for(t)) for t in (T.Q4_K, T.Q8_0, T.F16))
    q4k_times = [5.0] * n_q4k
    q4k_times[2] = 1.0  # the third candidate
    f16_times = [2.0] * n_f16
    f16_times[-1] = 1.5
    timer = FakeTimer(q4k_times + [3.0] * n_q80 + f16_times)  # Q8_0: all equal, so the default stays
    path = tmp_path / "gemv.json"
    shapes = tune_gemv_shapes(matrices, ("16bit",), GemvShapeCache(path), timer=timer)
    assert timer.calls == n_q4k + n_q80 + n_f16  # F16 once, against f32 activations
    assert shapes.table[("Q4_K", 12, 256, "16bit")] == candidates_for(T.Q4_K)[2]
    assert shapes.table[("Q8_0", 8, 64, "16bit")] == DEFAULT_SHAPE
    assert shapes.table[("F16", 4, 64, "f32")] == candidates_for(T.F16)[-1]
    assert len(shapes.as_json()) == 3 and shapes.as_json()[0]["ms"]

    again = FakeTimer([])
    assert tune_gemv_shapes(matrices, ("16bit",), GemvShapeCache(path), timer=again).table == shapes.table
    assert again.calls == 0  # all from the file: nothing timed

    saved = json.loads(path.read_text())
    saved["entries"]["Q4_K:12x256:16bit"] = {"block_n": 3, "chunks": 32, "num_warps": 2, "rows": 1}  # not a candidate
    path.write_text(json.dumps(saved))
    third = FakeTimer([1.0] + [2.0] * (n_q4k - 1))
    assert tune_gemv_shapes(matrices, ("16bit",), GemvShapeCache(path), timer=third).table[
        ("Q4_K", 12, 256, "16bit")] == DEFAULT_SHAPE
    assert third.calls == n_q4k  # that one shape measured again


def test_progress_counts_every_candidate_to_time(matrices, capsys):
    n = len(candidates_for(T.Q4_K))
    tune_gemv_shapes(matrices[:2], ("16bit",), None, timer=FakeTimer([1.0] * n), progress=True)
    err = capsys.readouterr().err
    assert "tuning decode GEMVs" in err and f"{n}/{n}" in err


def test_a_failing_candidate_is_skipped_with_a_warning(matrices):
    n = len(candidates_for(T.Q4_K))
    timer = FakeTimer([4.0] * (n - 2) + [0.5], failing={1})  # the default fails; the last candidate is fastest
    with pytest.warns(UserWarning, match="decode GEMV shape .* failed"):
        shapes = tune_gemv_shapes(matrices[:2], ("int8",), None, timer=timer)
    assert shapes.table[("Q4_K", 12, 256, "int8")] == candidates_for(T.Q4_K)[-1]


def test_projections_launch_the_tuned_shape_at_batch_one_only(matrices):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    w = matrices[0].to(device)
    tuned = GemvShape(block_n=4, chunks=2, num_warps=1, rows=2)
    shapes = GemvShapes({shape_key(w, "16bit"): tuned})
    x = torch.randn(2, 256, device=device)
    xq1 = quantize_activations(x[:1], QuantizedActivations.allocate(1, 256, device, wide=True))
    xq2 = quantize_activations(x, QuantizedActivations.allocate(2, 256, device, wide=True))
    assert shapes.launch_args(w, "16bit", 1) == {"block_n": 4, "chunks": 2, "num_warps": 1, "rows": 2}
    assert shapes.launch_args(w, "16bit", 2) == {}  # tuned for batch 1
    assert shapes.launch_args(w, "int8", 1) == {}  # another form: not tuned
    out = torch.full((1, 12), float("nan"), device=device)
    project(x[:1], [w], out, None, xq1, shapes=shapes)
    want = quant_matvec_q8_reference(xq1, w)
    assert ((out.double() - want).norm() / want.norm()).item() < 1e-5
    assert xq2.q.shape[0] == 2


def test_float_matrices_take_float_matvec_at_small_batches(matrices, monkeypatch):
    from replayllm.runner import decode_step

    w = matrices[3]  # F16 [4, 64]
    calls = []
    real = decode_step.float_matvec
    monkeypatch.setattr(decode_step, "float_matvec", lambda *a, **k: calls.append(k) or real(*a, **k))
    shapes = GemvShapes({shape_key(w, "f32"): GemvShape(2, 4, 1, 2)})
    x = torch.randn(5, 64)
    for batch in (1, 4, 5):
        out = torch.full((batch, 4), float("nan"))
        project(x[:batch], [w], out, None, None, shapes=shapes)
        want = x[:batch].double() @ w.qs.double().T
        assert ((out.double() - want).norm() / want.norm()).item() < 1e-6
    assert len(calls) == 2 and calls[0]["rows"] == 2 and "rows" not in calls[1]  # batch 5: quant_matvec
