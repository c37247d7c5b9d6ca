"""The GPU decode modes, by name (parsed without importing any GPU code, so the CLI can check them first)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidParameterError

MAX_STEPS_PER_GRAPH = 16


@dataclass(frozen=True)
class DecodeMode:
    name: str
    use_graph: bool
    sample_on_device: bool
    steps_per_graph: int = 1

    @classmethod
    def parse(cls, name: str) -> DecodeMode:
        if name == "eager":
            return cls(name, use_graph=False, sample_on_device=False)
        if name == "graph":
            return cls(name, use_graph=True, sample_on_device=True)
        if name == "graph-host-sampling":
            return cls(name, use_graph=True, sample_on_device=False)
        match = re.fullmatch(r"graph-(\d+)step", name)
        if match and 1 <= int(match.group(1)) <= MAX_STEPS_PER_GRAPH:
            return cls(name, use_graph=True, sample_on_device=True, steps_per_graph=int(match.group(1)))
        raise InvalidParameterError(f"unknown decode mode {name!r}; modes: eager, graph, graph-host-sampling, "
                                    f"graph-Nstep (N in 1..{MAX_STEPS_PER_GRAPH})")
