"""LinearMethods: the per-shape, per-size choice of prefill GEMM that tune_methods fills on the GPU."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from replayllm.kernels import QuantWeight
from replayllm.kernels.quant_matmul import MatmulConfig
from replayllm.runner.prefill_tuning import DEQUANT_GEMM, FUSED, Choice, LinearMethods, shape_key

T = GGMLQuantizationType


def f16_weight(n_rows: int, n_cols: int) -> QuantWeight:
    return QuantWeight(T.F16, n_rows, n_cols, torch.zeros(n_rows, n_cols, dtype=torch.float16))


def test_the_bucket_at_or_above_the_row_count_decides_and_the_last_covers_more():
    w = f16_weight(64, 32)
    wide = MatmulConfig(block_m=128)
    methods = LinearMethods({shape_key(w): [
        Choice(16, FUSED, None, 1.0, 2.0), Choice(128, DEQUANT_GEMM, None, 3.0, 2.5),
        Choice(2048, FUSED, wide, 9.0, 9.5)]})
    assert [methods.get(w, rows).method for rows in (1, 16, 17, 128, 129, 2048, 5000)] == [
        FUSED, FUSED, DEQUANT_GEMM, DEQUANT_GEMM, FUSED, FUSED, FUSED]
    assert methods.get(w, 1000).config == wide and methods.get(w, 5).config is None
    assert methods.uses(DEQUANT_GEMM) and not LinearMethods({shape_key(w): [Choice(16, FUSED)]}).uses(DEQUANT_GEMM)


def test_unmeasured_shapes_use_the_fused_gemm_and_json_lists_every_entry():
    measured, other = f16_weight(64, 32), f16_weight(32, 64)
    methods = LinearMethods({shape_key(measured): [Choice(16, DEQUANT_GEMM, None, float("inf"), 0.5)]})
    assert methods.get(other, 100) == Choice(100, FUSED)
    assert methods.as_json() == [{"type": "F16", "n_rows": 64, "n_cols": 32, "rows": 16, "method": DEQUANT_GEMM,
                                  "config": None, "fused_ms": None, "dequant_gemm_ms": 0.5}]


def test_tuning_times_every_layer_shape_at_every_bucket(tiny_model_path, monkeypatch):
    """tune_methods on the CPU (wall-clock timing, the interpreter's kernels): one choice per layer shape and
    bucket up to the chunk, each a method that was timed, and the fused shapes' configs among FUSED_CONFIGS.
    Every timing multiplies views of one activation pool made for the chunk (so the tuning needs no more memory
    than a pass of it), with the input dtype a pass gives the matrix."""
    from replayllm import LLM
    from replayllm.engine.gpu_backend import GPUBackend
    from replayllm.runner import prefill_tuning
    from replayllm.runner.prefill import ACT_DTYPE
    from replayllm.runner.prefill_tuning import FUSED_CONFIGS, tune_methods

    llm = LLM(tiny_model_path, device="cpu", progress=False, max_context=64)
    backend = GPUBackend(llm.model_file, 64, mode="eager", progress=False, device=torch.device("cpu"))
    try:
        prefiller = backend.prefiller
        pools, multiplied = [], []  # multiplied: (x, w, out) of every timed call, both methods
        real_pool, real_dequant = prefiller.activation_pool, prefiller.dequant_gemm
        real_fused = prefill_tuning.quant_matmul
        monkeypatch.setattr(prefiller, "activation_pool", lambda rows: pools.append(real_pool(rows)) or pools[-1])
        monkeypatch.setattr(prefiller, "dequant_gemm",
                            lambda x, w, out, *a: multiplied.append((x, w, out)) or real_dequant(x, w, out, *a))
        monkeypatch.setattr(prefill_tuning, "quant_matmul",
                            lambda x, w, out, **k: multiplied.append((x, w, out)) or real_fused(x, w, out, **k))
        methods = tune_methods(prefiller, 24)
        layer_shapes = {shape_key(w) for w in prefiller.weights.layer_matrices()}
        assert set(methods.table) == layer_shapes
        for choices in methods.table.values():
            assert [c.rows for c in choices] == [16, 24]
            for c in choices:
                assert c.fused_ms > 0 and c.dequant_ms > 0
                assert (c.method == FUSED) == (c.fused_ms <= c.dequant_ms)
                assert (c.config in FUSED_CONFIGS) if c.method == FUSED else c.config is None
        assert len(methods.as_json()) == 2 * len(layer_shapes)
        assert len(pools) == 1 and pools[0].tokens == 24
        pool_start = pools[0].storage.data_ptr()
        pool_end = pool_start + pools[0].storage.numel()
        downs = {shape_key(layer.ffn_down) for layer in prefiller.weights.layers}
        assert {len(x) for x, _, _ in multiplied} == {16, 24}
        for x, w, out in multiplied:
            for t in (x, out):
                assert pool_start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= pool_end
            assert x.dtype == (ACT_DTYPE if shape_key(w) in downs else torch.float32)
    finally:
        backend.close()
        llm.close()


def test_dequantized_slices_keep_the_vendor_gemm_aligned():
    from replayllm.runner.prefill import SLICE_ALIGN, slice_rows

    scratch = 32 * 2**20  # elements (64 MiB of f16)
    assert slice_rows(8192, 4096, scratch) == 8192  # fits whole
    for n_rows, n_cols in ((15360, 5120), (27648, 5120), (5120, 13824), (22016, 4096), (4096, 11008)):
        rows = slice_rows(n_rows, n_cols, scratch)
        assert rows % SLICE_ALIGN == 0 and 0 < rows * n_cols <= scratch
        assert rows > scratch // n_cols - SLICE_ALIGN  # no more than one aligned step lost
    assert slice_rows(100, 10**6, 5 * 10**7) == 50  # fewer than SLICE_ALIGN rows fit: as many as fit
    assert slice_rows(10, 10**8, 10**7) == 1  # not even one row fits: one row (the scratch holds a row)


def test_the_tuning_cache_round_trips_and_survives_a_bad_file(tmp_path):
    import json
    import warnings

    from replayllm.runner.prefill_tuning import TuningCache

    path = tmp_path / "sub" / "gpu.json"
    cache = TuningCache(path)  # no file yet: empty, no warning
    key = ("Q4_K", 4096, 11008)
    fused = Choice(128, FUSED, MatmulConfig(block_m=128), 0.25, 0.5)
    vendor = Choice(512, DEQUANT_GEMM, None, 2.0, 0.75)
    cache.put(key, fused)
    cache.put(key, vendor)
    cache.save()
    again = TuningCache(path)
    assert again.get(key, 128) == fused and again.get(key, 512) == vendor and again.get(key, 16) is None
    assert not again.changed
    entries = json.loads(path.read_text())["entries"]
    entries["Q4_K:4096x11008:512"]["method"] = "warp-drive"  # a malformed entry is measured again
    path.write_text(json.dumps({"version": TuningCache.VERSION, "entries": entries}))
    assert TuningCache(path).get(key, 512) is None and TuningCache(path).get(key, 128) == fused
    path.write_text("{not json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        broken = TuningCache(path)
    assert broken.entries == {} and any("unreadable" in str(w.message) for w in caught)


def test_tuning_with_a_cache_measures_each_shape_once(tiny_model_path, tmp_path, monkeypatch):
    """A second tuning against the same cache times nothing and makes the same choices: two loads of a model
    pick the same methods, so their prefills agree bit for bit."""
    from replayllm import LLM
    from replayllm.engine.gpu_backend import GPUBackend
    from replayllm.runner import prefill_tuning
    from replayllm.runner.prefill_tuning import TuningCache, tune_methods

    llm = LLM(tiny_model_path, device="cpu", progress=False, max_context=64)
    backend = GPUBackend(llm.model_file, 64, mode="eager", progress=False, device=torch.device("cpu"))
    try:
        path = tmp_path / "tuning.json"
        first = tune_methods(backend.prefiller, 24, TuningCache(path))
        timed = []
        real = prefill_tuning.time_ms
        monkeypatch.setattr(prefill_tuning, "time_ms", lambda *a, **k: timed.append(1) or real(*a, **k))
        second = tune_methods(backend.prefiller, 24, TuningCache(path))
        assert timed == [] and second.table == first.table
        third = tune_methods(backend.prefiller, 40, TuningCache(path))  # a new bucket (40 rows) is measured
        assert timed and all(c.rows in (16, 40) for cs in third.table.values() for c in cs)
    finally:
        backend.close()
        llm.close()
