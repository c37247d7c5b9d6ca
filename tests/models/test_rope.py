"""RoPE frequencies, tables and rotation, each against an independent computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from replayllm.errors import InvalidParameterError
from replayllm.models import ModelConfig, RopeScaling
from replayllm.models.rope import apply_rope, rope_inverse_frequencies


def make_config(**overrides) -> ModelConfig:
    fields = dict(architecture="llama", num_layers=1, hidden_size=64, intermediate_size=128, num_heads=4,
                  num_kv_heads=2, head_dim=16, vocab_size=10, max_context_tokens=128, rms_norm_eps=1e-5,
                  rope_theta=10000.0, rope_dim=16, rope_neox=False, rope_scaling=None, has_qkv_bias=False,
                  has_qk_norm=False, tied_embeddings=True)
    return ModelConfig(**(fields | overrides))


def test_tables_are_cos_sin_of_position_times_frequency():
    config = make_config(rope_theta=500000.0, rope_dim=64, head_dim=64, hidden_size=256)
    cos, sin = config.rope_tables(4096)
    assert cos.shape == sin.shape == (4096, 32) and cos.dtype == sin.dtype == torch.float32
    angles = np.arange(4096)[:, None] * np.array([500000.0 ** (-2 * i / 64) for i in range(32)])[None, :]
    np.testing.assert_allclose(cos.numpy(), np.cos(angles), rtol=0, atol=2e-7)
    np.testing.assert_allclose(sin.numpy(), np.sin(angles), rtol=0, atol=2e-7)


def _hf_inverse_frequencies(rope_parameters: dict, head_dim: int) -> np.ndarray:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=131072,
                            rope_parameters=rope_parameters)
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](hf_config, None)
    return inv_freq.double().numpy()


LLAMA31 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context_tokens=8192)


def test_llama3_scaling_matches_transformers():
    scaling = RopeScaling("llama3", **LLAMA31)
    ours = rope_inverse_frequencies(128, 500000.0, scaling).numpy()
    expected = _hf_inverse_frequencies(
        {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, 128)
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    plain = rope_inverse_frequencies(128, 500000.0).numpy()
    assert ours[0] == plain[0] and ours[-1] == pytest.approx(plain[-1] / 8, rel=1e-12)  # both ends of the band
    assert np.sum(ours != plain) > 10 and np.sum((ours != plain) & (ours != plain / 8)) > 0  # a blended middle


def test_linear_scaling_matches_transformers():
    ours = rope_inverse_frequencies(64, 10000.0, RopeScaling("linear", 4.0)).numpy()
    expected = _hf_inverse_frequencies({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, 64)
    np.testing.assert_allclose(ours, expected, rtol=1e-6)


def test_llama3_rope_freqs_tensor_equals_metadata_scaling():
    """llama.cpp's converter folds llama3 scaling into rope_freqs.weight (wavelength multipliers, formula
    written out here); dividing the frequencies by it must give the llama3 frequencies."""
    theta, dim, old, factor, low, high = 500000.0, 128, 8192, 8.0, 1.0, 4.0
    multipliers = []
    for i in range(dim // 2):
        wavelength = 2 * math.pi * theta ** (2 * i / dim)
        if wavelength < old / high:
            multipliers.append(1.0)
        elif wavelength > old / low:
            multipliers.append(factor)
        else:
            smooth = (old / wavelength - low) / (high - low)
            multipliers.append(1 / ((1 - smooth) / factor + smooth))
    freq_factors = torch.tensor(multipliers, dtype=torch.float32)
    config = make_config(rope_theta=theta, rope_dim=dim, head_dim=dim, hidden_size=4 * dim, has_rope_freqs=True)
    from_tensor = config.rope_tables(3000, freq_factors)
    scaled = make_config(rope_theta=theta, rope_dim=dim, head_dim=dim, hidden_size=4 * dim,
                         rope_scaling=RopeScaling("llama3", **LLAMA31))
    from_metadata = scaled.rope_tables(3000)
    for a, b in zip(from_tensor, from_metadata):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)  # float32 factors: angle error ~ p * 1e-8
    assert (from_metadata[0] - make_config(rope_theta=theta, rope_dim=dim, head_dim=dim,
                                           hidden_size=4 * dim).rope_tables(3000)[0]).abs().max() > 0.5


def test_tables_and_freq_factors_must_agree_with_the_config():
    plain, with_freqs = make_config(), make_config(has_rope_freqs=True)
    with pytest.raises(InvalidParameterError, match="rope_freqs.weight"):
        with_freqs.rope_tables(8)
    with pytest.raises(InvalidParameterError, match="no rope_freqs.weight"):
        plain.rope_tables(8, torch.ones(8))
    with pytest.raises(InvalidParameterError, match="must hold 8 values"):
        with_freqs.rope_tables(8, torch.ones(7))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidParameterError, match="positive finite"):
            with_freqs.rope_tables(8, torch.full((8,), bad))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidParameterError, match="max_tokens"):
            plain.rope_tables(bad)


def test_rotation_pairs_written_out():
    a0, a1 = 0.3, 1.1
    cos, sin = torch.tensor([[math.cos(a0), math.cos(a1)]]), torch.tensor([[math.sin(a0), math.sin(a1)]])
    x = torch.tensor([[[1.0, 0.0, 0.0, 1.0]]])  # [T=1, H=1, Dh=4]
    c0, s0, c1, s1 = math.cos(a0), math.sin(a0), math.cos(a1), math.sin(a1)
    # normal: pairs (x0, x1) by a0 and (x2, x3) by a1
    torch.testing.assert_close(apply_rope(x, cos, sin, neox=False), torch.tensor([[[c0, s0, -s1, c1]]]))
    # neox: pairs (x0, x2) by a0 and (x1, x3) by a1
    torch.testing.assert_close(apply_rope(x, cos, sin, neox=True), torch.tensor([[[c0, -s1, s0, c1]]]))


def test_normal_mode_on_permuted_heads_equals_neox_on_the_original():
    torch.manual_seed(0)
    T, H, Dh = 5, 3, 8
    x = torch.randn(T, H, Dh)
    cos, sin = make_config(head_dim=Dh, rope_dim=Dh, hidden_size=32).rope_tables(T)
    order = torch.arange(Dh).view(2, Dh // 2).t().reshape(-1)  # row 2i + j <- row j * Dh/2 + i
    neox = apply_rope(x, cos, sin, neox=True)
    normal = apply_rope(x[..., order], cos, sin, neox=False)
    torch.testing.assert_close(normal, neox[..., order], rtol=0, atol=1e-6)


@pytest.mark.parametrize("neox", [False, True])
def test_partial_rotation_keeps_the_tail_and_the_norm(neox):
    torch.manual_seed(1)
    x = torch.randn(6, 2, 16)
    cos, sin = make_config(head_dim=16, rope_dim=8).rope_tables(6)  # [6, 4]: rotate 8 of 16 dims
    y = apply_rope(x, cos, sin, neox)
    assert torch.equal(y[..., 8:], x[..., 8:])
    torch.testing.assert_close(y[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1))
    torch.testing.assert_close(y[0], x[0])  # position 0: angle 0
    assert (y[1:, :, :8] - x[1:, :, :8]).abs().max() > 0.1
