"""Llama (Llama 2/3, Mistral, TinyLlama, SmolLM2): multi-head attention with grouped K/V heads and RoPE.

GGUF llama files store the Q and K projection rows permuted per head (llama.cpp's converter does it), so
RoPE here rotates adjacent pairs (x[2i], x[2i+1]) ("normal" mode) and gives exactly the Hugging Face model's
half-split rotation on the unpermuted weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import attend_with_cache
from .rope import apply_rope
from .transformer import Architecture, CheckedLoader


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, load: CheckedLoader, prefix: str):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        for name in ("q", "k", "v", "output"):
            self.register_buffer(f"w_{name}", load(f"{prefix}attn_{name}.weight"))  # [out, in]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, start_pos: int, kv_rounding=None) -> torch.Tensor:
        T = x.shape[0]
        q = F.linear(x, self.w_q).view(T, self.num_heads, self.head_dim)  # [T, Hq, Dh]
        k = F.linear(x, self.w_k).view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, Dh]
        v = F.linear(x, self.w_v).view(T, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin, neox=False), apply_rope(k, cos, sin, neox=False)
        return F.linear(attend_with_cache(q, k, v, k_cache, v_cache, start_pos, kv_rounding), self.w_output)


LLAMA = Architecture(name="llama", rope_neox=False, has_qkv_bias=False, has_qk_norm=False,
                     attention_class=LlamaAttention)
