"""Packing GGUF rows into QuantWeight and the plain-torch reference dequantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from replayllm.errors import InvalidParameterError, UnsupportedError
from replayllm.kernels.quant_weight import (
    MATVEC_TYPES,
    QuantWeight,
    decode_kquant_scales,
    dequantize_reference,
    kquant_scales_mins,
    pack_kquant_scales,
    pack_weight,
)

T = GGMLQuantizationType
ALL_TYPES = sorted(MATVEC_TYPES, key=int)
KQUANTS = (T.Q4_K, T.Q5_K, T.Q6_K)


def test_matvec_types_are_the_supported_layouts():
    assert MATVEC_TYPES == {T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.F16, T.BF16, T.F32}


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
def test_reference_equals_gguf_dequantize(ggml_type, gguf_rows, gguf_dequantize):
    n_rows, n_cols = 7, 768
    raw = gguf_rows(ggml_type, n_rows, n_cols, seed=int(ggml_type))
    w = pack_weight(ggml_type, raw, n_cols)
    got = dequantize_reference(w)
    assert got.dtype == torch.float32 and tuple(got.shape) == (n_rows, n_cols)
    np.testing.assert_array_equal(got.numpy(), gguf_dequantize(ggml_type, raw, n_cols))


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
def test_pack_accepts_torch_bytes_and_concatenated_rows(ggml_type, gguf_rows, gguf_dequantize):
    n_cols = 512
    a = gguf_rows(ggml_type, 3, n_cols, seed=1)
    b = gguf_rows(ggml_type, 5, n_cols, seed=2)
    w = pack_weight(ggml_type, torch.from_numpy(np.concatenate([a, b], axis=0)), n_cols)
    assert (w.n_rows, w.n_cols) == (8, n_cols)
    expected = np.concatenate([gguf_dequantize(ggml_type, a, n_cols), gguf_dequantize(ggml_type, b, n_cols)])
    np.testing.assert_array_equal(dequantize_reference(w).numpy(), expected)


def test_pack_copies_read_only_input(gguf_rows):
    raw = gguf_rows(T.Q4_0, 2, 64, seed=3)
    raw.setflags(write=False)  # as a view of a memory-mapped file is
    w = pack_weight(T.Q4_0, raw, 64)
    w.qs.add_(1)  # the packed tensors are our own memory
    assert raw.flags.writeable is False


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
def test_nbytes_is_the_quantized_size(ggml_type, gguf_rows):
    n_rows, n_cols = 4, 512
    raw = gguf_rows(ggml_type, n_rows, n_cols, seed=4)
    w = pack_weight(ggml_type, raw, n_cols)
    # Every type keeps its GGUF size: the K-quants' 6-bit scales stay packed at 12 bytes per 256 weights.
    assert w.nbytes == raw.nbytes


def test_decode_kquant_scales_matches_the_bit_layout():
    # Scale i and min i set to distinct 6-bit values, packed by hand per the format's layout.
    scales = np.array([1, 22, 63, 40, 5, 48, 33, 17], dtype=np.uint8)
    mins = np.array([60, 2, 31, 47, 12, 63, 0, 50], dtype=np.uint8)
    packed = np.zeros(12, dtype=np.uint8)
    packed[0:4] = scales[:4] | ((scales[4:] >> 4) << 6)
    packed[4:8] = mins[:4] | ((mins[4:] >> 4) << 6)
    packed[8:12] = (scales[4:] & 0xF) | ((mins[4:] & 0xF) << 4)
    got_scales, got_mins = decode_kquant_scales(packed)
    np.testing.assert_array_equal(got_scales, scales)
    np.testing.assert_array_equal(got_mins, mins)


def test_kquant_scales_repack_round_trips_every_6bit_value():
    # All 64 x 64 (scale, min) pairs, in rows of 8 sub-blocks (one super-block), so every bit of both bytes is hit.
    sc, mn = np.meshgrid(np.arange(64, dtype=np.uint8), np.arange(64, dtype=np.uint8), indexing="ij")
    scales, mins = sc.reshape(-1, 8), mn.reshape(-1, 8)
    low, high = pack_kquant_scales(scales, mins)
    assert low.shape == (512, 8) and high.shape == (512, 4)
    n_rows = scales.shape[0]
    w = QuantWeight(T.Q4_K, n_rows, 256, qs=torch.zeros(n_rows, 128, dtype=torch.uint8),
                    scales=torch.from_numpy(low), scales_hi=torch.from_numpy(high),
                    d=torch.zeros(n_rows, 1, dtype=torch.float16), dmin=torch.zeros(n_rows, 1, dtype=torch.float16))
    got_scales, got_mins = kquant_scales_mins(w)
    np.testing.assert_array_equal(got_scales.numpy(), scales)
    np.testing.assert_array_equal(got_mins.numpy(), mins)


def test_to_moves_every_field():
    raw = np.zeros((2, 210), dtype=np.uint8)
    w = pack_weight(T.Q6_K, raw, 256)
    moved = w.to("meta")
    assert moved.device.type == "meta" and all(t.device.type == "meta" for t in moved.tensors().values())
    assert set(moved.tensors()) == {"qs", "qh", "scales", "d"}
    assert (moved.n_rows, moved.n_cols, moved.ggml_type) == (2, 256, T.Q6_K)


def test_pack_rejects_an_unsupported_type():
    with pytest.raises(UnsupportedError, match="Q2_K.*supported: .*Q4_K"):
        pack_weight(T.Q2_K, np.zeros((1, 84), dtype=np.uint8), 256)


@pytest.mark.parametrize("raw, n_cols, message", [
    (np.zeros((2, 18), dtype=np.uint8), 48, "multiple of 32"),
    (np.zeros((2, 36), dtype=np.uint8), 32, "takes 18 bytes, got 36"),
    (np.zeros((2, 9), dtype=np.uint16), 32, "uint8"),
    (np.zeros(18, dtype=np.uint8), 32, "2-D"),
    (np.zeros((0, 18), dtype=np.uint8), 32, "no rows"),
    (torch.zeros(2, 18, dtype=torch.int8), 32, "uint8"),
])
def test_pack_rejects_bad_bytes(raw, n_cols, message):
    with pytest.raises(InvalidParameterError, match=message):
        pack_weight(T.Q4_0, raw, n_cols)


def test_quant_weight_validates_its_fields():
    qs = torch.zeros(2, 16, dtype=torch.uint8)
    scales = torch.zeros(2, 1, dtype=torch.float16)
    QuantWeight(T.Q4_0, 2, 32, qs=qs, scales=scales)  # consistent: accepted
    with pytest.raises(InvalidParameterError, match="'scales': expected torch.float16"):
        QuantWeight(T.Q4_0, 2, 32, qs=qs, scales=scales.float())
    with pytest.raises(InvalidParameterError, match="'scales'.*got None"):
        QuantWeight(T.Q4_0, 2, 32, qs=qs)
    with pytest.raises(InvalidParameterError, match="no field 'mins'"):
        QuantWeight(T.Q4_0, 2, 32, qs=qs, scales=scales, mins=scales)
    with pytest.raises(InvalidParameterError, match="contiguous"):
        QuantWeight(T.Q4_0, 2, 32, qs=torch.zeros(16, 2, dtype=torch.uint8).t(), scales=scales)
    with pytest.raises(InvalidParameterError, match="multiple of the block size 32"):
        QuantWeight(T.Q4_0, 2, 40, qs=qs, scales=scales)
    with pytest.raises(UnsupportedError, match="IQ2_XS"):
        QuantWeight(T.IQ2_XS, 2, 256, qs=qs)


@pytest.mark.parametrize("ggml_type", KQUANTS, ids=lambda t: t.name)
def test_kquant_reference_on_hand_built_block(ggml_type):
    """One block decoded by hand from the format's definition, independent of gguf's numpy code."""
    type_size = GGML_QUANT_SIZES[ggml_type][1]
    rng = np.random.default_rng(int(ggml_type))
    q = rng.integers(0, 64 if ggml_type == T.Q6_K else (32 if ggml_type == T.Q5_K else 16), size=256)
    raw = np.zeros(type_size, dtype=np.uint8)
    if ggml_type == T.Q6_K:
        sc = rng.integers(-128, 128, size=16).astype(np.int8)
        for i in range(256):  # weight i = 128*half + 32*part + l, part p of nibble half s: see Q6_K layout
            half, rest = divmod(i, 128)
            s, rest = divmod(rest, 64)
            p, l = divmod(rest, 32)
            raw[64 * half + 32 * p + l] |= (q[i] & 0xF) << (4 * s)
            raw[128 + 32 * half + l] |= (q[i] >> 4) << (2 * (2 * s + p))
        raw[192:208] = sc.view(np.uint8)
        raw[208:210] = np.array([0.25], dtype=np.float16).view(np.uint8)
        expected = 0.25 * sc.astype(np.float32).repeat(16) * (q - 32)
    else:
        sc = rng.integers(0, 64, size=8)
        mn = rng.integers(0, 64, size=8)
        raw[0:2] = np.array([0.5], dtype=np.float16).view(np.uint8)
        raw[2:4] = np.array([0.125], dtype=np.float16).view(np.uint8)
        raw[4:8] = (sc[:4] | ((sc[4:] >> 4) << 6)).astype(np.uint8)
        raw[8:12] = (mn[:4] | ((mn[4:] >> 4) << 6)).astype(np.uint8)
        raw[12:16] = ((sc[4:] & 0xF) | ((mn[4:] & 0xF) << 4)).astype(np.uint8)
        qs_at = 16 if ggml_type == T.Q4_K else 48
        for i in range(256):  # sub-block sb = i // 32: chunk sb // 2 of 32 bytes, low nibble if sb is even
            sb, l = divmod(i, 32)
            raw[qs_at + 32 * (sb // 2) + l] |= (q[i] & 0xF) << (4 * (sb % 2))
            if ggml_type == T.Q5_K:
                raw[16 + l] |= (q[i] >> 4) << sb
        expected = 0.5 * sc.repeat(32) * q - 0.125 * mn.repeat(32)
    w = pack_weight(ggml_type, raw[None, :], 256)
    np.testing.assert_array_equal(dequantize_reference(w)[0].numpy(), expected.astype(np.float32))
