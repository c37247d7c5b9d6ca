"""The counter-based uniform: torch int64 ops against Python's unbounded integers, and its spread."""

from __future__ import annotations

import math

import pytest
import torch

from replayllm.sampling import reference_uniform
from replayllm.sampling.rng import counter_uniform, signed32

EDGE_SEEDS = [0, 1, 2, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40 + 12345, 2**62, 2**63 - 1]
EDGE_STEPS = [0, 1, 2, 1000, 2**31, 2**32 - 1, 2**32, 2**40 + 7, 2**62, 2**63 - 1]


def _uniform(seeds: list[int], steps: list[int]) -> torch.Tensor:
    seed = torch.tensor(seeds, dtype=torch.int64)
    return counter_uniform(seed & 0xFFFFFFFF, seed >> 32, torch.tensor(steps, dtype=torch.int64))


def test_signed32_is_congruent_and_small():
    for c in [0, 1, 2**31 - 1, 2**31, 0x85EBCA6B, 2**32 - 1]:
        s = signed32(c)
        assert (s - c) % 2**32 == 0 and -(2**31) <= s < 2**31


def test_torch_hash_equals_python_integers_at_the_extremes():
    seeds = [s for s in EDGE_SEEDS for _ in EDGE_STEPS]
    steps = EDGE_STEPS * len(EDGE_SEEDS)
    expected = [reference_uniform(s, t) for s, t in zip(seeds, steps)]
    assert _uniform(seeds, steps).tolist() == expected


def test_torch_hash_equals_python_integers_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    seeds = torch.randint(0, 2**63 - 1, (500,), generator=g).tolist()
    steps = torch.randint(0, 2**20, (500,), generator=g).tolist()
    assert _uniform(seeds, steps).tolist() == [reference_uniform(s, t) for s, t in zip(seeds, steps)]


def _chi_square_uniform_p_value(u: torch.Tensor, bins: int) -> float:
    counts = torch.bincount((u * bins).long(), minlength=bins).double()
    expected = len(u) / bins
    stat = ((counts - expected) ** 2 / expected).sum()
    return torch.special.gammaincc(torch.tensor((bins - 1) / 2, dtype=torch.float64), stat / 2).item()


@pytest.mark.parametrize("vary", ["step", "seed"])
def test_uniform_is_uniform_over_steps_and_over_seeds(vary):
    """Chi-square over 64 equal bins, 20000 draws; false-failure rate 1e-6."""
    n = 20000
    seeds = list(range(n)) if vary == "seed" else [987654321] * n
    steps = list(range(n)) if vary == "step" else [5] * n
    u = _uniform(seeds, steps)
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    assert _chi_square_uniform_p_value(u, 64) > 1e-6


def test_consecutive_steps_are_uncorrelated():
    """Lag-1 correlation of 20000 uniforms has standard deviation 1/sqrt(20000) = 0.007; 0.04 is > 5 sigma."""
    u = _uniform([42] * 20000, list(range(20000))).double()
    corr = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()
    assert abs(corr) < 0.04 and not math.isnan(corr)
