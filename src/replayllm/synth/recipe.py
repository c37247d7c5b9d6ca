"""Per-tensor quantization types, following the reference (llama.cpp `llama-quantize`) recipe.

A quantization name ("q4_k_m") picks a default block type and a llama_ftype number for
`general.file_type`; the recipe then adjusts single tensors:

- 1-D tensors (norms, biases) stay F32, as in every GGUF.
- Float mixes (f32, f16, bf16) use their type for every matrix, untouched by the rules below (the
  reference only applies them to quantized defaults).
- output.weight gets Q6_K unless the default is Q8_0 (so q4_0/q4_1/q5_0/q5_1 files carry a Q6_K
  output, as the reference writes them), or Q8_0 if its rows do not split into the default's blocks.
- q4_k_m / q5_k_m: attn_v.weight and ffn_down.weight get Q6_K in the layers `use_more_bits` picks.
- A row length that the chosen block does not divide falls back as the reference does:
  Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and F16 if even that does not fit (where the reference
  has no fallback, e.g. Q4_0 rows not a multiple of 32, it stops; we write F16 instead).
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from ..errors import InvalidParameterError
from .shapes import TensorSpec

T = GGMLQuantizationType


@dataclass(frozen=True)
class QuantMix:
    name: str
    file_type: LlamaFileType
    default: GGMLQuantizationType
    more_bits_type: GGMLQuantizationType | None = None  # attn_v/ffn_down in `use_more_bits` layers

    @property
    def is_float(self) -> bool:
        return self.default in (T.F32, T.F16, T.BF16)


_MIXES = (
    QuantMix("f32", LlamaFileType.ALL_F32, T.F32),
    QuantMix("f16", LlamaFileType.MOSTLY_F16, T.F16),
    QuantMix("bf16", LlamaFileType.MOSTLY_BF16, T.BF16),
    QuantMix("q8_0", LlamaFileType.MOSTLY_Q8_0, T.Q8_0),
    QuantMix("q4_0", LlamaFileType.MOSTLY_Q4_0, T.Q4_0),
    QuantMix("q4_1", LlamaFileType.MOSTLY_Q4_1, T.Q4_1),
    QuantMix("q5_0", LlamaFileType.MOSTLY_Q5_0, T.Q5_0),
    QuantMix("q5_1", LlamaFileType.MOSTLY_Q5_1, T.Q5_1),
    QuantMix("q4_k_m", LlamaFileType.MOSTLY_Q4_K_M, T.Q4_K, more_bits_type=T.Q6_K),
    QuantMix("q5_k_m", LlamaFileType.MOSTLY_Q5_K_M, T.Q5_K, more_bits_type=T.Q6_K),
    QuantMix("q6_k", LlamaFileType.MOSTLY_Q6_K, T.Q6_K),
)
MIXES: dict[str, QuantMix] = {mix.name: mix for mix in _MIXES}
QUANTS: tuple[str, ...] = tuple(MIXES)

_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def get_mix(quant: str) -> QuantMix:
    try:
        return MIXES[quant]
    except KeyError:
        raise InvalidParameterError(f"unknown quantization {quant!r}; choose one of: {', '.join(QUANTS)}") from None


def use_more_bits(layer: int, num_layers: int) -> bool:
    """The reference's choice of layers that get more bits: the first and last eighth, and every
    third layer in between."""
    eighth = num_layers // 8
    return layer < eighth or layer >= 7 * num_layers // 8 or (layer - eighth) % 3 == 2


def tensor_type(mix: QuantMix, spec: TensorSpec, num_layers: int) -> GGMLQuantizationType:
    """The block type of one tensor of a model with `num_layers` blocks under `mix`."""
    if not spec.is_matrix:
        return T.F32
    if mix.is_float:
        return mix.default
    row_length = spec.numpy_shape[-1]  # GGUF ne[0]
    chosen = mix.default
    if spec.name == "output.weight":
        if row_length % block_size(mix.default):
            chosen = T.Q8_0
        elif mix.default != T.Q8_0:
            chosen = T.Q6_K
    elif mix.more_bits_type is not None and spec.name.endswith((".attn_v.weight", ".ffn_down.weight")):
        if spec.layer is not None and use_more_bits(spec.layer, num_layers):
            chosen = mix.more_bits_type
    return _fallback(chosen, row_length)


def block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def _fallback(qtype: GGMLQuantizationType, row_length: int) -> GGMLQuantizationType:
    if row_length % block_size(qtype) == 0:
        return qtype
    smaller = _FALLBACK.get(qtype, T.F16)
    return smaller if row_length % block_size(smaller) == 0 else T.F16
