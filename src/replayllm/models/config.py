"""Model hyperparameters: one frozen `ModelConfig` read from GGUF metadata, shared by every backend.

The reference model and the GPU kernels both take their rotary tables from `ModelConfig.rope_tables`, so the
two paths cannot disagree about positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import InvalidParameterError
from .rope import rope_cos_sin, rope_inverse_frequencies

MAX_CONTEXT_TOKENS = 2**24  # larger context lengths are a corrupt or hostile file, not a real model


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE frequencies are stretched beyond the training context.

    "linear": positions are divided by `factor` (every frequency divided by `factor`).
    "llama3": Llama 3.1's per-frequency rule: frequencies whose wavelength exceeds
    `original_context_tokens / low_freq_factor` are divided by `factor`, those shorter than
    `original_context_tokens / high_freq_factor` are kept, and the band between is interpolated.
    """

    kind: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context_tokens: int = 8192

    def __post_init__(self):
        if self.kind not in ("linear", "llama3"):
            raise InvalidParameterError(f"rope scaling kind must be 'linear' or 'llama3', got {self.kind!r}")
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise InvalidParameterError(f"rope scaling factor must be a positive number, got {self.factor}")
        if self.kind == "llama3":
            if not 0 < self.low_freq_factor < self.high_freq_factor:
                raise InvalidParameterError(
                    f"llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor, "
                    f"got {self.low_freq_factor} and {self.high_freq_factor}")
            if self.original_context_tokens <= 0:
                raise InvalidParameterError(
                    f"llama3 rope scaling needs original_context_tokens > 0, got {self.original_context_tokens}")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # GGUF general.architecture: "llama", "qwen2", "qwen3"
    num_layers: int
    hidden_size: int  # D, the residual stream width
    intermediate_size: int  # F, the SwiGLU hidden width
    num_heads: int  # Hq
    num_kv_heads: int  # Hkv; Hq / Hkv query heads share one key/value head (GQA)
    head_dim: int  # Dh; may differ from D / Hq (qwen3)
    vocab_size: int
    max_context_tokens: int  # the training context length from the file
    rms_norm_eps: float
    rope_theta: float
    rope_dim: int  # leading dimensions of each head that RoPE rotates (== head_dim for every supported model)
    rope_neox: bool  # True: rotate (x[i], x[i + rope_dim/2]); False: rotate adjacent pairs (x[2i], x[2i+1])
    rope_scaling: RopeScaling | None
    has_qkv_bias: bool
    has_qk_norm: bool
    tied_embeddings: bool  # no output.weight: the LM head is token_embd
    has_rope_freqs: bool = False  # rope_freqs.weight holds per-frequency wavelength multipliers (Llama 3.x)

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                     "vocab_size", "max_context_tokens", "rope_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidParameterError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise InvalidParameterError(
                f"ModelConfig.num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        if self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise InvalidParameterError(
                f"ModelConfig.rope_dim must be even and at most head_dim ({self.head_dim}), got {self.rope_dim}")
        if self.max_context_tokens > MAX_CONTEXT_TOKENS:
            raise InvalidParameterError(
                f"ModelConfig.max_context_tokens must be at most {MAX_CONTEXT_TOKENS}, got {self.max_context_tokens}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise InvalidParameterError(f"ModelConfig.{name} must be a positive number, got {value!r}")

    @classmethod
    def from_metadata(cls, metadata: dict, tensor_shapes: dict[str, tuple[int, ...]], source: str) -> ModelConfig:
        """Read and validate the hyperparameters of a GGUF file; raises GGUFError naming the field at fault.

        `tensor_shapes` are in GGUF order (ne[0] first); `source` names the file in error messages.
        """
        # Imported here: the metadata reader needs the architecture registry, which imports this module.
        from .metadata import config_from_metadata

        return config_from_metadata(metadata, tensor_shapes, source)

    def rope_tables(self, max_tokens: int,
                    freq_factors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each float32 [max_tokens, rope_dim / 2]: row p holds the angles of position p.

        `freq_factors` is the file's rope_freqs.weight [rope_dim / 2]; it is required exactly when
        `has_rope_freqs`, so a Llama 3.x model can never silently run without its frequency scaling.
        """
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise InvalidParameterError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if self.has_rope_freqs and freq_factors is None:
            raise InvalidParameterError(
                "this model scales RoPE by the tensor rope_freqs.weight: pass it as freq_factors")
        if not self.has_rope_freqs and freq_factors is not None:
            raise InvalidParameterError("freq_factors given, but this model has no rope_freqs.weight")
        inv_freq = rope_inverse_frequencies(self.rope_dim, self.rope_theta, self.rope_scaling, freq_factors)
        return rope_cos_sin(inv_freq, max_tokens)
