"""`quantize_tensor`: float32 rows -> GGUF block bytes of one type."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from ..errors import InvalidParameterError
from . import kquants

T = GGMLQuantizationType

_KQUANTIZERS = {T.Q4_K: kquants.quantize_q4_k, T.Q5_K: kquants.quantize_q5_k, T.Q6_K: kquants.quantize_q6_k}
# Types the format's reference package quantizes exactly as ggml does.
_DELEGATED = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)
SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = _DELEGATED + tuple(_KQUANTIZERS)

# K-quant work goes through in batches of this many 256-value blocks (512 KiB of float32), small
# enough for the temporaries to stay in cache: about twice as fast as whole large tensors.
_KQUANT_BATCH_BLOCKS = 512


def quantize_tensor(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """x: [rows, cols] float32 -> [rows, bytes_per_row] uint8 in the GGUF block layout of `qtype`."""
    names = ", ".join(t.name for t in SUPPORTED_TYPES)
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        raise InvalidParameterError(f"{qtype!r} is not a GGML type; supported: {names}") from None
    if qtype not in SUPPORTED_TYPES:
        raise InvalidParameterError(f"cannot quantize to {qtype.name}; supported: {names}")
    x = np.asarray(x)
    if x.ndim != 2:
        raise InvalidParameterError(f"quantize_tensor expects a 2-D array (rows, cols), got shape {x.shape}")
    rows, cols = x.shape
    block, type_size = GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise InvalidParameterError(f"rows of {cols} values do not split into {qtype.name} blocks of {block}; "
                                    f"use a type whose block size divides {cols}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InvalidParameterError("quantize_tensor: the input holds NaN or infinite values")
    bytes_per_row = cols // block * type_size
    if qtype == T.F32:
        return x.view(np.uint8).reshape(rows, bytes_per_row)
    if qtype == T.F16:
        return x.astype(np.float16).view(np.uint8).reshape(rows, bytes_per_row)
    if qtype in _KQUANTIZERS:
        return _quantize_k(x, _KQUANTIZERS[qtype], type_size).reshape(rows, bytes_per_row)
    return np.asarray(gguf_quants.quantize(x, qtype), dtype=np.uint8).reshape(rows, bytes_per_row)


def _quantize_k(x: np.ndarray, quantizer, type_size: int) -> np.ndarray:
    blocks = x.reshape(-1, kquants.QK_K)  # [n_blocks, 256]
    out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)
    for start in range(0, blocks.shape[0], _KQUANT_BATCH_BLOCKS):
        stop = start + _KQUANT_BATCH_BLOCKS
        out[start:stop] = quantizer(blocks[start:stop])
    return out
