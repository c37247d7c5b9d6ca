"""Prompt processing on the GPU: a chunk of prompt tokens through every layer at once, writing the paged KV
cache that decode then reads.

Each projection is multiplied one of two ways, whichever `tune` measured faster on the device for its weight
shape and chunk size (prefill_tuning): the quantized GEMM (kernels/quant_matmul: the GGUF blocks decoded in
registers for the tensor cores, the residual add fused), or the weight dequantized into an f16 scratch buffer a
slice at a time and the vendor GEMM (on an H200 the second won everywhere, benchmarks/NOTES.md). Attention is
one flash kernel over the paged cache (kernels/prefill_attention), so a chunk starting at `start` > 0 attends
to everything already cached and sees exactly the f16 values decode will see.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType

from ..kernels import (
    dequantize_into,
    gather_rows,
    paged_prefill_attention,
    quant_matmul,
    quant_matvec,
    rmsnorm,
    rope_and_cache_write,
    silu_mul,
)
from ..kernels.quant_weight import QuantWeight
from ..models import ModelConfig
from .decode_step import RopeTables, head_norms
from .kv_cache import PagedKVCache
from .prefill_tuning import DEQUANT_GEMM, LinearMethods
from .weights import DeviceWeights, LayerWeights

SCRATCH_BYTES = 64 * 2**20  # the f16 dequantization scratch: rows of a weight at a time, never the whole LM head


@dataclass
class _ChunkBuffers:
    """One chunk's activations, made per call (prefill is not on the per-token path)."""

    positions: torch.Tensor  # [T] int32
    page_table: torch.Tensor  # [T, max_pages] int32: the sequence's row for each token, as the rope kernel reads
    x: torch.Tensor  # [T, D] f32 residual stream
    h: torch.Tensor  # [T, D] f32 normalised input of the next projection
    qkv: torch.Tensor  # [T, (Hq + 2 Hkv) Dh] f32
    attn: torch.Tensor  # [T, Hq, Dh] f32
    gate_up: torch.Tensor  # [T, 2F] f32
    act: torch.Tensor  # [T, F] f32

    @classmethod
    def allocate(cls, cfg: ModelConfig, token_ids: torch.Tensor, page_table_row: torch.Tensor,
                 start: int) -> _ChunkBuffers:
        T, device = token_ids.shape[0], token_ids.device

        def f32(*shape):
            return torch.empty(shape, dtype=torch.float32, device=device)

        return cls(positions=torch.arange(start, start + T, dtype=torch.int32, device=device),
                   page_table=page_table_row.unsqueeze(0).expand(T, -1).contiguous(),
                   x=f32(T, cfg.hidden_size), h=f32(T, cfg.hidden_size),
                   qkv=f32(T, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim),
                   attn=f32(T, cfg.num_heads, cfg.head_dim), gate_up=f32(T, 2 * cfg.intermediate_size),
                   act=f32(T, cfg.intermediate_size))


class Prefiller:
    def __init__(self, config: ModelConfig, weights: DeviceWeights, cache: PagedKVCache, rope: RopeTables):
        self.config, self.weights, self.cache, self.rope = config, weights, cache, rope
        self.methods = LinearMethods()  # every shape FUSED until `tune` has measured
        self.scratch: torch.Tensor | None = None  # made only if some shape is faster through the vendor GEMM

    def tune(self, chunk_tokens: int, cache=None) -> LinearMethods:
        """Measure the ways of multiplying for every weight shape at a few chunk sizes up to chunk_tokens (on the
        device, once, at load) and keep the fastest per (shape, size); `cache` (a TuningCache) keeps them."""
        from .prefill_tuning import tune_methods

        self.methods = tune_methods(self, chunk_tokens, cache)
        if not self.methods.uses(DEQUANT_GEMM):
            self.scratch = None  # the timing made it; nothing will use it
        else:
            self._ensure_scratch()  # made at load even when the cache spared the timing: the memory report counts it
        return self.methods

    @torch.inference_mode()
    def run(self, token_ids: torch.Tensor, page_table_row: torch.Tensor, start: int = 0,
            all_logits: bool = False) -> torch.Tensor:
        """token_ids [T] int64 on the device, at positions start..start+T-1 of the sequence whose pages are
        `page_table_row` [max_pages] int32. Returns f32 logits [T, vocab] if `all_logits` else [1, vocab]."""
        bufs = _ChunkBuffers.allocate(self.config, token_ids, page_table_row, start)
        gather_rows(self.weights.token_embd, token_ids, bufs.x)
        for i, layer in enumerate(self.weights.layers):
            self._attention_block(i, layer, bufs, page_table_row, start)
            self._mlp_block(layer, bufs)
        last = bufs.x if all_logits else bufs.x[-1:]
        normed = torch.empty_like(last)
        rmsnorm(last, self.weights.output_norm, self.config.rms_norm_eps, normed)
        logits = torch.empty(last.shape[0], self.weights.output.n_rows, dtype=torch.float32, device=last.device)
        if all_logits:
            self.linear(normed, [self.weights.output], logits)
        else:  # one row: the decode GEMV reads the LM head once, no tensor-core tile to fill
            quant_matvec(normed, self.weights.output, logits)
        return logits

    def _attention_block(self, i: int, layer: LayerWeights, bufs: _ChunkBuffers, page_table_row: torch.Tensor,
                         start: int) -> None:
        cfg = self.config
        T, Hq, Hkv, Dh = bufs.x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        rmsnorm(bufs.x, layer.attn_norm, cfg.rms_norm_eps, bufs.h)
        self.linear(bufs.h, layer.qkv, bufs.qkv, layer.qkv_bias)
        q = bufs.qkv[:, :Hq * Dh].view(T, Hq, Dh)  # views of the qkv row: the kernels take row strides
        k = bufs.qkv[:, Hq * Dh:(Hq + Hkv) * Dh].view(T, Hkv, Dh)
        v = bufs.qkv[:, (Hq + Hkv) * Dh:].view(T, Hkv, Dh)
        if layer.q_norm is not None:  # per-head norms work on whole heads in place
            q, k = q.contiguous(), k.contiguous()
            head_norms(cfg, layer, q, k)
        rope_and_cache_write(q, k, v, self.rope.cos, self.rope.sin, bufs.positions, self.cache.k[i],
                             self.cache.v[i], bufs.page_table, neox=cfg.rope_neox)
        paged_prefill_attention(q, self.cache.k[i], self.cache.v[i], page_table_row, start, bufs.attn)
        self.linear(bufs.attn.view(T, Hq * Dh), [layer.attn_output], bufs.x, accumulate=True)

    def _mlp_block(self, layer: LayerWeights, bufs: _ChunkBuffers) -> None:
        rmsnorm(bufs.x, layer.ffn_norm, self.config.rms_norm_eps, bufs.h)
        self.linear(bufs.h, layer.gate_up, bufs.gate_up)
        silu_mul(bufs.gate_up, bufs.act)
        self.linear(bufs.act, [layer.ffn_down], bufs.x, accumulate=True)

    def linear(self, x: torch.Tensor, matrices: list[QuantWeight], out: torch.Tensor,
               bias: torch.Tensor | None = None, accumulate: bool = False) -> None:
        """out (+)= x [T, K] f32 @ [W0|W1|...]^T (+ bias): each matrix writes its column slice of out [T, N] f32,
        by the method measured fastest for its shape and T."""
        col = 0
        for w in matrices:
            part = out[:, col:col + w.n_rows]
            part_bias = None if bias is None else bias[col:col + w.n_rows]
            choice = self.methods.get(w, x.shape[0])
            if choice.method == DEQUANT_GEMM:
                self.dequant_gemm(x, w, part, part_bias, accumulate)
            else:
                quant_matmul(x, w, part, bias=part_bias, accumulate=accumulate, config=choice.config)
            col += w.n_rows

    def dequant_gemm(self, x: torch.Tensor, w: QuantWeight, out: torch.Tensor, bias: torch.Tensor | None,
                     accumulate: bool) -> None:
        """dequant_gemm through this prefiller's scratch, made on first use: at least one row of the widest
        matrix, SCRATCH_BYTES at most (a small model's largest matrix fits whole)."""
        if w.ggml_type != GGMLQuantizationType.F16:
            self._ensure_scratch()
        dequant_gemm(x, w, out, self.scratch, bias, accumulate)

    def _ensure_scratch(self) -> None:
        if self.scratch is not None:  # checked first: dequant_gemm calls this for every matrix of a pass
            return
        quantized = [m for m in self.weights.matrices() if m.ggml_type != GGMLQuantizationType.F16]
        if quantized:
            largest = max(m.n_rows * m.n_cols for m in quantized)
            widest = max(m.n_cols for m in quantized)
            self.scratch = torch.empty(max(min(largest, SCRATCH_BYTES // 2), widest), dtype=torch.float16,
                                       device=self.weights.output_norm.device)


def dequant_gemm(x: torch.Tensor, w: QuantWeight, out: torch.Tensor, scratch: torch.Tensor | None,
                 bias: torch.Tensor | None = None, accumulate: bool = False) -> None:
    """out (+)= x @ W^T (+ bias) through an f16 scratch: W dequantized a slice of rows at a time, each slice
    multiplied by the vendor GEMM. An F16 weight is already what the vendor GEMM wants: no copy, no scratch."""
    x16 = x.to(torch.float16)
    if w.ggml_type == GGMLQuantizationType.F16:
        _store(out, x16 @ w.qs.t(), accumulate)
    else:
        rows_per_slice = slice_rows(w.n_rows, w.n_cols, scratch.numel())
        for row in range(0, w.n_rows, rows_per_slice):
            n = min(rows_per_slice, w.n_rows - row)
            weight = scratch[: n * w.n_cols].view(n, w.n_cols)
            dequantize_into(w, weight, row_start=row)
            _store(out[:, row:row + n], x16 @ weight.t(), accumulate)  # [T, n] f16 product
    if bias is not None:
        out += bias


SLICE_ALIGN = 128  # rows: a slice's product [T, n] with n a multiple of 128 keeps the vendor GEMM on its fast kernels


def slice_rows(n_rows: int, n_cols: int, scratch_elements: int) -> int:
    """Rows of a weight dequantized (and multiplied) at a time: as many as the scratch holds, rounded down to a
    multiple of SLICE_ALIGN when more than that fit. The rounding matters: on an H200, 13B's 5120- and
    13824-wide matrices gave slices of 6553 and 2427 rows, odd widths that sent cuBLAS to a kernel 4-5x slower
    (benchmarks/NOTES.md)."""
    fit = max(1, scratch_elements // n_cols)
    if fit >= n_rows:
        return n_rows
    return fit - fit % SLICE_ALIGN if fit >= SLICE_ALIGN else fit


def _store(target: torch.Tensor, product: torch.Tensor, accumulate: bool) -> None:
    """target (f32) = or += product (f16)."""
    if accumulate:
        target += product
    else:
        target.copy_(product)
