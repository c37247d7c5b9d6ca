"""The pieces every supported decoder shares: RMSNorm, the SwiGLU MLP, the KV cache and causal GQA attention.

Plain fp32 torch, written for clarity: this is the reference that faster paths are checked against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] / sqrt(mean(x^2) + eps) * weight [D]."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); weights in torch order (out_features, in_features)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.register_buffer("gate", gate)  # [F, D]
        self.register_buffer("up", up)  # [F, D]
        self.register_buffer("down", down)  # [D, F]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.gate)) * F.linear(x, self.up), self.down)


@dataclass
class KVCache:
    """Keys and values of one sequence (batch 1), contiguous fp32; rows 0..n-1 hold positions 0..n-1.

    `rounding`: None, or a function of k or v [T, Hkv, Dh] that the cache applies as it stores them, so that the
    reference attends to what a lower-precision cache would give back (the int8 KV cache's round trip: its
    reference, kernels/kv_cache.round_trip_kv_reference)."""

    k: torch.Tensor  # [L, Hkv, max_tokens, Dh] f32
    v: torch.Tensor  # [L, Hkv, max_tokens, Dh] f32
    rounding: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def allocate(cls, num_layers: int, num_kv_heads: int, max_tokens: int, head_dim: int,
                 device: torch.device | str = "cpu", rounding=None) -> KVCache:
        shape = (num_layers, num_kv_heads, max_tokens, head_dim)
        return cls(torch.zeros(shape, dtype=torch.float32, device=device),
                   torch.zeros(shape, dtype=torch.float32, device=device), rounding)

    @property
    def max_tokens(self) -> int:
        return self.k.shape[2]


def attend_with_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, start_pos: int, kv_rounding=None) -> torch.Tensor:
    """Store k, v of positions start_pos..start_pos+T-1 in the cache, then attend causally over it.

    q [T, Hq, Dh] and k, v [T, Hkv, Dh] are already rotated; k_cache, v_cache [Hkv, max_tokens, Dh] (one
    layer). Query head h reads key/value head h // (Hq / Hkv). `kv_rounding` (KVCache.rounding): applied to
    k and v as they are stored. Returns [T, Hq * Dh].
    """
    T, num_heads, head_dim = q.shape
    end = start_pos + T
    if kv_rounding is not None:
        k, v = kv_rounding(k), kv_rounding(v)
    k_cache[:, start_pos:end] = k.transpose(0, 1)
    v_cache[:, start_pos:end] = v.transpose(0, 1)
    group = num_heads // k_cache.shape[0]
    keys = k_cache[:, :end].repeat_interleave(group, dim=0)  # [Hq, end, Dh]
    values = v_cache[:, :end].repeat_interleave(group, dim=0)  # [Hq, end, Dh]
    scores = torch.einsum("thd,hsd->hts", q, keys) * head_dim**-0.5  # [Hq, T, end]
    query_pos = torch.arange(start_pos, end, device=q.device)[:, None]  # [T, 1]
    visible = torch.arange(end, device=q.device)[None, :] <= query_pos  # [T, end]: a query sees itself and the past
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hts,hsd->thd", probs, values).reshape(T, num_heads * head_dim)
