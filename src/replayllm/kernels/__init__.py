"""Triton kernels of the GPU path, each a private `_name_kernel` behind a checked public launcher, with a
plain-torch reference beside it. Without a GPU they run under Triton's interpreter (TRITON_INTERPRET=1)."""

from .activation import silu_mul, silu_mul_reference
from .decode_attention import DecodeAttentionWorkspace, paged_decode_attention, paged_decode_attention_reference
from .prefill_attention import paged_prefill_attention, paged_prefill_attention_reference
from .quant_dequant import dequantize_into, gather_rows
from .quant_matmul import MatmulConfig, quant_matmul
from .quant_matvec import MatvecConfig, quant_matvec
from .quant_weight import MATVEC_TYPES, QuantWeight, dequantize_reference, pack_weight
from .rmsnorm import add_rmsnorm, rmsnorm, rmsnorm_reference
from .rope import rope_and_cache_write, rope_reference

__all__ = [
    "DecodeAttentionWorkspace", "MATVEC_TYPES", "MatmulConfig", "MatvecConfig", "QuantWeight", "add_rmsnorm",
    "dequantize_into", "dequantize_reference", "gather_rows", "pack_weight", "paged_decode_attention",
    "paged_decode_attention_reference", "paged_prefill_attention", "paged_prefill_attention_reference",
    "quant_matmul", "quant_matvec", "rmsnorm", "rmsnorm_reference", "rope_and_cache_write",
    "rope_reference", "silu_mul", "silu_mul_reference",
]
