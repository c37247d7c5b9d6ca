"""Build GGUF bytes by hand, including files no writer would produce (for the hostile-file tests).

Written from the format description, independently of replayllm's reader; `test_craft_helper_matches_oracle`
checks its valid output against gguf.GGUFReader.
"""

from __future__ import annotations

import struct

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

V = GGUFValueType
T = GGMLQuantizationType


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def string(text: str | bytes, length: int | None = None) -> bytes:
    """A GGUF string; `length` overrides the stored length (to lie about it)."""
    data = text.encode() if isinstance(text, str) else text
    return u64(len(data) if length is None else length) + data


def kv(key: str | bytes, value_type: int, payload: bytes) -> bytes:
    return string(key) + u32(value_type) + payload


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, V.UINT32, u32(value))


def kv_str(key: str, value: str) -> bytes:
    return kv(key, V.STRING, string(value))


def tensor_info(name: str | bytes, shape: tuple[int, ...], ggml_type: int, offset: int,
                n_dims: int | None = None) -> bytes:
    """A tensor info; `shape` in GGUF order (ne[0] first), `offset` relative to the data section."""
    dims = b"".join(u64(d) for d in shape)
    return string(name) + u32(len(shape) if n_dims is None else n_dims) + dims + u32(ggml_type) + u64(offset)


def build(kvs: list[bytes], infos: list[bytes], data: bytes = b"", *, magic: bytes = b"GGUF",
          version: int = 3, n_kv: int | None = None, n_tensors: int | None = None, alignment: int = 32) -> bytes:
    """Header + key-values + tensor infos, zero-padded to `alignment`, then `data`."""
    head = (magic + u32(version) + u64(len(infos) if n_tensors is None else n_tensors)
            + u64(len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos))
    padding = -len(head) % alignment
    return head + bytes(padding) + data


def f32_bytes(values) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def small_valid_file() -> bytes:
    """A little file with metadata of several kinds and two F32 tensors: the seed of mutation tests."""
    a = f32_bytes(np.arange(8))  # 32 bytes: "a" shape (4, 2)
    b = f32_bytes(np.arange(4) * 0.5)  # 16 bytes: "b" shape (4,), 32-byte aligned after "a"
    kvs = [
        kv_str("general.architecture", "llama"),
        kv_u32("llama.block_count", 1),
        kv("tokenizer.ggml.tokens", V.ARRAY, u32(V.STRING) + u64(3) + string("a") + string("bc") + string("")),
        kv("tokenizer.ggml.scores", V.ARRAY, u32(V.FLOAT32) + u64(2) + f32_bytes([0.5, -1.0])),
        kv("x.flag", V.BOOL, b"\x01"),
    ]
    infos = [tensor_info("a", (4, 2), T.F32, 0), tensor_info("b", (4,), T.F32, 32)]
    return build(kvs, infos, a + b)
