"""quantize_tensor against the format's reference dequantizer (gguf.quants.dequantize) as the oracle."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from replayllm.errors import InvalidParameterError
from replayllm.synth import quantize_tensor

K_TYPES = (T.Q4_K, T.Q5_K, T.Q6_K)


def _gaussian(rows=64, cols=1024, seed=1):
    return np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32) * 0.02


def _roundtrip(x, qtype):
    return gguf_quants.dequantize(quantize_tensor(x, qtype), qtype)


def _rel_rms(y, x):
    return float(np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2)))


# Expected relative RMS error on Gaussian data. A uniform grid of step s has RMS error s/sqrt(12); the
# range a block adapts to is about 4 sigma for 32 values (~3.5 sigma for Q6_K's 16), so:
#   Q4_K 4 sigma/15/3.46 ~ 0.077 (least-squares refinement gets 0.074), Q5_K 4/31/3.46 ~ 0.037,
#   Q6_K 2*2 sigma/64/3.46 ~ 0.018, Q8_0 (max/127) ~ 0.005, Q4_0 (max/8, symmetric) ~ 0.086.
# A wrong bit packing gives errors of order 1; the bounds sit ~10% above the expected values.
ERROR_BOUNDS = {
    T.F32: 0.0, T.F16: 3e-4, T.BF16: 2.5e-3, T.Q8_0: 0.006, T.Q4_0: 0.095, T.Q4_1: 0.086, T.Q5_0: 0.047,
    T.Q5_1: 0.042, T.Q4_K: 0.080, T.Q5_K: 0.040, T.Q6_K: 0.020,
}


@pytest.mark.parametrize("qtype", list(ERROR_BOUNDS), ids=lambda t: t.name)
def test_roundtrip_error_is_within_the_bit_width_bound(qtype):
    x = _gaussian()
    packed = quantize_tensor(x, qtype)
    block, type_size = GGML_QUANT_SIZES[qtype]
    assert packed.dtype == np.uint8
    assert packed.shape == (64, 1024 // block * type_size)
    assert _rel_rms(gguf_quants.dequantize(packed, qtype), x) <= ERROR_BOUNDS[qtype]


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_k_quant_error_is_unbiased_per_value(qtype):
    # Errors must not grow with position in the block (a packing that swaps halves or nibbles
    # would misplace values even if scales were right).
    x = _gaussian(rows=128, cols=256)
    err = (_roundtrip(x, qtype) - x).reshape(128, 256)
    per_position = np.sqrt(np.mean(err ** 2, axis=0)) / 0.02
    assert per_position.max() <= 1.6 * ERROR_BOUNDS[qtype]


def _exact_affine_blocks(rng, n_blocks, qmax):
    """Values exactly representable as d*sc*q - dmin*m with d = dmin = 2^-10 (f16-exact), every
    sub-block holding q = 0 and q = qmax, and sc = m = 63 in one sub-block, so the fit is exact."""
    unit = np.float32(2.0 ** -10)
    sc = rng.integers(1, 64, size=(n_blocks, 8)).astype(np.float32)
    m = rng.integers(0, 64, size=(n_blocks, 8)).astype(np.float32)
    sc[:, 3] = 63
    m[:, 5] = 63
    q = rng.integers(0, qmax + 1, size=(n_blocks, 8, 32)).astype(np.float32)
    q[:, :, 0] = 0
    q[:, :, 1] = qmax
    x = (unit * sc)[:, :, None] * q - (unit * m)[:, :, None]
    return x.reshape(n_blocks, 256).astype(np.float32)


@pytest.mark.parametrize("qtype,qmax", [(T.Q4_K, 15), (T.Q5_K, 31)], ids=["Q4_K", "Q5_K"])
def test_exactly_representable_values_roundtrip_exactly(qtype, qmax):
    x = _exact_affine_blocks(np.random.default_rng(7), 16, qmax)
    np.testing.assert_allclose(_roundtrip(x.reshape(4, 1024), qtype), x.reshape(4, 1024), rtol=0, atol=1e-7)


def test_exactly_representable_q6_k_values_roundtrip_exactly():
    # x = d * sc * q with d = 2^-10, int8 sub-block scales sc in -128..-1 (one at -128), q in -32..31
    # with a -32 in each sub-block (the quantizer maps the value of largest magnitude to -32).
    rng = np.random.default_rng(8)
    n = 16
    sc = -rng.integers(1, 129, size=(n, 16)).astype(np.float32)
    sc[:, 9] = -128
    q = rng.integers(-31, 32, size=(n, 16, 16)).astype(np.float32)
    q[:, :, 4] = -32
    x = ((np.float32(2.0 ** -10) * sc)[:, :, None] * q).reshape(4, 1024).astype(np.float32)
    np.testing.assert_allclose(_roundtrip(x, T.Q6_K), x, rtol=0, atol=1e-7)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("value", [0.0, 0.37, -0.37, 3.0])
def test_constant_rows(qtype, value):
    x = np.full((3, 512), value, dtype=np.float32)
    y = _roundtrip(x, qtype)
    # f16 super-block factors: relative error <= 2^-11 each, two factors. (For constants below
    # ~1e-2 the format's f16 `d` becomes subnormal and loses precision; real weights stay above.)
    np.testing.assert_allclose(y, x, rtol=2e-3, atol=0)


@pytest.mark.parametrize("qtype,bound", [(T.Q4_K, 0.10), (T.Q5_K, 0.06), (T.Q6_K, 0.025)], ids=["Q4_K", "Q5_K", "Q6_K"])
def test_sub_block_scales_follow_the_data(qtype, bound):
    # One 32-value sub-block 10x larger than the rest of its super-block. With per-sub-block scales
    # the others keep close to their usual error (6-bit sub-scales cost a little); a single scale per
    # super-block would make their error ~10x larger.
    x = _gaussian(rows=64, cols=512, seed=3)
    x[:, 32:64] *= 10
    y = _roundtrip(x, qtype)
    others = np.r_[0:32, 64:256]
    assert _rel_rms(y[:, others], x[:, others]) <= bound
    assert _rel_rms(y[:, 32:64], x[:, 32:64]) <= ERROR_BOUNDS[qtype]
    assert _rel_rms(y[:, 256:], x[:, 256:]) <= ERROR_BOUNDS[qtype]  # the next super-block is unaffected


def test_sign_of_the_extreme_value_does_not_matter_for_q6_k():
    x = _gaussian(rows=32, cols=256, seed=4)
    assert abs(_rel_rms(_roundtrip(x, T.Q6_K), x) - _rel_rms(_roundtrip(-x, T.Q6_K), -x)) < 1e-6


def test_many_rows_are_quantized_in_batches_identically():
    # quantize_tensor walks large inputs in batches; the result must not depend on where batches cut.
    x = _gaussian(rows=600, cols=512, seed=5)
    whole = quantize_tensor(x, T.Q4_K)
    parts = np.concatenate([quantize_tensor(x[:7], T.Q4_K), quantize_tensor(x[7:], T.Q4_K)])
    np.testing.assert_array_equal(whole, parts)


def test_rejects_bad_input():
    with pytest.raises(InvalidParameterError, match="2-D"):
        quantize_tensor(np.zeros(256, np.float32), T.Q4_K)
    with pytest.raises(InvalidParameterError, match="blocks of 256"):
        quantize_tensor(np.zeros((2, 160), np.float32), T.Q4_K)
    with pytest.raises(InvalidParameterError, match="NaN"):
        quantize_tensor(np.full((1, 256), np.nan, np.float32), T.Q6_K)
    with pytest.raises(InvalidParameterError, match="supported: .*Q4_K"):
        quantize_tensor(np.zeros((1, 256), np.float32), T.IQ2_XXS)
    with pytest.raises(InvalidParameterError, match="not a GGML type"):
        quantize_tensor(np.zeros((1, 256), np.float32), 999)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_a_second_dequantizer_reads_the_same_values(qtype):
    # transformers' torch dequantizer is written independently of gguf-py's numpy one.
    torch = pytest.importorskip("torch")
    dequant = pytest.importorskip("transformers.integrations.gguf.dequant")
    if not hasattr(dequant, "dequantize"):
        pytest.skip("this transformers version has no torch GGUF dequantizer")
    x = _gaussian(rows=8, cols=512, seed=6)
    packed = quantize_tensor(x, qtype)
    theirs = dequant.dequantize(torch.from_numpy(packed.reshape(-1)), int(qtype)).numpy().reshape(x.shape)
    np.testing.assert_allclose(theirs, _roundtrip(x, qtype), rtol=0, atol=1e-7)
    assert _rel_rms(theirs, x) <= ERROR_BOUNDS[qtype]
