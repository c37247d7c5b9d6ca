"""Greedy agreement between a fast path and the reference, with ties told apart from errors.

Exact token equality over a long greedy run is the right check on a real model. On a random-weight model the
top two logits are often closer than the f16 KV cache's rounding, so an exact check would fail on ties, not
bugs. `greedy_agreement` therefore scores the fast path's tokens under the reference (teacher forcing: one
reference pass over prompt + generated tokens) and reports, besides exact equality, the largest amount by which
a chosen token's reference logit falls short of the reference maximum. A wrong kernel gives shortfalls of the
order of the logits themselves; a tie gives shortfalls below the logit error tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GreedyAgreement:
    n_tokens: int
    n_equal_to_reference_argmax: int  # positions where the chosen token is the reference's argmax
    first_divergence: int | None  # first position where it is not (None: none)
    max_shortfall: float  # max over positions of ref_logit[argmax] - ref_logit[chosen], >= 0
    logit_scale: float  # max |reference logit| over the scored rows, for a relative reading

    @property
    def max_relative_shortfall(self) -> float:
        return self.max_shortfall / self.logit_scale if self.logit_scale > 0 else 0.0

    def is_within(self, relative_tolerance: float) -> bool:
        """Every token is the reference's argmax, or a near-tie with it within the tolerance."""
        return self.max_relative_shortfall <= relative_tolerance


def greedy_agreement(reference_logits: torch.Tensor, prompt_len: int, tokens: list[int]) -> GreedyAgreement:
    """reference_logits [prompt_len + len(tokens), V]: the reference's logits over prompt + tokens (the last
    row unused); tokens: the fast path's greedy continuation."""
    if prompt_len < 1 or reference_logits.shape[0] < prompt_len + len(tokens) - 1 or not tokens:
        raise ValueError(f"need logits for prompt ({prompt_len}) + tokens ({len(tokens)}) - 1 rows, got "
                         f"{reference_logits.shape[0]}")
    rows = reference_logits[prompt_len - 1: prompt_len - 1 + len(tokens)].double()  # row i predicts tokens[i]
    chosen = torch.tensor(tokens, dtype=torch.int64).unsqueeze(1)
    best = rows.max(dim=1).values
    shortfall = best - rows.gather(1, chosen).squeeze(1)  # [n] >= 0
    is_argmax = shortfall == 0
    diverged = (~is_argmax).nonzero()
    return GreedyAgreement(len(tokens), int(is_argmax.sum()), int(diverged[0]) if len(diverged) else None,
                           float(shortfall.max()), float(rows.abs().max()))
