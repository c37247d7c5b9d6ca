"""Rotary position embedding (RoPE): frequencies, their scaling, the cos/sin tables, and the rotation.

Head dimensions are rotated in pairs by the angle position * inv_freq[i]. Which dimensions form a pair is a
property of the file, not of the maths: GGUF llama files store Q/K rows permuted so that pair i is
(x[2i], x[2i+1]) ("normal"); qwen2/qwen3 pair x[i] with x[i + rope_dim/2] ("neox").
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..errors import InvalidParameterError

if TYPE_CHECKING:
    from .config import RopeScaling


def rope_inverse_frequencies(rope_dim: int, theta: float, scaling: RopeScaling | None = None,
                             freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [rope_dim / 2]: theta ** (-2i / rope_dim), scaled by `scaling`, then divided by `freq_factors`.

    `freq_factors` (llama.cpp's rope_freqs.weight) multiplies each wavelength; llama.cpp writes it for
    Llama 3.x instead of storing the llama3 scaling parameters.
    """
    half = rope_dim // 2
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / rope_dim)
    if scaling is not None and scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling is not None and scaling.kind == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    if freq_factors is not None:
        factors = freq_factors.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if factors.shape != (half,):
            raise InvalidParameterError(
                f"rope_freqs.weight must hold {half} values (rope_dim / 2), got {factors.numel()}")
        if not bool(torch.isfinite(factors).all()) or not bool((factors > 0).all()):
            raise InvalidParameterError("rope_freqs.weight must hold positive finite values")
        inv_freq = inv_freq / factors
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by the factor, short ones kept, a linear blend between."""
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength = scaling.original_context_tokens / scaling.low_freq_factor  # longer: fully scaled
    high_freq_wavelength = scaling.original_context_tokens / scaling.high_freq_factor  # shorter: untouched
    smooth = (scaling.original_context_tokens / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelength > low_freq_wavelength, inv_freq / scaling.factor, blended)
    return torch.where(wavelength < high_freq_wavelength, inv_freq, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), float32 [max_tokens, len(inv_freq)], with angles computed in float64 so that far positions
    keep full float32 accuracy."""
    positions = torch.arange(max_tokens, dtype=torch.float64)
    angles = positions[:, None] * inv_freq.to(torch.float64)[None, :]  # [max_tokens, rope_dim / 2]
    return torch.cos(angles).to(torch.float32), torch.sin(angles).to(torch.float32)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """Rotate x [T, H, Dh] by the rows cos/sin [T, R/2] of its positions; dimensions R..Dh pass through."""
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half:]
    if neox:
        a, b = rot[..., :half], rot[..., half:]  # pair i: (x[i], x[i + R/2])
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]  # pair i: (x[2i], x[2i + 1])
    c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, R/2], broadcast over heads
    a_rot, b_rot = a * c - b * s, a * s + b * c
    if neox:
        rotated = torch.cat([a_rot, b_rot], dim=-1)
    else:
        rotated = torch.stack([a_rot, b_rot], dim=-1).flatten(-2)  # interleave back: a0 b0 a1 b1 ...
    return torch.cat([rotated, rest], dim=-1)
