"""Sampling: `SamplingParams` (validated, frozen) and the batched torch sampler that never syncs with the host."""

from .params import MAX_PENALTY_WINDOW, SamplingParams
from .reference import reference_probs, reference_uniform
from .sampler import SamplerState, sample, sample_greedy, sampler_for

__all__ = ["MAX_PENALTY_WINDOW", "SamplingParams", "SamplerState", "sample", "sample_greedy", "sampler_for", "reference_probs",
           "reference_uniform"]
