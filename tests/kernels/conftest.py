"""Fixtures of the kernel tests: valid random GGUF rows of every supported type and their gguf reference.

(The root conftest switches Triton to its interpreter where there is no GPU.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from replayllm.synth.random_rows import random_gguf_rows

T = GGMLQuantizationType


def gguf_reference(ggml_type: GGMLQuantizationType, raw: np.ndarray, n_cols: int) -> np.ndarray:
    """float32 [n_rows, n_cols] from the gguf package's numpy dequantizers."""
    return quants.dequantize(raw, ggml_type).reshape(raw.shape[0], n_cols)


@pytest.fixture
def gguf_rows():
    """random_gguf_rows, for tests (fixtures, not imports: tests/ has several conftest modules)."""
    return random_gguf_rows


@pytest.fixture
def gguf_dequantize():
    return gguf_reference


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
