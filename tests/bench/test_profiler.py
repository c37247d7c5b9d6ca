"""`replayllm profile`'s arithmetic on the CPU: summarize() over a hand-built TokenTracer, the table, the CLI."""

from __future__ import annotations

import types

import pytest
import torch

from replayllm.bench.profiler import HOST_PARTS, ProfileRow, summarize, table
from replayllm.cli.main import main
from replayllm.engine import tracer as tracer_module
from replayllm.engine.tracer import ACTIVITIES, TokenTracer

WARMUP = 2
WARMUP_RECORD = dict.fromkeys(ACTIVITIES, 9.0)  # seconds: would dominate every mean if not dropped


def record(**ms) -> dict[str, float]:
    return {a: ms.get(a, 0.0) / 1e3 for a in ACTIVITIES}


def steady_tracer() -> TokenTracer:
    """Periods after warm-up: 10, 12, 14 ms (mean 12). Mean activities (ms): launch 1, sampling 2, copy 0.5,
    wait 4, detokenize 0.5, so other = 12 - 8 = 4."""
    tracer = TokenTracer(gpu=False)
    tracer.token_stamps = [0.0, 0.5, 1.0, 1.010, 1.022, 1.036]
    tracer.per_token = [WARMUP_RECORD] * 3 + [
        record(launch=0.5, sampling=1.0, copy=0.5, wait=5.0, detokenize=0.5),
        record(launch=1.0, sampling=3.0, copy=0.0, wait=4.0, detokenize=1.0),
        record(launch=1.5, sampling=2.0, copy=1.0, wait=3.0, detokenize=0.0),
    ]
    return tracer


def test_token_ms_is_the_mean_period_after_warm_up():
    row = summarize(steady_tracer(), gpu_ms=6.0, warmup=WARMUP, model="m", quant="Q8_0", mode="graph")
    assert row.token_ms == pytest.approx(12.0)
    assert row.n_tokens == 3
    assert (row.model, row.quant, row.mode, row.gpu_ms) == ("m", "Q8_0", "graph", 6.0)


def test_own_times_are_per_token_means_and_other_is_the_rest():
    row = summarize(steady_tracer(), gpu_ms=6.0, warmup=WARMUP, model="m", quant="q", mode="graph")
    expected = {"launch": 1.0, "sampling": 2.0, "copy": 0.5, "wait": 4.0, "detokenize": 0.5, "other": 4.0}
    assert row.own_ms == pytest.approx(expected)


def test_critical_host_time_is_split_over_host_parts_in_proportion_to_their_own_times():
    row = summarize(steady_tracer(), gpu_ms=6.0, warmup=WARMUP, model="m", quant="q", mode="graph")
    # 6 ms of critical host time over host own times 1 : 2 : 0.5 : 0.5 : 4 (wait excluded)
    assert row.parts_ms == pytest.approx({"gpu": 6.0, "launch": 0.75, "sampling": 1.5, "copy": 0.375,
                                          "detokenize": 0.375, "other": 3.0})
    assert set(row.parts_ms) == {"gpu", *HOST_PARTS} and "wait" not in row.parts_ms
    assert row.parts_ms["gpu"] + sum(row.parts_ms[p] for p in HOST_PARTS) == pytest.approx(row.token_ms)
    assert row.host_critical_fraction == pytest.approx((12.0 - 6.0) / 12.0)
    assert row.gpu_idle_fraction == pytest.approx(0.5)
    assert row.gpu_gap_fraction is None


@pytest.mark.parametrize("gpu_ms", [0.0, 1.0, 11.9])
def test_parts_always_sum_to_the_token_time(gpu_ms):
    row = summarize(steady_tracer(), gpu_ms=gpu_ms, warmup=WARMUP, model="m", quant="q", mode="eager")
    assert sum(row.parts_ms.values()) == pytest.approx(row.token_ms)
    assert row.host_critical_fraction == pytest.approx((row.token_ms - gpu_ms) / row.token_ms)


def test_gpu_time_above_the_token_time_is_clamped():
    row = summarize(steady_tracer(), gpu_ms=20.0, warmup=WARMUP, model="m", quant="q", mode="graph")
    assert row.gpu_ms == 20.0
    assert row.parts_ms["gpu"] == pytest.approx(row.token_ms)
    assert all(row.parts_ms[p] == 0.0 for p in HOST_PARTS)
    assert row.host_critical_fraction == 0.0 and row.gpu_idle_fraction == pytest.approx(0.0)


def test_parts_sum_to_the_token_time_when_the_host_only_waits():
    tracer = TokenTracer(gpu=False)
    tracer.token_stamps = [0.0, 0.010, 0.020, 0.030]
    tracer.per_token = [record(wait=10.0)] * 4
    row = summarize(tracer, gpu_ms=4.0, warmup=0, model="m", quant="q", mode="graph")
    assert sum(row.parts_ms.values()) == pytest.approx(row.token_ms)


def test_warm_up_is_dropped_from_both_stamps_and_records():
    tracer = steady_tracer()
    tracer.token_stamps = [0.0, 0.010, 0.020] + [1.0 + s for s in (0.010, 0.022, 0.036)]
    row = summarize(tracer, gpu_ms=6.0, warmup=3, model="m", quant="q", mode="graph")
    assert row.n_tokens == 2 and row.token_ms == pytest.approx(13.0)
    assert row.own_ms["launch"] == pytest.approx(1.25) and row.own_ms["wait"] == pytest.approx(3.5)


@pytest.mark.parametrize("n_stamps", [0, 1, WARMUP + 1])
def test_too_few_tokens_is_a_value_error(n_stamps):
    tracer = steady_tracer()
    tracer.token_stamps = tracer.token_stamps[:n_stamps]
    tracer.per_token = tracer.per_token[:n_stamps]
    with pytest.raises(ValueError, match=f"at least {WARMUP + 2}"):
        summarize(tracer, gpu_ms=1.0, warmup=WARMUP, model="m", quant="q", mode="graph")


def test_the_fewest_tokens_summarize():
    tracer = steady_tracer()
    tracer.token_stamps = tracer.token_stamps[:WARMUP + 2]
    tracer.per_token = tracer.per_token[:WARMUP + 2]
    row = summarize(tracer, gpu_ms=1.0, warmup=WARMUP, model="m", quant="q", mode="graph")
    assert row.n_tokens == 1 and row.token_ms == pytest.approx(10.0)


def test_summarize_reads_a_tracer_filled_through_add_and_end_token(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(tracer_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    tracer = TokenTracer(gpu=False)
    for i in range(6):
        tracer.add("launch", 0.002)
        tracer.add("wait", 0.001)
        tracer.add("wait", 0.001)
        tracer.add("sampling", 0.003)
        now[0] += 0.010
        tracer.step_begin()
        tracer.step_end()
        tracer.end_token()
    assert tracer.step_events == []
    row = summarize(tracer, gpu_ms=5.0, warmup=1, model="m", quant="q", mode="eager")
    assert row.n_tokens == 4 and row.token_ms == pytest.approx(10.0)
    assert row.own_ms == pytest.approx({"launch": 2.0, "sampling": 3.0, "copy": 0.0, "wait": 2.0,
                                        "detokenize": 0.0, "other": 3.0})
    assert row.parts_ms == pytest.approx({"gpu": 5.0, "launch": 1.25, "sampling": 1.875, "copy": 0.0,
                                          "detokenize": 0.0, "other": 1.875})


def test_to_json_round_trips_the_row():
    row = summarize(steady_tracer(), gpu_ms=6.0, warmup=WARMUP, model="m", quant="q", mode="graph")
    data = row.to_json()
    assert ProfileRow(**data) == row
    assert data["parts_ms"]["gpu"] == pytest.approx(6.0)


def test_table_has_a_header_and_one_line_per_row_with_percentages():
    rows = [summarize(steady_tracer(), gpu_ms=g, warmup=WARMUP, model="tiny", quant="Q8_0", mode=mode)
            for g, mode in ((6.0, "graph"), (3.0, "eager"))]
    lines = table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["model", "mode", "token ms", "GPU ms", *(f"{p} ms" for p in HOST_PARTS),
                      "host critical", "GPU idle"]
    assert all(len(line.strip("|").split("|")) == len(header) for line in lines)
    graph = [c.strip() for c in lines[2].strip("|").split("|")]
    assert graph[:4] == ["tiny Q8_0", "graph", "12.000", "6.000"]
    assert graph[4:9] == ["0.750", "1.500", "0.375", "0.375", "3.000"]
    assert graph[9:] == ["50.0%", "50.0%"]
    eager = [c.strip() for c in lines[3].strip("|").split("|")]
    assert eager[1] == "eager" and eager[9:] == ["75.0%", "75.0%"]


def test_profile_cli_without_cuda_is_a_one_line_error(capsys, monkeypatch, tiny_model_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["profile", str(tiny_model_path), "-n", "8", "--quiet"])
    _, err = capsys.readouterr()
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "CUDA" in lines[0]


@pytest.mark.parametrize("argv, fragment", [
    (["-n", "3"], "-n"),
    (["--modes", "graph,warp"], "warp"),
])
def test_profile_cli_argument_errors_are_one_line(capsys, tiny_model_path, argv, fragment):
    code = main(["profile", str(tiny_model_path), "--quiet", *argv])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
