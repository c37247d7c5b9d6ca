"""Plain, independent implementations of what the sampler computes, written for reading, not speed.

`reference_probs` gives the exact distribution (float64) that `sample` draws one row's token from, and
`reference_uniform` the random number it draws with, in Python integers. Tests compare the batched torch
sampler against both, here on the CPU and on the GPU.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from .params import SamplingParams
from .rng import FMIX_MUL_1, FMIX_MUL_2, STEP_SALT, UNIFORM_BITS


def reference_probs(logits: np.ndarray, params: SamplingParams, history: list[int]) -> np.ndarray:
    """logits [V] -> probabilities [V] float64 of the next token, given the tokens so far (prompt included).

    Steps (llama.cpp's default chain): penalties over the last `penalty_last_n` tokens of `history`; rank by
    logit descending, then id ascending; top-k; top-p (softmax at temperature 1, the shortest prefix reaching
    top_p); min-p (probability >= min_p times the largest); softmax at `temperature` over the survivors.
    A greedy request gets a one-hot at the argmax of the penalised logits (lowest id on ties).
    """
    logits = penalised_logits(logits, params, history)
    if params.is_greedy:
        probs = np.zeros(len(logits))
        probs[int(np.argmax(logits))] = 1.0  # np.argmax returns the first maximum
        return probs

    ranked = sorted(range(len(logits)), key=lambda t: (-logits[t], t))
    candidates = ranked[: params.top_k] if params.top_k > 0 else ranked
    if params.top_p < 1.0:
        p = _softmax(logits[candidates])
        total, cut = 0.0, len(candidates)
        for i, p_i in enumerate(p):
            total += p_i
            if total >= params.top_p:
                cut = i + 1
                break
        candidates = candidates[:cut]
    if params.min_p > 0.0:
        p = _softmax(logits[candidates])
        candidates = [t for t, p_t in zip(candidates, p) if p_t >= params.min_p * p.max()]

    probs = np.zeros(len(logits))
    probs[candidates] = _softmax(logits[candidates] / params.temperature)
    return probs


def penalised_logits(logits: np.ndarray, params: SamplingParams, history: list[int]) -> np.ndarray:
    """Repetition / frequency / presence penalties, llama.cpp semantics: for each id seen c > 0 times in the
    window, logit /= rep if logit > 0 else logit *= rep; then logit -= c * frequency + presence."""
    logits = np.array(logits, dtype=np.float64)
    n = params.penalty_last_n
    window = list(history) if n == -1 else list(history)[-n:] if n > 0 else []
    for token, count in Counter(window).items():
        if logits[token] > 0:
            logits[token] /= params.repetition_penalty
        else:
            logits[token] *= params.repetition_penalty
        logits[token] -= count * params.frequency_penalty + params.presence_penalty
    return logits


def reference_uniform(seed: int, step: int) -> float:
    """The sampler's uniform in [0, 1) for (seed, step), in Python's unbounded integers (see rng.py)."""

    def fmix32(h: int) -> int:
        h ^= h >> 16
        h = (h * FMIX_MUL_1) % 2**32
        h ^= h >> 13
        h = (h * FMIX_MUL_2) % 2**32
        return h ^ (h >> 16)

    h = fmix32((step % 2**32) ^ STEP_SALT)
    h = fmix32(h ^ (seed % 2**32))
    h = fmix32(h ^ (seed >> 32) ^ (step >> 32))
    return (h >> (32 - UNIFORM_BITS)) / 2**UNIFORM_BITS


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()
