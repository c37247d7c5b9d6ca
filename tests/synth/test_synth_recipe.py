"""The per-tensor quantization mix, checked without writing any large file."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from replayllm.errors import InvalidParameterError
from replayllm.synth import MIXES, QUANTS, SHAPES, plan_tensors, use_more_bits
from replayllm.synth.recipe import get_mix, tensor_type
from replayllm.synth.shapes import TensorSpec

# use_more_bits(i, 32): i < 4, i >= 28, or (i - 4) % 3 == 2, worked out by hand.
MORE_BITS_32 = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
# use_more_bits(i, 28): i < 3, i >= 24, or (i - 3) % 3 == 2.
MORE_BITS_28 = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27}


def test_use_more_bits_picks_the_reference_layers():
    assert {i for i in range(32) if use_more_bits(i, 32)} == MORE_BITS_32
    assert {i for i in range(28) if use_more_bits(i, 28)} == MORE_BITS_28
    assert {i for i in range(2) if use_more_bits(i, 2)} == {1}  # 2 // 8 == 0, 7 * 2 // 8 == 1


def _types(shape, quant):
    return {p.spec.name: p.qtype for p in plan_tensors(SHAPES[shape], MIXES[quant])}


def test_q4_k_m_mix_for_a_32_layer_model():
    types = _types("llama2-7b", "q4_k_m")
    for i in range(32):
        expected = T.Q6_K if i in MORE_BITS_32 else T.Q4_K
        assert types[f"blk.{i}.attn_v.weight"] == expected, i
        assert types[f"blk.{i}.ffn_down.weight"] == expected, i
        for name in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert types[f"blk.{i}.{name}.weight"] == T.Q4_K
        assert types[f"blk.{i}.attn_norm.weight"] == T.F32
        assert types[f"blk.{i}.ffn_norm.weight"] == T.F32
    assert types["output.weight"] == T.Q6_K
    assert types["token_embd.weight"] == T.Q4_K
    assert types["output_norm.weight"] == T.F32


def test_q5_k_m_promotes_the_same_layers_from_q5_k():
    types = _types("qwen2-7b", "q5_k_m")
    promoted = {i for i in range(28) if types[f"blk.{i}.attn_v.weight"] == T.Q6_K}
    assert promoted == MORE_BITS_28
    assert types["blk.4.attn_v.weight"] == T.Q5_K
    assert types["blk.0.attn_q.bias"] == T.F32


@pytest.mark.parametrize("quant,default,output", [
    ("q4_0", T.Q4_0, T.Q6_K), ("q4_1", T.Q4_1, T.Q6_K), ("q5_0", T.Q5_0, T.Q6_K), ("q5_1", T.Q5_1, T.Q6_K),
    ("q8_0", T.Q8_0, T.Q8_0), ("q6_k", T.Q6_K, T.Q6_K), ("f16", T.F16, T.F16), ("bf16", T.BF16, T.BF16),
    ("f32", T.F32, T.F32),
])
def test_uniform_mixes(quant, default, output):
    types = _types("llama3-8b", quant)
    assert types.pop("output.weight") == output
    for name, qtype in types.items():
        assert qtype == (T.F32 if name.endswith("norm.weight") else default), name


# Tensor data sizes llama.cpp's llama-bench reports for these models (GiB, parameters in billions):
# an independent check of the whole mix and of the block sizes.
PUBLISHED_SIZES = [
    ("llama2-7b", "q4_k_m", 3.80, 6.74), ("llama2-7b", "q4_0", 3.56, 6.74), ("llama2-7b", "q8_0", 6.67, 6.74),
    ("llama2-7b", "f16", 12.55, 6.74), ("llama2-13b", "q4_k_m", 7.33, 13.02), ("llama3-8b", "q4_k_m", 4.58, 8.03),
    ("qwen2-7b", "q4_k_m", 4.36, 7.62),
]


@pytest.mark.parametrize("shape,quant,gib,billions", PUBLISHED_SIZES)
def test_model_sizes_match_the_published_ones(shape, quant, gib, billions):
    plan = plan_tensors(SHAPES[shape], MIXES[quant])
    assert round(sum(p.nbytes for p in plan) / 2 ** 30, 2) == gib
    assert round(sum(int(np.prod(p.spec.numpy_shape)) for p in plan) / 1e9, 2) == billions


def test_llama2_7b_q4_k_m_tensor_counts_match_the_reference_loader_log():
    # llama.cpp's loader prints "type f32: 65 tensors, type q4_K: 193 tensors, type q6_K: 33 tensors"
    # for the published llama-2-7b Q4_K_M file.
    counts = {}
    for qtype in _types("llama2-7b", "q4_k_m").values():
        counts[qtype] = counts.get(qtype, 0) + 1
    assert counts == {T.F32: 65, T.Q4_K: 193, T.Q6_K: 33}


def test_rows_that_do_not_fit_a_k_block_fall_back_like_the_reference():
    mix = MIXES["q4_k_m"]
    assert tensor_type(mix, TensorSpec("blk.0.ffn_up.weight", (160, 96), 0), 8) == T.Q5_0
    assert tensor_type(mix, TensorSpec("blk.0.attn_v.weight", (64, 96), 0), 8) == T.Q8_0  # Q6_K layer
    assert tensor_type(mix, TensorSpec("output.weight", (300, 96), None), 8) == T.Q8_0
    assert tensor_type(mix, TensorSpec("blk.0.ffn_up.weight", (160, 100), 0), 8) == T.F16
    assert tensor_type(MIXES["q5_k_m"], TensorSpec("blk.2.ffn_up.weight", (160, 96), 2), 8) == T.Q5_1


def test_unknown_quant_lists_the_valid_names():
    with pytest.raises(InvalidParameterError) as info:
        get_mix("q3_k_xl")
    for name in QUANTS:
        assert name in str(info.value)


def test_required_quants_are_offered():
    assert {"f32", "f16", "q8_0", "q4_0", "q4_k_m", "q4_1", "q5_k_m", "q6_k"} <= set(QUANTS)
