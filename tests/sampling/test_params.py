"""SamplingParams validation: every bad field raises InvalidParameterError naming the field."""

from __future__ import annotations

import dataclasses

import pytest

from replayllm.errors import InvalidParameterError
from replayllm.sampling import MAX_PENALTY_WINDOW, SamplingParams

BAD_VALUES = [
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.0), ("max_tokens", True), ("max_tokens", "8"),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "hot"),
    ("temperature", None),
    ("top_k", 1.5), ("top_k", None),
    ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.01), ("top_p", float("nan")),
    ("min_p", -0.01), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", float("inf")),
    ("presence_penalty", float("nan")), ("presence_penalty", "0"),
    ("frequency_penalty", float("-inf")),
    ("penalty_last_n", -2), ("penalty_last_n", MAX_PENALTY_WINDOW + 1), ("penalty_last_n", 1.0),
    ("seed", -1), ("seed", 2**63), ("seed", 1.0), ("seed", "42"), ("seed", False),
    ("stop", "###"), ("stop", ("ok", "")), ("stop", ("ok", 3)), ("stop", 5),
    ("ignore_eos", 1), ("ignore_eos", "yes"),
]


@pytest.mark.parametrize("field,value", BAD_VALUES)
def test_bad_field_raises_naming_it(field, value):
    with pytest.raises(InvalidParameterError, match=field):
        SamplingParams(**{field: value})


def test_invalid_parameter_error_is_a_value_error():
    with pytest.raises(ValueError):
        SamplingParams(top_p=2.0)


def test_defaults_and_edges_are_valid():
    SamplingParams()
    SamplingParams(temperature=0.0, top_k=-1, top_p=1.0, min_p=0.0, penalty_last_n=-1, seed=0)
    SamplingParams(min_p=1.0, penalty_last_n=MAX_PENALTY_WINDOW, seed=2**63 - 1, presence_penalty=-2.0,
                   frequency_penalty=-0.5, repetition_penalty=0.5)


def test_stop_list_becomes_a_tuple_and_numbers_become_floats():
    params = SamplingParams(stop=["a", "bc"], temperature=1, top_p=1, repetition_penalty=2)
    assert params.stop == ("a", "bc")
    assert type(params.temperature) is float and params.temperature == 1.0
    assert type(params.top_p) is float and type(params.repetition_penalty) is float


def test_is_greedy_exactly_when_temperature_is_zero():
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=0).is_greedy
    assert not SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=0.8, top_k=1).is_greedy


def test_params_are_frozen():
    params = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 1.0
