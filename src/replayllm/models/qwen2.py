"""Qwen2 / Qwen2.5: Llama's decoder with biases on the Q, K and V projections and half-split ("neox") RoPE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import attend_with_cache
from .rope import apply_rope
from .transformer import Architecture, CheckedLoader


class Qwen2Attention(nn.Module):
    def __init__(self, config: ModelConfig, load: CheckedLoader, prefix: str):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        for name in ("q", "k", "v"):
            self.register_buffer(f"w_{name}", load(f"{prefix}attn_{name}.weight"))  # [out, in]
            self.register_buffer(f"b_{name}", load(f"{prefix}attn_{name}.bias"))  # [out]
        self.register_buffer("w_output", load(f"{prefix}attn_output.weight"))  # [D, Hq * Dh], no bias

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, start_pos: int, kv_rounding=None) -> torch.Tensor:
        T = x.shape[0]
        q = F.linear(x, self.w_q, self.b_q).view(T, self.num_heads, self.head_dim)  # [T, Hq, Dh]
        k = F.linear(x, self.w_k, self.b_k).view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, Dh]
        v = F.linear(x, self.w_v, self.b_v).view(T, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin, neox=True), apply_rope(k, cos, sin, neox=True)
        return F.linear(attend_with_cache(q, k, v, k_cache, v_cache, start_pos, kv_rounding), self.w_output)


QWEN2 = Architecture(name="qwen2", rope_neox=True, has_qkv_bias=True, has_qk_norm=False,
                     attention_class=Qwen2Attention)
