from __future__ import annotations

import pytest

from replayllm.engine.decode_mode import MAX_STEPS_PER_GRAPH, DecodeMode
from replayllm.errors import InvalidParameterError


@pytest.mark.parametrize("name, graph, on_device, steps", [
    ("eager", False, False, 1), ("graph", True, True, 1), ("graph-host-sampling", True, False, 1),
    ("graph-4step", True, True, 4), (f"graph-{MAX_STEPS_PER_GRAPH}step", True, True, MAX_STEPS_PER_GRAPH)])
def test_known_modes(name, graph, on_device, steps):
    mode = DecodeMode.parse(name)
    assert (mode.use_graph, mode.sample_on_device, mode.steps_per_graph) == (graph, on_device, steps)


@pytest.mark.parametrize("name", ["warp", "graph-0step", f"graph-{MAX_STEPS_PER_GRAPH + 1}step", "Graph", ""])
def test_unknown_modes_are_user_errors(name):
    with pytest.raises(InvalidParameterError, match="unknown decode mode"):
        DecodeMode.parse(name)
