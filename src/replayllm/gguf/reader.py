"""Open a GGUF file read-only through a memory map and validate its whole header before trusting any of it.

Layout (little-endian, versions 2 and 3):
    magic "GGUF" | u32 version | u64 tensor_count | u64 metadata_kv_count
    metadata_kv_count x (string key, u32 value type, value)
    tensor_count x (string name, u32 n_dims, n_dims x u64 ne, u32 type, u64 offset relative to the data section)
    padding to `general.alignment` (default 32) | data section

Every count and length is checked against the bytes left in the file before it is used, so a crafted file is
rejected quickly and never makes the reader allocate what the file merely claims. Tensor data is handed out as
read-only numpy views of the map, never copied.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from ..errors import GGUFError
from .cursor import ByteCursor, printable
from .metadata import MIN_KV_BYTES, read_metadata
from .types import MAX_DIMS, TensorInfo, block_elements, known_tensor_type, tensor_nbytes

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
HEADER_BYTES = 4 + 4 + 8 + 8
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"

MAX_TENSORS = 2**20
MAX_KV = 2**20
MAX_NAME_BYTES = 64 * 1024
MAX_ELEMENTS = 2**50
# The smallest possible tensor info: name length (u64) + n_dims (u32) + one dim (u64) + type (u32) + offset (u64).
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8


class GGUFFile:
    """A validated GGUF file, memory-mapped read-only until `close()` (or the end of a `with` block)."""

    def __init__(self, path: str, version: int, alignment: int, data_offset: int, metadata: dict[str, object],
                 tensors: dict[str, TensorInfo], mapped: mmap.mmap):
        self.path = path
        self.version = version
        self.alignment = alignment
        self.data_offset = data_offset
        self.metadata = metadata
        self.tensors = tensors
        self._map: mmap.mmap | None = mapped

    def tensor_data(self, name: str) -> np.ndarray:
        """The bytes of tensor `name`: uint8 [info.nbytes], a read-only view of the memory map."""
        if self._map is None:
            raise ValueError(f"{self.path}: the GGUF file is closed")
        info = self.tensors.get(name)
        if info is None:
            raise GGUFError(self.path, f"tensor[{printable(name)}]", "no tensor of that name in the file")
        return np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def close(self) -> None:
        """Release the map. Views from `tensor_data` still alive keep it mapped until they are dropped."""
        if self._map is None:
            return
        try:
            self._map.close()
        except BufferError:
            pass  # arrays still view it; the map is unmapped when the last of them is garbage-collected
        self._map = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({self.path!r}, version={self.version}, {len(self.metadata)} metadata keys, "
                f"{len(self.tensors)} tensors)")


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Map and validate the GGUF file at `path`; raises `GGUFError` naming the field at fault."""
    path = os.fspath(path)
    mapped = _map_file(path)
    try:
        return _parse(path, mapped)
    except BaseException:
        mapped.close()
        raise


def _map_file(path: str) -> mmap.mmap:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a directory, a pipe, a device: nothing to map
            raise GGUFError(path, "file", "not a regular file")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < HEADER_BYTES:
                raise GGUFError(path, "file", f"{size} bytes is too small for a GGUF header ({HEADER_BYTES} bytes)")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise GGUFError(path, "file", f"cannot open: {e.strerror or e}") from None


def _parse(path: str, mapped: mmap.mmap) -> GGUFFile:
    cur = ByteCursor(mapped, path)
    version, n_tensors, n_kv = _read_header(cur)
    metadata, types = read_metadata(cur, n_kv)
    alignment = _alignment(cur, metadata, types)
    infos = _read_tensor_infos(cur, n_tensors)
    data_offset = _align_up(cur.pos, alignment)
    tensors = _place_tensors(cur, infos, data_offset, alignment)
    return GGUFFile(path, version, alignment, data_offset, metadata, tensors, mapped)


def _read_header(cur: ByteCursor) -> tuple[int, int, int]:
    magic = cur.raw(4, "header.magic")
    if magic != MAGIC:
        raise cur.error("header.magic", f"not a GGUF file: it starts with {magic!r}, not {MAGIC!r}")
    version = cur.u32("header.version")
    if version not in SUPPORTED_VERSIONS:
        raise cur.error("header.version", _version_problem(version))
    n_tensors = cur.u64("header.tensor_count")
    n_kv = cur.u64("header.metadata_kv_count")
    if n_kv > MAX_KV:
        raise cur.error("header.metadata_kv_count", f"{n_kv} metadata entries is over the limit of {MAX_KV}")
    if n_tensors > MAX_TENSORS:
        raise cur.error("header.tensor_count", f"{n_tensors} tensors is over the limit of {MAX_TENSORS}")
    # Checked before any loop: each entry and each tensor info takes a minimum number of bytes.
    if n_kv * MIN_KV_BYTES > cur.remaining:
        raise cur.error("header.metadata_kv_count", f"{n_kv} metadata entries cannot fit in the "
                                                    f"{cur.remaining} bytes after the header")
    if n_tensors * MIN_TENSOR_INFO_BYTES + n_kv * MIN_KV_BYTES > cur.remaining:
        raise cur.error("header.tensor_count", f"{n_tensors} tensor infos (and {n_kv} metadata entries) cannot "
                                               f"fit in the {cur.remaining} bytes after the header")
    return version, n_tensors, n_kv


def _version_problem(version: int) -> str:
    swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
    if version == 1:
        return "GGUF version 1 (32-bit counts) is obsolete; convert the model again with a current llama.cpp"
    if swapped in (1, 2, 3):
        return f"big-endian GGUF (version {swapped} byte-swapped) is not supported; use a little-endian file"
    return f"unknown GGUF version {version}; replayllm reads versions {' and '.join(map(str, SUPPORTED_VERSIONS))}"


def _alignment(cur: ByteCursor, metadata: dict[str, object], types: dict[str, GGUFValueType]) -> int:
    if ALIGNMENT_KEY not in metadata:
        return DEFAULT_ALIGNMENT
    field = f"metadata[{ALIGNMENT_KEY}]"
    if types[ALIGNMENT_KEY] != GGUFValueType.UINT32:
        raise cur.error(field, f"must be a UINT32, not {types[ALIGNMENT_KEY].name}")
    alignment = metadata[ALIGNMENT_KEY]
    if alignment <= 0 or alignment & (alignment - 1):
        raise cur.error(field, f"alignment {alignment} is not a power of two")
    return alignment


@dataclass(frozen=True)
class _RawTensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    relative_offset: int
    nbytes: int


def _read_tensor_infos(cur: ByteCursor, n_tensors: int) -> list[_RawTensorInfo]:
    infos: list[_RawTensorInfo] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"tensor[#{i}].name", MAX_NAME_BYTES)
        field = f"tensor[{printable(name)}]"
        if name in seen:
            raise cur.error(field, "tensor name appears twice")
        seen.add(name)
        shape = _read_shape(cur, field)
        code = cur.u32(field + ".type")
        ggml_type = known_tensor_type(code)
        if ggml_type is None:
            raise cur.error(field + ".type", f"unknown tensor type {code}")
        try:
            nbytes = tensor_nbytes(shape, ggml_type)
        except ValueError:
            raise cur.error(field + ".shape", f"row length ne[0]={shape[0]} is not a multiple of the "
                                              f"{ggml_type.name} block size {block_elements(ggml_type)}") from None
        infos.append(_RawTensorInfo(name, shape, ggml_type, cur.u64(field + ".offset"), nbytes))
    return infos


def _read_shape(cur: ByteCursor, field: str) -> tuple[int, ...]:
    n_dims = cur.u32(field + ".n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.error(field + ".n_dims", f"{n_dims} dimensions; a tensor has 1 to {MAX_DIMS}")
    shape = tuple(cur.u64(field + ".shape") for _ in range(n_dims))
    if any(d == 0 for d in shape):
        raise cur.error(field + ".shape", f"shape {list(shape)} has a zero dimension")
    # Each dimension is at most 2**64, so the product below is computed exactly and cheaply.
    if math.prod(shape) > MAX_ELEMENTS:
        raise cur.error(field + ".shape", f"shape {list(shape)} has more than {MAX_ELEMENTS} elements")
    return shape


def _place_tensors(cur: ByteCursor, infos: list[_RawTensorInfo], data_offset: int,
                   alignment: int) -> dict[str, TensorInfo]:
    """Check every tensor lies aligned, inside the file and apart from the others; return them in file order."""
    tensors: dict[str, TensorInfo] = {}
    for raw in infos:
        field = f"tensor[{printable(raw.name)}].offset"
        if raw.relative_offset % alignment:
            raise cur.error(field, f"offset {raw.relative_offset} is not a multiple of the alignment {alignment}")
        start = data_offset + raw.relative_offset
        if start + raw.nbytes > cur.size:
            raise cur.error(field, f"data [{start}, {start + raw.nbytes}) runs past the end of the file "
                                   f"({cur.size} bytes; truncated file?)")
        tensors[raw.name] = TensorInfo(raw.name, raw.shape, raw.ggml_type, start, raw.nbytes)
    by_start = sorted(tensors.values(), key=lambda t: t.offset)
    for before, after in zip(by_start, by_start[1:]):
        if after.offset < before.offset + before.nbytes:
            raise cur.error(f"tensor[{printable(after.name)}].offset",
                            f"data overlaps tensor {printable(before.name)} "
                            f"(starts at {after.offset}, before {before.offset + before.nbytes})")
    return tensors


def _align_up(offset: int, alignment: int) -> int:
    return (offset + alignment - 1) // alignment * alignment
