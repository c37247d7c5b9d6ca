"""Random but valid GGUF rows of one block type, for kernel tests and kernel benchmarks.

Unlike `write_synthetic_model`, which quantizes realistic weights, these rows aim at coverage: every nibble,
high bit and 6-bit scale value of the K-quant types occurs.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

T = GGMLQuantizationType

# Byte offsets of the f16 super-block scales (d, and dmin where present) inside each K-quant block.
_KQUANT_F16_FIELDS = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def random_gguf_rows(ggml_type: GGMLQuantizationType, n_rows: int, n_cols: int, seed: int) -> np.ndarray:
    """uint8 [n_rows, row_bytes]: valid GGUF rows of `ggml_type` that exercise every quant bit pattern.

    Types gguf can quantize are quantized from Gaussian floats. K-quant blocks are random bytes (every
    nibble, high bit and 6-bit scale value occurs) with their f16 super-block scales replaced by small finite
    values, so no block decodes to inf or NaN.
    """
    rng = np.random.default_rng(seed)
    if ggml_type in _KQUANT_F16_FIELDS:
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        blocks = rng.integers(0, 256, size=(n_rows, n_cols // block, type_size), dtype=np.uint8)
        for offset in _KQUANT_F16_FIELDS[ggml_type]:
            scale = rng.uniform(-0.02, 0.02, size=blocks.shape[:2]).astype(np.float16)
            blocks[:, :, offset:offset + 2] = scale.view(np.uint8).reshape(*blocks.shape[:2], 2)
        return blocks.reshape(n_rows, -1)
    values = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    if ggml_type == T.F32:
        return values.view(np.uint8)
    return np.ascontiguousarray(quants.quantize(values, ggml_type)).view(np.uint8)
