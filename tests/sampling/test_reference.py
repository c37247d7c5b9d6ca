"""The numpy reference on small cases worked out by hand (expected values written from the definitions)."""

from __future__ import annotations

import numpy as np
import pytest

from replayllm.sampling import SamplingParams, reference_probs, reference_uniform
from replayllm.sampling.reference import penalised_logits

# At temperature 1 these logits give probabilities 0.5, 0.25, 0.15, 0.1.
P = np.array([0.5, 0.25, 0.15, 0.1])
LOGITS = np.log(P) + 3.0
PLAIN = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)


def probs(history=(), **overrides):
    return reference_probs(LOGITS, SamplingParams(**{**PLAIN, **overrides}), list(history))


def test_temperature_one_is_the_softmax():
    np.testing.assert_allclose(probs(), P, rtol=1e-12)


def test_temperature_half_squares_the_probabilities():
    expected = P**2 / (P**2).sum()
    np.testing.assert_allclose(probs(temperature=0.5), expected, rtol=1e-12)


def test_top_k_keeps_the_k_largest():
    np.testing.assert_allclose(probs(top_k=2), [2 / 3, 1 / 3, 0, 0], rtol=1e-12)
    np.testing.assert_allclose(probs(top_k=1), [1, 0, 0, 0])
    np.testing.assert_allclose(probs(top_k=10), P, rtol=1e-12)


def test_top_p_keeps_the_shortest_prefix_reaching_p():
    np.testing.assert_allclose(probs(top_p=0.7), [2 / 3, 1 / 3, 0, 0], rtol=1e-12)  # 0.5 < 0.7 <= 0.75
    np.testing.assert_allclose(probs(top_p=0.45), [1, 0, 0, 0])  # 0.5 alone reaches 0.45
    np.testing.assert_allclose(probs(top_p=0.8), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0], rtol=1e-12)


def test_top_p_is_computed_on_the_top_k_survivors():
    # After top-k=3 the probabilities are 0.5/0.9, 0.25/0.9, 0.15/0.9; 0.5/0.9 = 0.556 already reaches 0.55.
    np.testing.assert_allclose(probs(top_k=3, top_p=0.55), [1, 0, 0, 0])
    # Without top-k, 0.5 < 0.55 so the second token stays.
    np.testing.assert_allclose(probs(top_p=0.55), [2 / 3, 1 / 3, 0, 0], rtol=1e-12)


def test_min_p_keeps_tokens_above_a_fraction_of_the_largest():
    np.testing.assert_allclose(probs(min_p=0.25), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0], rtol=1e-12)
    np.testing.assert_allclose(probs(min_p=0.6), [1, 0, 0, 0])


def test_filters_act_before_temperature():
    # top-k=2 then temperature 0.5: (0.5^2, 0.25^2) normalised = (0.8, 0.2).
    np.testing.assert_allclose(probs(top_k=2, temperature=0.5), [0.8, 0.2, 0, 0], rtol=1e-12)


def test_top_k_ties_keep_the_lowest_id():
    logits = np.array([1.0, 2.0, 2.0, 2.0])
    params = SamplingParams(**{**PLAIN, "top_k": 2})
    np.testing.assert_allclose(reference_probs(logits, params, []), [0, 0.5, 0.5, 0])


def test_greedy_is_one_hot_at_the_first_maximum():
    logits = np.array([0.0, 3.0, 1.0, 3.0])
    np.testing.assert_array_equal(reference_probs(logits, SamplingParams(temperature=0.0), []), [0, 1, 0, 0])


def test_penalties_follow_llama_cpp():
    logits = np.array([2.0, -1.0, 0.5, 4.0, 0.0])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
                            penalty_last_n=-1)
    # id 0 seen twice (positive: /2 then -2*0.5-0.25), id 1 once (negative: *2 then -0.75), id 4 once (0: *2).
    expected = [1.0 - 1.25, -2.0 - 0.75, 0.5, 4.0, 0.0 - 0.75]
    np.testing.assert_allclose(penalised_logits(logits, params, [0, 1, 0, 4]), expected, rtol=1e-12)


@pytest.mark.parametrize("last_n,penalised", [(0, []), (2, [0, 4]), (3, [0, 1, 4]), (-1, [0, 1, 4])])
def test_penalty_window_is_the_last_n_tokens(last_n, penalised):
    logits = np.array([2.0, -1.0, 0.5, 4.0, 1.0])
    params = SamplingParams(presence_penalty=1.0, penalty_last_n=last_n)
    expected = logits - np.isin(np.arange(5), penalised)
    np.testing.assert_array_equal(penalised_logits(logits, params, [1, 1, 0, 4]), expected)


def test_reference_uniform_is_in_range_and_spread():
    values = np.array([reference_uniform(7, step) for step in range(4000)])
    assert values.min() >= 0.0 and values.max() < 1.0
    # 4000 uniforms: the mean's standard error is 0.0046, so 0.03 is > 6 sigma.
    assert abs(values.mean() - 0.5) < 0.03
    assert len(np.unique(values)) > 3990
