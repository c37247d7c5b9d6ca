"""Crafted and broken GGUF files: each is rejected with a GGUFError naming the field at fault, within a second."""

from __future__ import annotations

import time

import pytest
from gguf_craft import T, V, build, f32_bytes, kv, kv_str, kv_u32, small_valid_file, string, tensor_info, u32, u64

from replayllm.errors import GGUFError
from replayllm.gguf import read_gguf

ARCH = kv_str("general.architecture", "llama")
W = tensor_info("w", (4,), T.F32, 0)
W_DATA = f32_bytes([1, 2, 3, 4])
BIG = 10**6  # a length far past the end of every file here
PAST_EOF = 60_000  # past the end of every file here, yet under the 64 KiB cap on names
MIB16 = 16 * 1024 * 1024


def with_kvs(*kvs: bytes) -> bytes:
    return build([ARCH, *kvs], [W], W_DATA)


def with_infos(*infos: bytes, data: bytes = W_DATA, kvs: tuple[bytes, ...] = ()) -> bytes:
    return build([ARCH, *kvs], list(infos), data)


def unpadded(kvs: list[bytes], infos: list[bytes] = (), n_tensors: int | None = None) -> bytes:
    """Header and sections with no padding or data: the file ends right after the last byte given."""
    n_tensors = len(infos) if n_tensors is None else n_tensors
    return b"GGUF" + u32(3) + u64(n_tensors) + u64(len(kvs)) + b"".join(kvs) + b"".join(infos)


def array(element_type: int, length: int, payload: bytes = b"") -> bytes:
    return u32(element_type) + u64(length) + payload


CASES = {
    # header
    "empty file": (b"", "file", "too small"),
    "shorter than a header": (b"GGUF\x03\x00\x00\x00", "file", "too small"),
    "wrong magic": (b"GGML" + with_kvs()[4:], "header.magic", "not a GGUF file"),
    "html page": (b"<!DOCTYPE html><html><body>404</body></html>", "header.magic", "not a GGUF file"),
    "version 1": (build([ARCH], [], version=1), "header.version", "obsolete"),
    "version 0": (build([ARCH], [], version=0), "header.version", "unknown GGUF version 0"),
    "version 4": (build([ARCH], [], version=4), "header.version", "unknown GGUF version 4"),
    "version huge": (build([ARCH], [], version=0xDEADBEEF), "header.version", "unknown GGUF version"),
    "big-endian v3": (build([ARCH], [], version=0x03000000), "header.version", "big-endian"),
    "big-endian v2": (build([ARCH], [], version=0x02000000), "header.version", "big-endian"),
    "kv count 2**64-1": (build([ARCH], [], n_kv=2**64 - 1), "header.metadata_kv_count", "over the limit"),
    "kv count over file": (build([ARCH], [], n_kv=50), "header.metadata_kv_count", "cannot fit"),
    "tensor count 2**63": (build([ARCH], [], n_tensors=2**63), "header.tensor_count", "over the limit"),
    "tensor count over file": (build([ARCH], [W], W_DATA, n_tensors=10), "header.tensor_count", "cannot fit"),
    # keys
    "key length past eof": (with_kvs(string("k", length=PAST_EOF)), "metadata[#1].key", "file ends"),
    "key length over cap": (with_kvs(string("k", length=64 * 1024 + 1)), "metadata[#1].key", "over the limit"),
    "key length 2**64-1": (with_kvs(string("k", length=2**64 - 1)), "metadata[#1].key", "over the limit"),
    "key not utf-8": (with_kvs(kv(b"bad\xff\xfe", V.UINT32, u32(1))), "metadata[#1].key", "UTF-8"),
    "key empty": (with_kvs(kv(b"", V.UINT32, u32(1))), "metadata[#1].key", "empty"),
    "duplicate key": (with_kvs(kv_u32("k", 1), kv_u32("k", 2)), "metadata[k]", "twice"),
    "unknown value type": (with_kvs(kv("k", 13, u32(0))), "metadata[k].type", "unknown value type 13"),
    "value type 2**32-1": (with_kvs(kv("k", 2**32 - 1, u32(0))), "metadata[k].type", "unknown value type"),
    # scalar and string values
    "scalar truncated": (unpadded([ARCH, kv("k", V.UINT64, b"\x01\x02")]), "metadata[k]", "file ends"),
    "string past eof": (with_kvs(kv("k", V.STRING, string("abc", length=BIG))), "metadata[k]", "file ends"),
    "string over cap": (with_kvs(kv("k", V.STRING, string("abc", length=MIB16 + 1))), "metadata[k]",
                        "over the limit"),
    "string not utf-8": (with_kvs(kv("k", V.STRING, string(b"\xc3\x28"))), "metadata[k]", "UTF-8"),
    "bool not 0 or 1": (with_kvs(kv("k", V.BOOL, b"\x02")), "metadata[k]", "0 or 1"),
    # arrays
    "array past eof": (with_kvs(kv("k", V.ARRAY, array(V.INT32, BIG))), "metadata[k]", "needs at least"),
    "array over cap": (with_kvs(kv("k", V.ARRAY, array(V.UINT8, 2**24 + 1))), "metadata[k]", "over the limit"),
    "array length 2**64-1": (with_kvs(kv("k", V.ARRAY, array(V.UINT8, 2**64 - 1))), "metadata[k]",
                             "over the limit"),
    "string array past eof": (with_kvs(kv("k", V.ARRAY, array(V.STRING, BIG, string("a")))), "metadata[k]",
                              "needs at least"),
    "string element past eof": (with_kvs(kv("k", V.ARRAY, array(V.STRING, 2, string("a") + string("b", BIG)))),
                                "metadata[k][1]", "file ends"),
    "string element over cap": (
        with_kvs(kv("k", V.ARRAY, array(V.STRING, 2, string("a") + string("b", MIB16 + 1)))),
        "metadata[k][1]", "over the limit"),
    "string element not utf-8": (with_kvs(kv("k", V.ARRAY, array(V.STRING, 2, string("ok") + string(b"\xff")))),
                                 "metadata[k][1]", "UTF-8"),
    "nested array": (with_kvs(kv("k", V.ARRAY, array(V.ARRAY, 1, array(V.UINT8, 1, b"\x00")))), "metadata[k]",
                     "arrays of arrays"),
    "unknown element type": (with_kvs(kv("k", V.ARRAY, array(99, 1, b"\x00"))), "metadata[k].element_type",
                             "unknown value type 99"),
    "bool element not 0 or 1": (with_kvs(kv("k", V.ARRAY, array(V.BOOL, 3, b"\x00\x01\x07"))), "metadata[k]",
                                "0 or 1"),
    # alignment
    "alignment not a power of two": (with_kvs(kv_u32("general.alignment", 48)), "metadata[general.alignment]",
                                     "power of two"),
    "alignment zero": (with_kvs(kv_u32("general.alignment", 0)), "metadata[general.alignment]", "power of two"),
    "alignment as uint64": (with_kvs(kv("general.alignment", V.UINT64, u64(32))), "metadata[general.alignment]",
                            "UINT32"),
    "alignment as string": (with_kvs(kv_str("general.alignment", "32")), "metadata[general.alignment]", "UINT32"),
    # tensor infos
    "tensor name past eof": (with_infos(string("w", PAST_EOF)), "tensor[#0].name", "file ends"),
    "tensor name over cap": (with_infos(string("w", 2**40)), "tensor[#0].name", "over the limit"),
    "tensor name not utf-8": (with_infos(tensor_info(b"w\xff", (4,), T.F32, 0)), "tensor[#0].name", "UTF-8"),
    "duplicate tensor name": (with_infos(W, tensor_info("w", (4,), T.F32, 32), data=W_DATA * 4), "tensor[w]",
                              "twice"),
    "n_dims 0": (with_infos(tensor_info("w", (4,), T.F32, 0, n_dims=0)), "tensor[w].n_dims", "1 to 4"),
    "n_dims 5": (with_infos(tensor_info("w", (4, 1, 1, 1, 1), T.F32, 0)), "tensor[w].n_dims", "1 to 4"),
    "n_dims 2**32-1": (with_infos(tensor_info("w", (4,), T.F32, 0, n_dims=2**32 - 1)), "tensor[w].n_dims",
                       "1 to 4"),
    "zero dimension": (with_infos(tensor_info("w", (4, 0), T.F32, 0)), "tensor[w].shape", "zero dimension"),
    "element count overflow": (with_infos(tensor_info("w", (2**32, 2**32, 2**32, 2**32), T.F32, 0)),
                               "tensor[w].shape", "more than"),
    "dimension negative as int64": (with_infos(tensor_info("w", (4, 2**63), T.F32, 0)), "tensor[w].shape",
                                    "more than"),
    "unknown tensor type": (with_infos(tensor_info("w", (4,), 4, 0)), "tensor[w].type", "unknown tensor type 4"),
    "tensor type 2**32-1": (with_infos(tensor_info("w", (4,), 2**32 - 1, 0)), "tensor[w].type",
                            "unknown tensor type"),
    "row not whole blocks": (with_infos(tensor_info("w", (33, 2), T.Q4_0, 0), data=bytes(64)), "tensor[w].shape",
                             "block size 32"),
    "tensor infos truncated": (unpadded([ARCH], [W[:-3]]), "tensor[w].offset", "file ends"),
    # tensor placement
    "misaligned offset": (with_infos(tensor_info("w", (4,), T.F32, 4), data=bytes(64)), "tensor[w].offset",
                          "multiple of the alignment 32"),
    "misaligned under custom alignment": (
        with_infos(tensor_info("w", (4,), T.F32, 32), data=bytes(128), kvs=(kv_u32("general.alignment", 64),)),
        "tensor[w].offset", "multiple of the alignment 64"),
    "data past end of file": (with_infos(tensor_info("w", (4,), T.F32, 32)), "tensor[w].offset", "past the end"),
    "bytes the file cannot hold": (with_infos(tensor_info("w", (2**20, 2**20), T.F32, 0)), "tensor[w].offset",
                                   "past the end"),
    "offset 2**64-32": (with_infos(tensor_info("w", (4,), T.F32, 2**64 - 32)), "tensor[w].offset", "past the end"),
    "same offset": (with_infos(tensor_info("x", (8,), T.F32, 0), tensor_info("y", (8,), T.F32, 0), data=bytes(64)),
                    "tensor[y].offset", "overlaps tensor x"),
    "partial overlap": (with_infos(tensor_info("x", (16,), T.F32, 32), tensor_info("y", (16,), T.F32, 64),
                                   data=bytes(160)), "tensor[y].offset", "overlaps tensor x"),
    "overlap out of file order": (with_infos(tensor_info("late", (16,), T.F32, 32),
                                             tensor_info("early", (16,), T.F32, 0), data=bytes(128)),
                                  "tensor[late].offset", "overlaps tensor early"),
    "truncated tensor data": (small_valid_file()[:-1], "tensor[b].offset", "past the end"),
}


@pytest.mark.parametrize("raw, field, reason", CASES.values(), ids=CASES.keys())
def test_hostile_file_is_rejected_quickly(tmp_path, raw, field, reason):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(raw)
    start = time.perf_counter()
    with pytest.raises(GGUFError) as caught:
        read_gguf(path)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0
    err = caught.value
    assert err.field == field
    assert reason in err.reason
    assert str(err).startswith(f"{path}: {field}: ")


def test_cases_differ_from_a_valid_file_only_where_intended(tmp_path):
    # The builders used above produce readable files when nothing is broken.
    for i, raw in enumerate([with_kvs(), with_infos(W), small_valid_file(), unpadded([ARCH])]):
        path = tmp_path / f"ok{i}.gguf"
        path.write_bytes(raw)
        with read_gguf(path) as f:
            assert f.metadata["general.architecture"] == "llama"


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError) as caught:
        read_gguf(tmp_path / "absent.gguf")
    assert caught.value.field == "file" and "cannot open" in caught.value.reason


def test_directory(tmp_path):
    with pytest.raises(GGUFError) as caught:
        read_gguf(tmp_path)
    assert caught.value.field == "file" and "not a regular file" in caught.value.reason


def test_control_characters_in_names_are_escaped_in_messages(tmp_path):
    path = tmp_path / "f.gguf"
    path.write_bytes(with_kvs(kv_u32("line\nbreak", 1), kv_u32("line\nbreak", 2)))
    with pytest.raises(GGUFError) as caught:
        read_gguf(path)
    assert "\n" not in str(caught.value) and caught.value.field == "metadata[line\\nbreak]"
