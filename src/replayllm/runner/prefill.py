"""Prompt processing on the GPU: correct and simple (dequantize a layer's weight into a reusable f16 scratch
buffer, then a vendor GEMM; torch SDPA for attention). It writes the paged KV cache that decode then reads.

Attention reads K and V back from the cache, so prefill sees exactly the f16 values decode will see, and a
chunk starting at `start` > 0 attends to everything already cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import dequantize_into, gather_rows, rmsnorm, rope_and_cache_write
from ..models import ModelConfig
from .decode_step import RopeTables, head_norms
from .kv_cache import PagedKVCache
from .weights import DeviceWeights


SCRATCH_BYTES = 64 * 2**20  # the f16 dequantization scratch: rows of a weight at a time, never the whole LM head


class Prefiller:
    def __init__(self, config: ModelConfig, weights: DeviceWeights, cache: PagedKVCache, rope: RopeTables):
        self.config, self.weights, self.cache, self.rope = config, weights, cache, rope
        largest = max(w.n_rows * w.n_cols for w in weights.matrices())
        widest = max(w.n_cols for w in weights.matrices())
        device = weights.output_norm.device
        # At least one row of the widest matrix; a small model's largest matrix fits whole.
        self.scratch = torch.empty(max(min(largest, SCRATCH_BYTES // 2), widest), dtype=torch.float16,
                                   device=device)

    @property
    def nbytes(self) -> int:
        return self.scratch.numel() * self.scratch.element_size()

    @torch.inference_mode()
    def run(self, token_ids: torch.Tensor, page_table_row: torch.Tensor, start: int = 0,
            all_logits: bool = False) -> torch.Tensor:
        """token_ids [T] int64 on the device, at positions start..start+T-1 of the sequence whose pages are
        `page_table_row` [max_pages] int32. Returns f32 logits [T, vocab] if `all_logits` else [1, vocab]."""
        cfg, T = self.config, token_ids.shape[0]
        device = token_ids.device
        positions = torch.arange(start, start + T, dtype=torch.int32, device=device)
        page_table = page_table_row.unsqueeze(0).expand(T, -1).contiguous()
        x = torch.empty(T, cfg.hidden_size, dtype=torch.float32, device=device)
        gather_rows(self.weights.token_embd, token_ids, x)
        h = torch.empty_like(x)
        for i, layer in enumerate(self.weights.layers):
            rmsnorm(x, layer.attn_norm, cfg.rms_norm_eps, h)
            qkv = self._linear(h, layer.qkv, layer.qkv_bias)
            q, k, v = (t.reshape(T, -1, cfg.head_dim).contiguous() for t in qkv.split(
                [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                 cfg.num_kv_heads * cfg.head_dim], dim=1))
            head_norms(cfg, layer, q, k)
            rope_and_cache_write(q, k, v, self.rope.cos, self.rope.sin, positions, self.cache.k[i],
                                 self.cache.v[i], page_table, neox=cfg.rope_neox)
            attn = self._attention(q, i, page_table_row, start, T)
            x += self._linear(attn.reshape(T, -1), [layer.attn_output], None)
            rmsnorm(x, layer.ffn_norm, cfg.rms_norm_eps, h)
            gate, up = self._linear(h, layer.gate_up, None).chunk(2, dim=1)
            x += self._linear(F.silu(gate) * up, [layer.ffn_down], None)
        last = x if all_logits else x[-1:]
        out = torch.empty_like(last)
        rmsnorm(last.contiguous(), self.weights.output_norm, cfg.rms_norm_eps, out)
        return self._linear(out, [self.weights.output], None)

    def _attention(self, q: torch.Tensor, layer: int, page_table_row: torch.Tensor, start: int,
                   T: int) -> torch.Tensor:
        """q [T, Hq, Dh] (rotated) against the cached keys 0..start+T-1; returns [T, Hq, Dh] f32."""
        total = start + T
        n_pages = -(-total // self.cache.page_size)
        pages = page_table_row[:n_pages].long()

        def gather(cache: torch.Tensor) -> torch.Tensor:  # -> [Hkv, total, Dh] f32
            tiles = cache[layer][pages]  # [n_pages, Hkv, page_size, Dh]
            return tiles.permute(1, 0, 2, 3).reshape(tiles.shape[1], -1, tiles.shape[3])[:, :total].float()

        k, v = gather(self.cache.k), gather(self.cache.v)
        mask = None
        if start > 0:  # query t (position start+t) sees keys 0..start+t
            key_pos = torch.arange(total, device=q.device)
            mask = key_pos[None, :] <= (start + torch.arange(T, device=q.device))[:, None]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask,
            is_causal=mask is None, scale=self.config.head_dim ** -0.5, enable_gqa=True)
        return out[0].transpose(0, 1)

    def _linear(self, x: torch.Tensor, matrices, bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, K] f32 @ [W0|W1|...]^T (+ bias) -> [T, N] f32, each W dequantized into the f16 scratch."""
        x16 = x.to(torch.float16)
        out = torch.empty(x.shape[0], sum(w.n_rows for w in matrices), dtype=torch.float32, device=x.device)
        col = 0
        for w in matrices:
            rows_per_chunk = min(w.n_rows, self.scratch.numel() // w.n_cols)
            for row in range(0, w.n_rows, rows_per_chunk):
                n = min(rows_per_chunk, w.n_rows - row)
                weight = self.scratch[: n * w.n_cols].view(n, w.n_cols)
                dequantize_into(w, weight, row_start=row)
                out[:, col + row: col + row + n] = x16 @ weight.t()
            col += w.n_rows
        return out if bias is None else out + bias

