"""Expand a tensor's GGUF bytes to float32 with the format's reference code (`gguf.quants.dequantize`)."""

from __future__ import annotations

import numpy as np
from gguf import quants

from ..errors import UnsupportedError
from .types import SUPPORTED_TENSOR_TYPES, TensorInfo

_SUPPORTED_NAMES = ", ".join(sorted(t.name for t in SUPPORTED_TENSOR_TYPES))


def dequantize(info: TensorInfo, data: np.ndarray) -> np.ndarray:
    """float32 [*info.numpy_shape] from `data`, the tensor's uint8 [info.nbytes] bytes (as `tensor_data` gives).

    The result is a new, writable array: never a view of `data` (which may be a read-only file map).
    """
    if info.ggml_type not in SUPPORTED_TENSOR_TYPES:
        raise UnsupportedError(f"{info.name}: tensor type {info.type_name} is not supported; "
                               f"supported: {_SUPPORTED_NAMES}")
    if data.dtype != np.uint8 or data.size != info.nbytes:
        raise ValueError(f"{info.name}: expected uint8 data of {info.nbytes} bytes, got {data.dtype} "
                         f"with {data.size} elements")
    n_cols = info.shape[0]
    # rows: uint8 [n_rows, row_bytes]; the reference works row by row over whole blocks.
    rows = data.reshape(info.n_elements // n_cols, -1)
    values = quants.dequantize(rows, info.ggml_type)
    if np.may_share_memory(values, data):  # F32 comes back as a view of the input
        values = values.copy()
    return values.astype(np.float32, copy=False).reshape(info.numpy_shape)
