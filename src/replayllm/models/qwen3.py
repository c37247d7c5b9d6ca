"""Qwen3 (dense): no projection biases; each query and key head is RMS-normalised (one weight [Dh] shared by
all heads) before half-split ("neox") RoPE. The head width comes from attention.key_length and need not be
hidden_size / num_heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import attend_with_cache, rms_norm
from .rope import apply_rope
from .transformer import Architecture, CheckedLoader


class Qwen3Attention(nn.Module):
    def __init__(self, config: ModelConfig, load: CheckedLoader, prefix: str):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.eps = config.rms_norm_eps
        for name in ("q", "k", "v", "output"):
            self.register_buffer(f"w_{name}", load(f"{prefix}attn_{name}.weight"))  # [out, in]
        self.register_buffer("q_norm", load(f"{prefix}attn_q_norm.weight"))  # [Dh]
        self.register_buffer("k_norm", load(f"{prefix}attn_k_norm.weight"))  # [Dh]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, start_pos: int, kv_rounding=None) -> torch.Tensor:
        T = x.shape[0]
        q = F.linear(x, self.w_q).view(T, self.num_heads, self.head_dim)  # [T, Hq, Dh]
        k = F.linear(x, self.w_k).view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, Dh]
        v = F.linear(x, self.w_v).view(T, self.num_kv_heads, self.head_dim)
        q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
        q, k = apply_rope(q, cos, sin, neox=True), apply_rope(k, cos, sin, neox=True)
        return F.linear(attend_with_cache(q, k, v, k_cache, v_cache, start_pos, kv_rounding), self.w_output)


QWEN3 = Architecture(name="qwen3", rope_neox=True, has_qkv_bias=False, has_qk_norm=True,
                     attention_class=Qwen3Attention)
