"""The architecture registry keyed by general.architecture."""

from __future__ import annotations

import pytest

from replayllm.errors import UnsupportedError
from replayllm.models import get_architecture, supported_architectures


def test_supported_architectures_and_their_traits():
    assert supported_architectures() == ["llama", "qwen2", "qwen3"]
    traits = {name: (a.rope_neox, a.has_qkv_bias, a.has_qk_norm)
              for name in supported_architectures() for a in [get_architecture(name)]}
    assert traits == {"llama": (False, False, False), "qwen2": (True, True, False), "qwen3": (True, False, True)}
    assert all(get_architecture(name).name == name for name in supported_architectures())


@pytest.mark.parametrize("name", ["gpt2", "Llama", "", None, "mistral"])
def test_unknown_architecture_lists_the_supported_ones(name):
    with pytest.raises(UnsupportedError, match=r"is not supported; supported: llama, qwen2, qwen3"):
        get_architecture(name)


def test_build_reference_refuses_a_config_of_another_architecture(tiny_model, tiny_spec):
    config = tiny_model(tiny_spec(arch="qwen2")).config
    with pytest.raises(ValueError, match="config is for 'qwen2', not 'llama'"):
        get_architecture("llama").build_reference(config, lambda name: None)


def test_load_weight_returning_a_wrong_shape_is_named(tiny_model, tiny_spec):
    tiny = tiny_model(tiny_spec(arch="llama"))

    def load_weight(name):
        weight = tiny.contents.load_weight(name)
        return weight.t() if name == "blk.0.attn_k.weight" else weight  # a caller that forgot the reversal

    expected = r"load_weight\('blk.0.attn_k.weight'\) returned \(64, 32\); expected a tensor of shape \(32, 64\)"
    with pytest.raises(ValueError, match=expected):
        get_architecture("llama").build_reference(tiny.config, load_weight)
