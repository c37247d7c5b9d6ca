"""The profile chart: stacked-bar values (ms and percent per segment) and the PNG it draws."""

from __future__ import annotations

import pytest

from replayllm.bench.chart import SEGMENTS, bar_values, draw
from replayllm.bench.profiler import HOST_PARTS, ProfileRow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def row(mode: str, parts: dict[str, float], model: str = "tiny") -> ProfileRow:
    token_ms = sum(parts.values())
    critical = token_ms - parts["gpu"]
    return ProfileRow(model, "Q8_0", mode, 32, token_ms, parts["gpu"], dict(parts), dict(parts),
                      critical / token_ms, critical / token_ms, None)


ROWS = [
    row("eager", {"gpu": 3.0, "launch": 4.0, "sampling": 1.0, "copy": 0.5, "detokenize": 0.25, "other": 0.25}),
    row("graph", {"gpu": 2.7, "launch": 0.1, "sampling": 0.0, "copy": 0.03, "detokenize": 0.1, "other": 0.07}),
    row("graph-4step", {"gpu": 2.9, "launch": 0.0, "sampling": 0.0, "copy": 0.0, "detokenize": 0.0,
                        "other": 0.0}, model="other"),
]


def test_segments_are_the_gpu_then_every_host_part():
    assert SEGMENTS == ("gpu", *HOST_PARTS)


def test_bar_values_ms_segments_are_the_rows_parts():
    _, ms, _ = bar_values(ROWS)
    assert set(ms) == set(SEGMENTS)
    for s in SEGMENTS:
        assert ms[s] == [r.parts_ms[s] for r in ROWS]


def test_bar_values_percentages_of_each_bar_sum_to_100():
    _, _, pct = bar_values(ROWS)
    for i in range(len(ROWS)):
        assert abs(sum(pct[s][i] for s in SEGMENTS) - 100.0) < 1e-9
    assert pct["gpu"][0] == pytest.approx(100 * 3.0 / 9.0)
    assert pct["launch"][0] == pytest.approx(100 * 4.0 / 9.0)
    assert pct["gpu"][2] == pytest.approx(100.0)


def test_bar_labels_name_the_model_and_the_mode():
    labels, _, _ = bar_values(ROWS)
    assert labels == ["tiny Q8_0\neager", "tiny Q8_0\ngraph", "other Q8_0\ngraph-4step"]


def test_draw_writes_a_png(tmp_path):
    path = tmp_path / "profile.png"
    draw(ROWS, str(path), "replayllm per-token critical path, test")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
