from __future__ import annotations

import pytest
import torch

from replayllm.bench.agreement import greedy_agreement


def _logits(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_exact_continuation_has_no_shortfall():
    logits = _logits([[0, 5, 1], [4, 0, 1], [0, 0, 9], [1, 1, 1]])  # prompt of 2: rows 1, 2 predict the tokens
    result = greedy_agreement(logits, 2, [0, 2])
    assert result.n_equal_to_reference_argmax == 2 and result.first_divergence is None
    assert result.max_shortfall == 0.0 and result.is_within(0.0)


def test_near_tie_is_within_tolerance_and_a_wrong_token_is_not():
    logits = _logits([[10.0, 9.99, 0.0], [10.0, 0.0, 1.0], [0, 0, 0]])  # rows 0, 1 predict the tokens
    tie = greedy_agreement(logits, 1, [1, 0])
    assert tie.first_divergence == 0 and tie.n_equal_to_reference_argmax == 1
    assert tie.max_shortfall == pytest.approx(0.01, abs=1e-5)
    assert tie.is_within(1e-2) and not tie.is_within(1e-4)
    wrong = greedy_agreement(logits, 1, [0, 2])
    assert wrong.first_divergence == 1 and not wrong.is_within(1e-2)


def test_too_few_rows_is_an_error():
    with pytest.raises(ValueError):
        greedy_agreement(_logits([[0, 1]]), 1, [1, 1, 1])
