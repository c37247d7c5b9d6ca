"""Valid GGUF files read back exactly: against what was written, and against gguf.GGUFReader as an oracle."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants
from gguf_craft import V, build, kv, small_valid_file, string, tensor_info, u32, u64

from replayllm.errors import GGUFError
from replayllm.gguf import TensorInfo, read_gguf

T = GGMLQuantizationType

SCALARS = [
    ("t.u8", V.UINT8, 255), ("t.i8", V.INT8, -128), ("t.u16", V.UINT16, 65535), ("t.i16", V.INT16, -32768),
    ("t.u32", V.UINT32, 2**32 - 1), ("t.i32", V.INT32, -2**31), ("t.u64", V.UINT64, 2**64 - 1),
    ("t.i64", V.INT64, -2**63), ("t.f32", V.FLOAT32, 1.5), ("t.f64", V.FLOAT64, math.pi),
    ("t.bool_true", V.BOOL, True), ("t.bool_false", V.BOOL, False), ("t.str", V.STRING, "héllo ✓ 世界\n\x00end"),
]
ARRAYS = [
    ("a.u8", V.UINT8, [0, 7, 255]), ("a.i8", V.INT8, [-128, 0, 127]), ("a.u16", V.UINT16, [1, 65535]),
    ("a.i16", V.INT16, [-32768, 32767]), ("a.u32", V.UINT32, [0, 2**32 - 1]), ("a.i32", V.INT32, [-2**31, 5]),
    ("a.u64", V.UINT64, [2**64 - 1, 3]), ("a.i64", V.INT64, [-2**63, 2**63 - 1]),
    ("a.f32", V.FLOAT32, [0.25, -2.0, 0.1]), ("a.f64", V.FLOAT64, [0.1, -1e300]),
    ("a.bool", V.BOOL, [True, False, True]), ("a.str", V.STRING, ["", "a", "ünï", "x" * 1000]),
]


def _expected(value_type, value):
    """What the reader must return: float32 values are rounded to float32 on the way through the file."""
    if value_type == V.FLOAT32:
        return [float(np.float32(v)) for v in value] if isinstance(value, list) else float(np.float32(value))
    return value


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "w.f32": (rng.standard_normal((3, 8)).astype(np.float32), None),
        "w.f16": (rng.standard_normal(16).astype(np.float16), None),
        "w.q8_0": (quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), T.Q8_0), T.Q8_0),
        "w.3d": (rng.standard_normal((2, 3, 4)).astype(np.float32), None),
        "w.4d": (rng.standard_normal((2, 1, 3, 5)).astype(np.float32), None),
    }


def _write(path, alignment: int | None = None):
    writer = GGUFWriter(path, arch="llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, value_type, value in SCALARS:
        writer.add_key_value(key, value, value_type)
    for key, value_type, value in ARRAYS:
        writer.add_key_value(key, value, V.ARRAY, sub_type=value_type)
    for name, (array, raw_dtype) in _tensors().items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("gguf") / "all_types.gguf")


def test_metadata_reads_back_what_was_written(written):
    with read_gguf(written) as f:
        assert f.version == 3
        assert f.alignment == 32
        expected = {"general.architecture": "llama"}
        expected.update({k: _expected(t, v) for k, t, v in SCALARS + ARRAYS})
        assert f.metadata == expected
        assert list(f.metadata) == list(expected)  # file order kept
        assert type(f.metadata["t.bool_true"]) is bool and type(f.metadata["t.u64"]) is int
        assert all(type(x) is bool for x in f.metadata["a.bool"])
        assert all(type(x) is float for x in f.metadata["a.f32"] + f.metadata["a.f64"])


def test_tensors_read_back_what_was_written(written):
    with read_gguf(written) as f:
        assert list(f.tensors) == list(_tensors())
        for name, (array, raw_dtype) in _tensors().items():
            info = f.tensors[name]
            data = f.tensor_data(name)
            assert data.dtype == np.uint8 and data.shape == (info.nbytes,)
            assert data.tobytes() == array.tobytes()
            assert info.offset % f.alignment == 0 and info.offset >= f.data_offset
            if raw_dtype is None:
                assert info.numpy_shape == array.shape and info.shape == array.shape[::-1]
        assert f.tensors["w.f32"].ggml_type == T.F32 and f.tensors["w.f16"].type_name == "F16"
        assert f.tensors["w.q8_0"].shape == (64, 2) and f.tensors["w.q8_0"].nbytes == 2 * 2 * 34  # 2 rows of 2 blocks


def _check_against_oracle(path, f):
    oracle = GGUFReader(path)
    fields = {name: field for name, field in oracle.fields.items() if not name.startswith("GGUF.")}
    assert list(fields) == list(f.metadata)
    for name, field in fields.items():
        assert f.metadata[name] == field.contents(), name
    assert [t.name for t in oracle.tensors] == list(f.tensors)
    for t in oracle.tensors:
        info = f.tensors[t.name]
        assert (info.shape, info.ggml_type, info.offset, info.nbytes) == (
            tuple(int(d) for d in t.shape), t.tensor_type, t.data_offset, t.n_bytes)
        assert np.array_equal(f.tensor_data(t.name), np.asarray(t.data).reshape(-1).view(np.uint8))


@pytest.mark.parametrize("alignment", [None, 64, 1])
def test_agrees_with_reference_reader(tmp_path, alignment):
    path = _write(tmp_path / "f.gguf", alignment)
    with read_gguf(path) as f:
        assert f.alignment == (alignment or 32)
        _check_against_oracle(path, f)


def test_craft_helper_matches_oracle(tmp_path):
    path = tmp_path / "small.gguf"
    path.write_bytes(small_valid_file())
    with read_gguf(path) as f:
        _check_against_oracle(path, f)
        assert f.metadata["tokenizer.ggml.tokens"] == ["a", "bc", ""]
        np.testing.assert_array_equal(f.tensor_data("b").view("<f4"), [0.0, 0.5, 1.0, 1.5])


def test_version_2_file_reads_like_version_3(tmp_path, written):
    raw = bytearray(written.read_bytes())
    raw[4:8] = (2).to_bytes(4, "little")
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(bytes(raw))
    with read_gguf(written) as f3, read_gguf(v2) as f2:
        assert f2.version == 2
        assert f2.metadata == f3.metadata and f2.tensors == f3.tensors
        assert f2.tensor_data("w.f32").tobytes() == f3.tensor_data("w.f32").tobytes()


def test_empty_array_and_no_tensors(tmp_path):
    path = tmp_path / "empty_array.gguf"
    path.write_bytes(build([kv("e", V.ARRAY, u32(V.INT32) + u64(0)), kv("s", V.STRING, string(""))], []))
    with read_gguf(path) as f:
        assert f.metadata == {"e": [], "s": ""}
        assert f.tensors == {}


def test_adjacent_tensors_with_custom_alignment(tmp_path):
    # Two tensors back to back (no gap) under alignment 16: legal, and not an overlap.
    data = np.arange(8, dtype="<f4").tobytes()
    kvs = [kv("general.alignment", V.UINT32, u32(16))]
    infos = [tensor_info("x", (4,), T.F32, 0), tensor_info("y", (4,), T.F32, 16)]
    path = tmp_path / "adjacent.gguf"
    path.write_bytes(build(kvs, infos, data, alignment=16))
    with read_gguf(path) as f:
        assert f.alignment == 16 and f.data_offset % 16 == 0
        assert f.tensors["y"].offset == f.tensors["x"].offset + 16
        np.testing.assert_array_equal(f.tensor_data("y").view("<f4"), [4, 5, 6, 7])


def test_tensor_data_is_read_only(written):
    with read_gguf(written) as f:
        data = f.tensor_data("w.f32")
        assert not data.flags.writeable
        with pytest.raises(ValueError):
            data[0] = 1


def test_unknown_tensor_name_is_a_gguf_error(written):
    with read_gguf(written) as f:
        with pytest.raises(GGUFError, match=r"tensor\[nope\]"):
            f.tensor_data("nope")


def test_close_ends_access_but_spares_live_views(written):
    f = read_gguf(written)
    view = f.tensor_data("w.f32")
    expected = _tensors()["w.f32"][0].tobytes()
    f.close()  # must not fail although `view` still points into the map
    f.close()  # idempotent
    assert view.tobytes() == expected
    with pytest.raises(ValueError, match="closed"):
        f.tensor_data("w.f32")
    with read_gguf(written) as g:
        pass
    with pytest.raises(ValueError, match="closed"):
        g.tensor_data("w.f32")


def test_tensor_info_properties_and_validation():
    info = TensorInfo("blk.0.attn_q.weight", (512, 3), T.Q4_K, 4096, 2 * 144 * 3)
    assert info.numpy_shape == (3, 512) and info.n_elements == 1536 and info.type_name == "Q4_K"
    with pytest.raises(ValueError, match="block size"):
        TensorInfo("w", (64, 3), T.Q4_K, 0, 0)  # Q4_K blocks hold 256 values
    with pytest.raises(ValueError, match="nbytes"):
        TensorInfo("w", (256, 3), T.Q4_K, 0, 144 * 3 + 1)
    with pytest.raises(ValueError, match="shape"):
        TensorInfo("w", (), T.F32, 0, 0)
    with pytest.raises(ValueError, match="offset"):
        TensorInfo("w", (4,), T.F32, -1, 16)


def test_default_model(default_model_path):
    start = time.perf_counter()
    with read_gguf(default_model_path) as f:
        elapsed = time.perf_counter() - start
        assert elapsed < 1.0
        assert f.version == 3 and f.alignment == 32
        assert f.metadata["general.architecture"] == "llama"
        assert f.metadata["tokenizer.ggml.pre"] == "smollm"
        assert len(f.metadata["tokenizer.ggml.tokens"]) == 49152
        assert len(f.metadata["tokenizer.ggml.merges"]) == 48900
        assert len(f.tensors) == 272
        types = [info.type_name for info in f.tensors.values()]
        assert {t: types.count(t) for t in set(types)} == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
        embd = f.tensors["token_embd.weight"]
        assert embd.shape == (576, 49152) and embd.numpy_shape == (49152, 576)
        size = default_model_path.stat().st_size
        assert all(f.data_offset <= i.offset and i.offset + i.nbytes <= size for i in f.tensors.values())


@pytest.mark.slow  # the reference reader takes seconds over this file
def test_default_model_agrees_with_reference_reader(default_model_path):
    with read_gguf(default_model_path) as f:
        _check_against_oracle(default_model_path, f)
