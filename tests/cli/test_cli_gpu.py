"""`replayllm bench` and `replayllm profile` end to end on the GPU, on the tiny synthetic model (gpu marker)."""

from __future__ import annotations

import json

import pytest

from replayllm.cli.main import main

pytestmark = pytest.mark.gpu


def test_bench_prints_the_table_and_writes_json(capsys, tiny_model_path, tmp_path):
    out_json = tmp_path / "bench.json"
    code = main(["bench", str(tiny_model_path), "--device", "cuda", "-p", "32", "-n", "16", "-r", "2",
                 "--json", str(out_json), "--quiet"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "| pp32 |" in out and "| tg16 |" in out
    data = json.loads(out_json.read_text())
    assert data["kind"] == "bench" and data["device"] != "cpu" and data["copy_gbps"] > 100
    tg = next(r for r in data["results"] if r["test"] == "tg16")
    assert tg["tokens_per_s"]["mean"] > 0 and 0 < tg["roofline_fraction"] < 1.5 and tg["batch"] == 1


def test_bench_kernels_shows_the_decode_step_kernel_by_kernel(capsys, tiny_model_path, tmp_path):
    out_json = tmp_path / "bench.json"
    code = main(["bench", str(tiny_model_path), "--device", "cuda", "-p", "0", "-n", "8", "-r", "1", "--kernels",
                 "--json", str(out_json), "--quiet"])
    out, _ = capsys.readouterr()
    assert code == 0 and "decode step kernels" in out and "_rmsnorm_kernel" in out
    steps = json.loads(out_json.read_text())["step_kernels"]
    assert steps and all(s["launches_per_step"] > 10 and s["busy_us_per_step"] > 0 for s in steps)
    assert any(k["kernel"].startswith("_paged_decode_attention") for k in steps[0]["by_name"])


def test_profile_prints_every_mode_and_draws_the_chart(capsys, tiny_model_path, tmp_path):
    out_json, out_png = tmp_path / "profile.json", tmp_path / "profile.png"
    code = main(["profile", str(tiny_model_path), "--modes", "eager,graph", "-n", "16", "--json", str(out_json),
                 "--png", str(out_png), "--quiet"])
    out, _ = capsys.readouterr()
    assert code == 0 and "| eager |" in out and "| graph |" in out
    rows = json.loads(out_json.read_text())["profiles"]
    assert [r["mode"] for r in rows] == ["eager", "graph"]
    for r in rows:
        assert abs(sum(r["parts_ms"].values()) - r["token_ms"]) < 1e-6 * max(r["token_ms"], 1.0)
        assert 0.0 <= r["host_critical_fraction"] <= 1.0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
