"""dequantize: agrees with the format's reference row by row, keeps the tensor's orientation, rejects what it
cannot expand."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from replayllm.errors import UnsupportedError
from replayllm.gguf import SUPPORTED_TENSOR_TYPES, TensorInfo, dequantize

T = GGMLQuantizationType

# Worst error allowed against the original floats, as a fraction of the largest |value| in the 32-value block:
# half a quantization step, plus the clamp of the top level for the symmetric 4/5-bit types.
QUANTIZABLE = {T.F32: 0.0, T.F16: 1e-3, T.BF16: 4e-3, T.Q8_0: 6e-3, T.Q4_0: 0.13, T.Q4_1: 0.07, T.Q5_0: 0.07,
               T.Q5_1: 0.04}
# Byte offsets of the f16 scale fields inside one block of each K-quant (super-block of 256 values).
K_QUANT_SCALES = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def _info(ggml_type, numpy_shape) -> TensorInfo:
    shape = tuple(reversed(numpy_shape))
    block, size = GGML_QUANT_SIZES[ggml_type]
    return TensorInfo("blk.0.test.weight", shape, ggml_type, 0, int(np.prod(shape)) // block * size)


def _row_by_row_reference(info: TensorInfo, data: np.ndarray) -> np.ndarray:
    """The reference applied to each row's bytes on its own, stacked into numpy order."""
    rows = data.reshape(-1, info.nbytes // (info.n_elements // info.shape[0]))
    out = np.stack([quants.dequantize(row[None, :], info.ggml_type)[0] for row in rows])
    return out.astype(np.float32).reshape(info.numpy_shape)


def test_every_supported_type_is_covered():
    assert set(QUANTIZABLE) | set(K_QUANT_SCALES) == SUPPORTED_TENSOR_TYPES


@pytest.mark.parametrize("ggml_type", list(QUANTIZABLE), ids=lambda t: t.name)
@pytest.mark.parametrize("numpy_shape", [(3, 64), (2, 3, 32), (96,)], ids=str)
def test_quantized_data_comes_back_close_and_in_place(ggml_type, numpy_shape):
    rng = np.random.default_rng(int(ggml_type) * 7 + len(numpy_shape))
    original = (rng.standard_normal(numpy_shape) * 3).astype(np.float32)
    data = np.ascontiguousarray(quants.quantize(original, ggml_type)).view(np.uint8).reshape(-1)
    info = _info(ggml_type, numpy_shape)
    assert data.size == info.nbytes

    out = dequantize(info, data)
    assert out.dtype == np.float32 and out.shape == numpy_shape
    np.testing.assert_array_equal(out, _row_by_row_reference(info, data))
    block_amax = np.abs(original.reshape(-1, 32)).max(axis=1, keepdims=True)
    error = np.abs(out - original).reshape(-1, 32)
    assert (error <= QUANTIZABLE[ggml_type] * block_amax).all()


def _random_k_blocks(ggml_type, n_blocks, rng) -> np.ndarray:
    """Random bytes, with each f16 scale field set to a small finite value so every output is finite."""
    block_bytes = GGML_QUANT_SIZES[ggml_type][1]
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for at in K_QUANT_SCALES[ggml_type]:
        scale = rng.uniform(-0.05, 0.05, size=n_blocks).astype(np.float16)
        blocks[:, at:at + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


@pytest.mark.parametrize("ggml_type", list(K_QUANT_SCALES), ids=lambda t: t.name)
@pytest.mark.parametrize("numpy_shape", [(3, 512), (2, 2, 256)], ids=str)
def test_k_quant_blocks_match_reference(ggml_type, numpy_shape):
    rng = np.random.default_rng(int(ggml_type))
    info = _info(ggml_type, numpy_shape)
    data = _random_k_blocks(ggml_type, info.n_elements // 256, rng)
    out = dequantize(info, data)
    assert out.dtype == np.float32 and out.shape == numpy_shape
    assert np.isfinite(out).all() and np.abs(out).max() > 0
    np.testing.assert_array_equal(out, _row_by_row_reference(info, data))


def test_q6_k_block_with_zero_quants_is_minus_32_scale():
    # Q6_K stores q - 32 in six bits: all-zero bits mean -32 * d * scale for the whole sub-block.
    block = np.zeros(210, dtype=np.uint8)
    block[192:208] = np.arange(1, 17, dtype=np.int8).view(np.uint8)  # 16 sub-block scales
    block[208:210] = np.array([0.5], dtype=np.float16).view(np.uint8)
    out = dequantize(_info(T.Q6_K, (256,)), block)
    np.testing.assert_array_equal(out, np.repeat(-32 * 0.5 * np.arange(1, 17), 16).astype(np.float32))


def test_f32_result_is_a_writable_copy():
    values = np.arange(12, dtype="<f4")
    data = values.view(np.uint8)
    data.flags.writeable = False  # like a view of a read-only file map
    out = dequantize(_info(T.F32, (3, 4)), data)
    assert out.flags.writeable and not np.shares_memory(out, data)
    np.testing.assert_array_equal(out, values.reshape(3, 4))


def test_unsupported_type_names_tensor_type_and_alternatives():
    info = _info(T.IQ2_XS, (1, 256))
    with pytest.raises(UnsupportedError) as caught:
        dequantize(info, np.zeros(info.nbytes, dtype=np.uint8))
    message = str(caught.value)
    assert "blk.0.test.weight" in message and "IQ2_XS" in message
    assert all(t.name in message for t in SUPPORTED_TENSOR_TYPES)


@pytest.mark.parametrize("data", [np.zeros(15, np.uint8), np.zeros(17, np.uint8), np.zeros(4, np.float32)],
                         ids=["short", "long", "float32"])
def test_data_not_matching_info_is_refused(data):
    with pytest.raises(ValueError, match="16 bytes"):
        dequantize(_info(T.F32, (4,)), data)
