"""GGUF tensor types: which ones replayllm can expand to float, their block geometry, and `TensorInfo`.

Block sizes come from the format's reference package (`gguf.GGML_QUANT_SIZES`): a tensor of type T stores its
rows as whole blocks of `block_elements(T)` values, each `block_bytes(T)` long.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_T = GGMLQuantizationType

# Types `dequantize` expands to float32 (all through `gguf.quants.dequantize`).
SUPPORTED_TENSOR_TYPES: frozenset[GGMLQuantizationType] = frozenset({
    _T.F32, _T.F16, _T.BF16,
    _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1, _T.Q8_0,
    _T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K,
})

MAX_DIMS = 4  # ggml's GGML_MAX_DIMS


def known_tensor_type(code: int) -> GGMLQuantizationType | None:
    """The tensor type numbered `code` in the file, or None when the format has no such type (or no size for it)."""
    try:
        ggml_type = GGMLQuantizationType(code)
    except ValueError:
        return None
    return ggml_type if ggml_type in GGML_QUANT_SIZES else None


def block_elements(ggml_type: GGMLQuantizationType) -> int:
    """How many values one block of `ggml_type` holds (1 for plain float types)."""
    return GGML_QUANT_SIZES[ggml_type][0]


def block_bytes(ggml_type: GGMLQuantizationType) -> int:
    """How many bytes one block of `ggml_type` takes."""
    return GGML_QUANT_SIZES[ggml_type][1]


def tensor_nbytes(shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> int:
    """Bytes of a tensor of `shape` (GGUF order); `shape[0]` must be a whole number of blocks."""
    per_block = block_elements(ggml_type)
    if shape[0] % per_block:
        raise ValueError(f"row length {shape[0]} is not a multiple of the {ggml_type.name} block size {per_block}")
    return math.prod(shape) // per_block * block_bytes(ggml_type)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a GGUF file.

    `shape` is in GGUF order, `ne[0]` (the fastest-varying, contiguous dimension) first: a linear layer's
    weight with `in_features` inputs and `out_features` outputs has `shape == (in_features, out_features)`.
    `offset` is the absolute file offset of the tensor's first byte; `nbytes` its length in the file.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int
    nbytes: int

    def __post_init__(self):
        object.__setattr__(self, "ggml_type", GGMLQuantizationType(self.ggml_type))
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if not 1 <= len(self.shape) <= MAX_DIMS or any(d <= 0 for d in self.shape):
            raise ValueError(f"{self.name}: shape {self.shape} must have 1 to {MAX_DIMS} positive dimensions")
        if self.offset < 0:
            raise ValueError(f"{self.name}: offset {self.offset} is negative")
        expected = tensor_nbytes(self.shape, self.ggml_type)
        if self.nbytes != expected:
            raise ValueError(f"{self.name}: nbytes {self.nbytes} != {expected} for {self.type_name} {self.shape}")

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        """The shape in numpy/torch order (slowest dimension first): `(out_features, in_features)` for a weight."""
        return self.shape[::-1]

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def type_name(self) -> str:
        return self.ggml_type.name
