"""The kernel benchmark's bookkeeping on the CPU (the kernels under Triton's interpreter, the timer stubbed)."""

from __future__ import annotations

import pytest
import torch

from replayllm import LLM
from replayllm.bench import kernel_bench
from replayllm.engine.gpu_backend import GPUBackend


def test_rows_cover_every_kernel_kind_with_the_bytes_it_reads(tiny_model_path, monkeypatch):
    calls = []

    def fake_time(body):
        body()  # the captured body must really run
        calls.append(1)
        return 0.5  # ms

    monkeypatch.setattr(kernel_bench, "time_graph_replay", fake_time)
    llm = LLM(tiny_model_path, device="cpu", progress=False, max_context=64)
    backend = GPUBackend(llm.model_file, 64, mode="eager", progress=False, device=torch.device("cpu"))
    try:
        rows = kernel_bench.kernel_rows(backend, 20)
        int8_rows = kernel_bench.kernel_rows(backend, 20, attention=False, activations="int8")
        wide_rows = kernel_bench.kernel_rows(backend, 20, attention=False, activations="16bit")
        with pytest.raises(ValueError, match="activations must be one of"):
            kernel_bench.kernel_rows(backend, 20, activations="fp8")
    finally:
        backend.close()
        llm.close()
    names = [r.kernel for r in rows]
    assert names == ["qkv", "attn_output", "gate_up", "ffn_down", "lm_head", "attention@20"] and len(calls) == 16
    assert [r.kernel for r in int8_rows] == [f"{n} int8" for n in names[:5]]
    assert [r.kernel for r in wide_rows] == [f"{n} 16bit" for n in names[:5]]
    assert [r.bytes_per_step for r in int8_rows] == [r.bytes_per_step for r in rows[:5]]
    assert [r.bytes_per_step for r in wide_rows] == [r.bytes_per_step for r in rows[:5]]
    cfg = llm.config
    down = rows[3]
    assert down.launches_per_step == cfg.num_layers
    # Q8_0: 34 bytes per 32 weights; the packed form keeps the same bytes (scales split out).
    assert down.bytes_per_step == cfg.num_layers * cfg.hidden_size * cfg.intermediate_size * 34 // 32
    assert down.gbps == down.bytes_per_step / 0.5e-3 / 1e9
    attention = rows[-1]
    assert attention.bytes_per_step == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * 21
    table = kernel_bench.kernel_table(rows, step_us=1000.0, copy_gbps=100.0)
    assert table.count("\n") == len(rows) + 1 and "| 50 |" in table  # 500 us of a 1000 us step
