"""The decoder stack the supported architectures share, and `Architecture`, what the registry holds.

An architecture contributes its attention module (what differs between llama, qwen2 and qwen3) and its
traits; the embedding, pre-norm residual blocks with a SwiGLU MLP, final norm and LM head are common.
Weights arrive already loaded (`load_weight`), so no module ever holds random initial values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InvalidParameterError
from .config import ModelConfig
from .layers import KVCache, SwiGLU, rms_norm

LoadWeight = Callable[[str], torch.Tensor]  # GGUF tensor name -> float32 tensor in torch order (reversed GGUF)


def expected_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model reads, with its GGUF shape (ne[0] first: a linear layer is (in, out))."""
    D, F, V, Dh = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    q_width, kv_width = config.num_heads * Dh, config.num_kv_heads * Dh
    shapes = {"token_embd.weight": (D, V), "output_norm.weight": (D,)}
    if not config.tied_embeddings:
        shapes["output.weight"] = (D, V)
    if config.has_rope_freqs:
        shapes["rope_freqs.weight"] = (config.rope_dim // 2,)
    for i in range(config.num_layers):
        p = f"blk.{i}."
        shapes |= {p + "attn_norm.weight": (D,), p + "attn_q.weight": (D, q_width),
                   p + "attn_k.weight": (D, kv_width), p + "attn_v.weight": (D, kv_width),
                   p + "attn_output.weight": (q_width, D), p + "ffn_norm.weight": (D,),
                   p + "ffn_gate.weight": (D, F), p + "ffn_up.weight": (D, F), p + "ffn_down.weight": (F, D)}
        if config.has_qkv_bias:
            shapes |= {p + "attn_q.bias": (q_width,), p + "attn_k.bias": (kv_width,),
                       p + "attn_v.bias": (kv_width,)}
        if config.has_qk_norm:
            shapes |= {p + "attn_q_norm.weight": (Dh,), p + "attn_k_norm.weight": (Dh,)}
    return shapes


class CheckedLoader:
    """Wraps the caller's `load_weight`: each tensor must come back float32-convertible in its torch shape."""

    def __init__(self, config: ModelConfig, load_weight: LoadWeight):
        self.shapes = expected_tensor_shapes(config)
        self.load_weight = load_weight

    def __call__(self, name: str) -> torch.Tensor:
        expected = tuple(reversed(self.shapes[name]))
        tensor = self.load_weight(name)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != expected:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"load_weight({name!r}) returned {got}; expected a tensor of shape {expected}")
        return tensor.to(torch.float32).contiguous()


class DecoderBlock(nn.Module):
    """Pre-norm residual block: x += attention(norm(x)); x += mlp(norm(x))."""

    def __init__(self, config: ModelConfig, attention: nn.Module, load: CheckedLoader, prefix: str):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.attention = attention
        self.register_buffer("attn_norm", load(prefix + "attn_norm.weight"))
        self.register_buffer("ffn_norm", load(prefix + "ffn_norm.weight"))
        self.mlp = SwiGLU(load(prefix + "ffn_gate.weight"), load(prefix + "ffn_up.weight"),
                          load(prefix + "ffn_down.weight"))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, start_pos: int, kv_rounding=None) -> torch.Tensor:
        x = x + self.attention(rms_norm(x, self.attn_norm, self.eps), cos, sin, k_cache, v_cache, start_pos,
                               kv_rounding)
        return x + self.mlp(rms_norm(x, self.ffn_norm, self.eps))


class ReferenceModel(nn.Module):
    """fp32 decoder on dequantized weights: `model(tokens [T], start_pos, cache) -> logits [T, vocab]`."""

    def __init__(self, config: ModelConfig, attention_class: type[nn.Module], load_weight: LoadWeight):
        super().__init__()
        self.config = config
        load = CheckedLoader(config, load_weight)
        self.register_buffer("token_embd", load("token_embd.weight"))  # [V, D]
        self.blocks = nn.ModuleList(
            DecoderBlock(config, attention_class(config, load, f"blk.{i}."), load, f"blk.{i}.")
            for i in range(config.num_layers))
        self.register_buffer("output_norm", load("output_norm.weight"))  # [D]
        # Tied embeddings: the LM head is token_embd itself, not a second copy.
        self.register_buffer("output", None if config.tied_embeddings else load("output.weight"))  # [V, D]
        self.freq_factors = load("rope_freqs.weight") if config.has_rope_freqs else None  # [rope_dim / 2]
        self._cos, self._sin = config.rope_tables(1, self.freq_factors)  # grown by new_kv_cache
        self.eval()

    def new_kv_cache(self, max_tokens: int, rounding=None) -> KVCache:
        """An empty cache for one sequence of up to `max_tokens` tokens (prompt and generated together);
        `rounding` (KVCache.rounding): what the cache does to keys and values as it stores them, None: nothing."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise InvalidParameterError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        device = self.output_norm.device  # the reference also runs on a GPU, to check large models quickly
        if self._cos.shape[0] < max_tokens or self._cos.device != device:
            factors = None if self.freq_factors is None else self.freq_factors.cpu()
            cos, sin = self.config.rope_tables(max(max_tokens, self._cos.shape[0]), factors)
            self._cos, self._sin = cos.to(device), sin.to(device)
        cfg = self.config
        return KVCache.allocate(cfg.num_layers, cfg.num_kv_heads, max_tokens, cfg.head_dim, device, rounding)

    def forward(self, tokens: torch.Tensor, start_pos: int, cache: KVCache) -> torch.Tensor:
        """tokens [T] int64 at positions start_pos..start_pos+T-1, after start_pos tokens already cached."""
        self._check_inputs(tokens, start_pos, cache)
        T = tokens.shape[0]
        cos, sin = self._cos[start_pos:start_pos + T], self._sin[start_pos:start_pos + T]  # [T, rope_dim / 2]
        x = self.token_embd[tokens]  # [T, D]
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache.k[i], cache.v[i], start_pos, cache.rounding)
        x = rms_norm(x, self.output_norm, self.config.rms_norm_eps)
        head = self.token_embd if self.output is None else self.output
        return x @ head.t()  # [T, V]

    def _check_inputs(self, tokens: torch.Tensor, start_pos: int, cache: KVCache) -> None:
        cfg = self.config
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.numel() == 0 \
                or tokens.dtype != torch.long:
            raise InvalidParameterError("tokens must be a non-empty 1-D torch.LongTensor")
        expected = (cfg.num_layers, cfg.num_kv_heads, cache.max_tokens, cfg.head_dim)
        if tuple(cache.k.shape) != expected or tuple(cache.v.shape) != expected:
            raise ValueError(f"KV cache of shape {tuple(cache.k.shape)} does not belong to this model "
                             f"(expected {expected}); create it with new_kv_cache")
        if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
            raise InvalidParameterError(f"start_pos must be a non-negative integer, got {start_pos!r}")
        if start_pos + tokens.shape[0] > cache.max_tokens:
            raise InvalidParameterError(
                f"{start_pos} cached + {tokens.shape[0]} new tokens exceed the KV cache of {cache.max_tokens} "
                f"tokens; create a larger cache with new_kv_cache")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= cfg.vocab_size:
            bad = low if low < 0 else high
            raise InvalidParameterError(f"token id {bad} is outside the vocabulary (0..{cfg.vocab_size - 1})")


@dataclass(frozen=True)
class Architecture:
    """A supported GGUF `general.architecture`: its traits and the attention module that expresses them."""

    name: str
    rope_neox: bool
    has_qkv_bias: bool
    has_qk_norm: bool
    attention_class: type[nn.Module]  # (config, load, prefix) -> module(x, cos, sin, k_cache, v_cache, start_pos)

    def build_reference(self, config: ModelConfig, load_weight: LoadWeight) -> ReferenceModel:
        """The fp32 reference model; `load_weight(name)` is called once per tensor."""
        if config.architecture != self.name:
            raise ValueError(f"config is for {config.architecture!r}, not {self.name!r}")
        return ReferenceModel(config, self.attention_class, load_weight)
