"""Mutated GGUF files: the reader either accepts them (and then every tensor lies inside the file) or raises
GGUFError; never another exception, never slower than a second."""

from __future__ import annotations

import time

import numpy as np
from gguf_craft import T, V, build, kv, kv_u32, small_valid_file, string, tensor_info, u32, u64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replayllm.errors import GGUFError
from replayllm.gguf import SUPPORTED_TENSOR_TYPES, dequantize, read_gguf


def _second_seed() -> bytes:
    # Custom alignment, a quantized tensor, a 3-D tensor and arrays of several kinds: more fields to hit.
    q8 = bytes(34 * 2)  # Q8_0 [2 blocks of 32]
    f16 = np.arange(24, dtype="<f2").tobytes()  # F16 (2, 3, 4): 48 bytes
    kvs = [
        kv_u32("general.alignment", 64),
        kv("a.i64", V.ARRAY, u32(V.INT64) + u64(3) + u64(1) + u64(2**63) + u64(5)),
        kv("a.bool", V.ARRAY, u32(V.BOOL) + u64(2) + b"\x00\x01"),
        kv("s", V.STRING, string("héllo")),
        kv("f", V.FLOAT64, np.float64(0.5).tobytes()),
    ]
    infos = [tensor_info("q", (64,), T.Q8_0, 0), tensor_info("h", (4, 3, 2), T.F16, 128)]
    return build(kvs, infos, q8 + bytes(128 - len(q8)) + f16, alignment=64)


SEEDS = [small_valid_file(), _second_seed()]
INTERESTING = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 31, 32, 33, 63, 64, 255, 2**16, 2**24, 2**24 + 1, 2**31,
               2**32 - 1, 2**32, 2**40, 2**50, 2**63, 2**64 - 1]

_position = st.floats(0.0, 1.0, exclude_max=True)  # relative, so one strategy fits files of any length
_mutation = st.one_of(
    st.tuples(st.just("flip"), _position, st.integers(1, 255)),
    st.tuples(st.just("u64"), _position, st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**64 - 1))),
    st.tuples(st.just("u32"), _position, st.one_of(st.sampled_from(INTERESTING[:21]), st.integers(0, 2**32 - 1))),
    st.tuples(st.just("truncate"), _position, st.just(0)),
    st.tuples(st.just("insert"), _position, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), _position, st.integers(1, 16)),
)


def mutate(raw: bytes, mutations) -> bytes:
    data = bytearray(raw)
    for kind, where, arg in mutations:
        at = int(where * len(data)) if data else 0
        if kind == "flip" and data:
            data[at] ^= arg
        elif kind in ("u64", "u32"):
            width = 8 if kind == "u64" else 4
            data[at:at + width] = arg.to_bytes(8 if kind == "u64" else 4, "little")[:width]
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = arg
        elif kind == "delete":
            del data[at:at + arg]
    return bytes(data)


def test_mutate_changes_bytes_as_described():
    raw = bytes(range(10))
    assert mutate(raw, [("flip", 0.0, 0xFF)])[0] == 0xFF
    assert mutate(raw, [("u32", 0.5, 2**32 - 1)]) == bytes(range(5)) + b"\xff" * 4 + b"\x09"
    assert mutate(raw, [("truncate", 0.3, 0)]) == bytes(range(3))
    assert mutate(raw, [("insert", 0.1, b"ab")]) == b"\x00ab" + bytes(range(1, 10))
    assert mutate(raw, [("delete", 0.9, 5)]) == bytes(range(9))


@settings(max_examples=400, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(SEEDS), mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_mutated_file_is_read_safely_or_rejected(tmp_path_factory, seed, mutations):
    raw = mutate(seed, mutations)
    path = tmp_path_factory.getbasetemp() / "fuzz.gguf"
    path.write_bytes(raw)
    start = time.perf_counter()
    try:
        f = read_gguf(path)
    except GGUFError:
        assert time.perf_counter() - start < 1.0
        return
    assert time.perf_counter() - start < 1.0
    with f:
        for name, info in f.tensors.items():
            assert f.data_offset <= info.offset and info.offset + info.nbytes <= len(raw)
            data = f.tensor_data(name)
            assert data.tobytes() == raw[info.offset:info.offset + info.nbytes]
            if info.ggml_type in SUPPORTED_TENSOR_TYPES:
                assert dequantize(info, data).shape == info.numpy_shape
