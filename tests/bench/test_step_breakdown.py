"""bench/step_breakdown's arithmetic on made-up kernel intervals (recording needs a GPU)."""

from __future__ import annotations

import pytest

from replayllm.bench.step_breakdown import KernelInterval, breakdown_table, summarize


def _steps(n: int, overlap: float = 0.0) -> list[KernelInterval]:
    """n steps of 3 kernels: norm 2 us, gemv 10 us, norm 2 us; 1 us gaps, or `overlap` us of overlap instead."""
    out, t = [], 0.0
    for _ in range(n):
        for name, us in (("_rmsnorm_kernel", 2.0), ("_gemv_kernel", 10.0), ("_rmsnorm_kernel", 2.0)):
            out.append(KernelInterval(name, t, t + us))
            t += us + (1.0 if not overlap else -overlap)
    return out


def test_per_name_times_launches_and_idle_gaps():
    b = summarize(list(reversed(_steps(4))), 4)  # any order in
    assert b.launches_per_step == 3
    assert [t.kernel for t in b.by_name] == ["_gemv_kernel", "_rmsnorm_kernel"]
    assert b.by_name[0].us_per_step == pytest.approx(10.0) and b.by_name[0].launches_per_step == 1
    assert b.by_name[1].us_per_step == pytest.approx(4.0) and b.by_name[1].us_per_launch == pytest.approx(2.0)
    assert b.busy_us_per_step == pytest.approx(14.0)
    # 12 kernels, 11 gaps of 1 us over 4 steps
    assert b.idle_us_per_step == pytest.approx(11.0 / 4)
    assert [k.name for k in b.last_step] == ["_rmsnorm_kernel", "_gemv_kernel", "_rmsnorm_kernel"]
    assert b.last_step[0].start_us == pytest.approx(3 * 17.0)


def test_overlapping_kernels_count_once_in_the_busy_time():
    # PDL: each kernel starts 0.5 us before the one before ends; per name the durations still add up in full.
    b = summarize(_steps(2, overlap=0.5), 2)
    assert b.idle_us_per_step == 0.0
    assert b.busy_us_per_step == pytest.approx((2 * 14.0 - 5 * 0.5) / 2)
    assert sum(t.us_per_step for t in b.by_name) == pytest.approx(14.0)


def test_a_record_without_graph_kernels_is_an_error():
    with pytest.raises(ValueError, match="no graph kernels"):
        summarize(_steps(1)[:2], 3)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        summarize(_steps(1), 0)


def test_table_names_the_kernels_and_the_idle_time():
    b = summarize(_steps(2), 2)
    b.step_us, b.settings = 15.5, {"positions": 64, "pdl": False}
    text = breakdown_table(b)
    assert "| _gemv_kernel | 1 | 10.0 | 10.00 |" in text
    assert "16 us a step, 3 launches, GPU busy 14 us and idle 2 us" in text  # 5 gaps of 1 us over 2 steps
    assert "pdl False" in text
    assert b.to_json()["by_name"][0]["kernel"] == "_gemv_kernel" and b.to_json()["positions"] == 64


def test_the_record_fits_the_context_it_is_given():
    from replayllm.bench.step_breakdown import POSITIONS, REPLAYS, context_needed, positions_within

    assert positions_within(context_needed()) == POSITIONS  # the CLI's context for --kernels
    assert positions_within(40) == 40 - REPLAYS - 2 and context_needed(positions_within(40)) == 40
    assert positions_within(5) == 1  # never below one token of context
