"""Prompt processing on the GPU: a chunk of prompt tokens through every layer at once, writing the paged KV
cache that decode then reads.

Each projection is multiplied one of two ways, whichever `tune` measured faster on the device for its weight
shape and chunk size (prefill_tuning): the quantized GEMM (kernels/quant_matmul: the GGUF blocks decoded in
registers for the tensor cores, the residual add fused), or the weight dequantized into an f16 scratch buffer a
slice at a time and the vendor GEMM (on an H200 the second won everywhere, benchmarks/NOTES.md). Attention is
one flash kernel over the paged cache (kernels/prefill_attention), so a chunk starting at `start` > 0 attends
to everything already cached and sees exactly the values decode will see (f16, or an int8 cache's quants).

Memory: a chunk's activations other than the f32 residual stream live in one ActivationPool of two regions,
because a block never needs two of its GEMM inputs (h, attn, act) at once, nor two of its outputs (qkv,
gate_up). `prefill_peak_bytes` counts what a pass of a chunk allocates; the engine sizes the chunk with it.
"""

from __future__ import annotations

import math
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
from .prefill_tuning import DEQUANT_GEMM, LinearMethods, shape_key
from .weights import DeviceWeights, LayerWeights

SCRATCH_BYTES = 64 * 2**20  # the f16 dequantization scratch: rows of a weight at a time, never the whole LM head
# The SwiGLU output `act` is only ever the down projection's input, which both GEMM methods round to f16 first:
# stored in f16 it gives the same bits (kernels/activation.py), in half the bytes, and dequant_gemm's copy goes.
ACT_DTYPE = torch.float16
POOL_ALIGN = 256  # bytes: where the pool's output region starts, so its f32 views are aligned like an allocation


def _aligned(nbytes: int) -> int:
    return -(-nbytes // POOL_ALIGN) * POOL_ALIGN


@dataclass(frozen=True)
class PoolLayout:
    """Bytes a chunk token takes in each region of the ActivationPool.

    Inputs region: h (the normalised input of the qkv and gate_up projections), attn (the o projection's input)
    and act (the down projection's), each written only once the one before is dead: attention writes attn after
    the qkv projection has read h, the next norm writes h after the o projection has read attn, SiLU-gate writes
    act after gate_up has read h. Outputs region: qkv and gate_up, each dead before the other is written. The
    outputs region also holds any projection's f32 output [T, D] (the tuning times the o and down projections
    into it)."""

    input_bytes: int
    output_bytes: int

    @classmethod
    def for_model(cls, cfg: ModelConfig) -> PoolLayout:
        q_width = cfg.num_heads * cfg.head_dim
        qkv_width = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        act_bytes = cfg.intermediate_size * ACT_DTYPE.itemsize
        return cls(input_bytes=max(4 * cfg.hidden_size, 4 * q_width, act_bytes),
                   output_bytes=4 * max(qkv_width, 2 * cfg.intermediate_size, cfg.hidden_size))

    def output_offset(self, tokens: int) -> int:
        return _aligned(tokens * self.input_bytes)

    def nbytes(self, tokens: int) -> int:
        return self.output_offset(tokens) + tokens * self.output_bytes


class ActivationPool:
    """One allocation for a chunk of `tokens` tokens holding a block's GEMM inputs and outputs (PoolLayout):
    views of it are handed out by region, and views of one region alias each other."""

    def __init__(self, cfg: ModelConfig, tokens: int, device: torch.device):
        self.layout = PoolLayout.for_model(cfg)
        self.tokens = tokens
        self.storage = torch.empty(self.layout.nbytes(tokens), dtype=torch.uint8, device=device)

    def gemm_input(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous `dtype` tensor of `shape` at the start of the inputs region."""
        return self._view(0, self.tokens * self.layout.input_bytes, shape, dtype)

    def gemm_output(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A contiguous f32 tensor of `shape` at the start of the outputs region."""
        return self._view(self.layout.output_offset(self.tokens), self.tokens * self.layout.output_bytes, shape,
                          torch.float32)

    def _view(self, offset: int, capacity: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > capacity:
            raise ValueError(f"activation pool: {list(shape)} {dtype} needs {nbytes} bytes, the region holds "
                             f"{capacity} ({self.tokens} tokens)")
        return self.storage[offset:offset + nbytes].view(dtype).view(shape)


@dataclass
class _ChunkBuffers:
    """One chunk's activations, made per call (prefill is not on the per-token path): the residual stream and
    views of one ActivationPool (h, attn, act share its inputs region; qkv, gate_up its outputs region)."""

    positions: torch.Tensor  # [T] int32
    page_table: torch.Tensor  # [T, max_pages] int32: the sequence's row for each token, as the rope kernel reads
    x: torch.Tensor  # [T, D] f32 residual stream
    h: torch.Tensor  # [T, D] f32 normalised input of the next projection
    qkv: torch.Tensor  # [T, (Hq + 2 Hkv) Dh] f32
    attn: torch.Tensor  # [T, Hq, Dh] f32
    gate_up: torch.Tensor  # [T, 2F] f32
    act: torch.Tensor  # [T, F] ACT_DTYPE

    @classmethod
    def allocate(cls, cfg: ModelConfig, positions: torch.Tensor, page_table_row: torch.Tensor) -> _ChunkBuffers:
        T, device = positions.shape[0], positions.device
        pool = ActivationPool(cfg, T, device)
        f32 = torch.float32
        return cls(positions=positions,
                   page_table=page_table_row.unsqueeze(0).expand(T, -1).contiguous(),
                   x=torch.empty(T, cfg.hidden_size, dtype=f32, device=device),
                   h=pool.gemm_input((T, cfg.hidden_size), f32),
                   qkv=pool.gemm_output((T, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim)),
                   attn=pool.gemm_input((T, cfg.num_heads, cfg.head_dim), f32),
                   gate_up=pool.gemm_output((T, 2 * cfg.intermediate_size)),
                   act=pool.gemm_input((T, cfg.intermediate_size), ACT_DTYPE))


@dataclass(frozen=True)
class _Span:
    """Where a pass's rows sit in the sequence, as the attention and rope kernels take it: `start` a host int
    (every row is real), or an int32 [2] device tensor (start, n) (rows from n on are padding: nothing cached,
    nothing attended)."""

    start: int | torch.Tensor

    @property
    def num_rows(self) -> torch.Tensor | None:
        """The device span's n as an int32 [1] view, for the rope kernel; None for a host span."""
        return self.start[1:] if isinstance(self.start, torch.Tensor) else None


def prefill_peak_bytes(cfg: ModelConfig, chunk_tokens: int, max_pages_per_seq: int,
                       f16_weights: bool = False) -> int:
    """Device bytes a prefill pass of `chunk_tokens` tokens allocates at its peak, on top of the loaded model.

    Counted: the residual stream x (f32), the ActivationPool, each token's position and page-table row
    (`max_pages_per_seq` int32), the largest transient of one block -- on the dequant_gemm path the f16 copy of
    an f32 input and one slice's f16 product (a slice as large as a full scratch allows; whole products with
    `f16_weights`, F16 matrices not being sliced), and qwen3's contiguous f32 copies of q and k, alive to the
    end of the attention block -- and the last position's logits (this chunk's and the previous one's). The
    tuning at load times in one pool for its largest bucket (at most the chunk) with the same transients and no
    x, so this bounds it too.
    Not counted: what load allocates once (the dequantization scratch, cuBLAS's workspace), the f32 [T, vocab]
    logits of every position that `logits()` asks for, and the caching allocator's rounding (on an H200, a
    4095-token prompt in chunks of 2048 peaked 0.8 MiB above this, of 298 MiB).
    """
    D, F = cfg.hidden_size, cfg.intermediate_size
    q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    scratch_elements = max(SCRATCH_BYTES // 2, D, q_width, F)

    def projection(n_rows: int, n_cols: int, input_dtype: torch.dtype) -> int:  # bytes a token
        copy = 2 * n_cols if input_dtype != torch.float16 else 0
        rows = n_rows if f16_weights else slice_rows(n_rows, n_cols, scratch_elements)
        return copy + 2 * rows  # f16 copy of the input, f16 product

    qk_copies = 4 * (q_width + kv_width) if cfg.has_qk_norm else 0
    attention = max(projection(q_width + 2 * kv_width, D, torch.float32),
                    qk_copies + projection(D, q_width, torch.float32))
    mlp = max(projection(2 * F, D, torch.float32), projection(D, F, ACT_DTYPE))
    per_token = 4 * D + 4 * (1 + max_pages_per_seq) + max(attention, mlp)
    return chunk_tokens * per_token + PoolLayout.for_model(cfg).nbytes(chunk_tokens) + 2 * 4 * cfg.vocab_size


class Prefiller:
    def __init__(self, config: ModelConfig, weights: DeviceWeights, cache: PagedKVCache, rope: RopeTables):
        self.config, self.weights, self.cache, self.rope = config, weights, cache, rope
        self.methods = LinearMethods()  # every shape FUSED until `tune` has measured
        self.scratch: torch.Tensor | None = None  # made only if some shape is faster through the vendor GEMM

    def activation_pool(self, tokens: int) -> ActivationPool:
        """A pool for `tokens` chunk tokens, as a pass makes (the tuning times its GEMMs in one)."""
        return ActivationPool(self.config, tokens, self.weights.output_norm.device)

    def gemm_inputs(self) -> dict[tuple[str, int, int], tuple[QuantWeight, torch.dtype]]:
        """Each distinct (type, n_rows, n_cols) of the layers' matrices, in pass order: one matrix of it and the
        dtype of the activations a pass multiplies it by (h and attn f32, act ACT_DTYPE)."""
        inputs = {}
        for layer in self.weights.layers:
            for w in (*layer.qkv, layer.attn_output, *layer.gate_up):
                inputs.setdefault(shape_key(w), (w, torch.float32))
            inputs.setdefault(shape_key(layer.ffn_down), (layer.ffn_down, ACT_DTYPE))
        return inputs

    def peak_bytes(self, chunk_tokens: int) -> int:
        """prefill_peak_bytes of a pass of chunk_tokens tokens, for this model's weights and cache."""
        f16_weights = any(m.ggml_type == GGMLQuantizationType.F16 for m in self.weights.layer_matrices())
        return prefill_peak_bytes(self.config, chunk_tokens, self.cache.max_pages_per_seq, f16_weights)

    def pending_scratch_bytes(self) -> int:
        """Bytes the dequantization scratch will take once made (0 when it exists or nothing needs it)."""
        return 0 if self.scratch is not None else 2 * self._scratch_elements()

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
        T, device = token_ids.shape[0], token_ids.device
        positions = torch.arange(start, start + T, dtype=torch.int32, device=device)
        bufs = self._layers(token_ids, positions, page_table_row, _Span(start))
        if all_logits:
            return self._logits(bufs.x, bufs, all_rows=True)
        return self._logits(bufs.x[-1:], bufs)

    @torch.inference_mode()
    def run_padded(self, token_ids: torch.Tensor, page_table_row: torch.Tensor, span: torch.Tensor,
                   last_row: torch.Tensor) -> torch.Tensor:
        """The same pass with every host value fixed but the shapes, for capture in a CUDA graph
        (runner/prefill_graph): token_ids [B] int64, of which the first n are the chunk's and the rest padding
        (any valid ids); span int32 [2] = (start, n), n <= B; last_row int64 [1] = n - 1. Returns the logits of
        row n - 1, [1, vocab] f32. The padding rows run through the GEMMs (each row its own), but write no
        cache slot and attend to nothing; the real rows never see them."""
        B = token_ids.shape[0]
        positions = torch.arange(B, dtype=torch.int32, device=token_ids.device) + span[0]
        bufs = self._layers(token_ids, positions, page_table_row, _Span(span))
        return self._logits(bufs.x.index_select(0, last_row), bufs)

    def _layers(self, token_ids: torch.Tensor, positions: torch.Tensor, page_table_row: torch.Tensor,
                span: _Span) -> _ChunkBuffers:
        bufs = _ChunkBuffers.allocate(self.config, positions, page_table_row)
        gather_rows(self.weights.token_embd, token_ids, bufs.x)
        for i, layer in enumerate(self.weights.layers):
            self._attention_block(i, layer, bufs, page_table_row, span)
            self._mlp_block(layer, bufs)
        return bufs

    def _logits(self, last: torch.Tensor, bufs: _ChunkBuffers, all_rows: bool = False) -> torch.Tensor:
        """Final norm and LM head of the rows `last` [R, D] (the pass's x or rows of it)."""
        normed = bufs.h[:last.shape[0]]  # free once the last layer has run
        rmsnorm(last, self.weights.output_norm, self.config.rms_norm_eps, normed)
        logits = torch.empty(last.shape[0], self.weights.output.n_rows, dtype=torch.float32, device=last.device)
        if all_rows:
            self.linear(normed, [self.weights.output], logits)
        else:  # one row: the decode GEMV reads the LM head once, no tensor-core tile to fill
            quant_matvec(normed, self.weights.output, logits)
        return logits

    def _attention_block(self, i: int, layer: LayerWeights, bufs: _ChunkBuffers, page_table_row: torch.Tensor,
                         span: _Span) -> None:
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
        scales = self.cache.scales(i)  # an int8 cache's, or none
        rope_and_cache_write(q, k, v, self.rope.cos, self.rope.sin, bufs.positions, self.cache.k[i],
                             self.cache.v[i], bufs.page_table, neox=cfg.rope_neox, num_rows=span.num_rows, **scales)
        paged_prefill_attention(q, self.cache.k[i], self.cache.v[i], page_table_row, span.start, bufs.attn,
                                **scales)
        self.linear(bufs.attn.view(T, Hq * Dh), [layer.attn_output], bufs.x, accumulate=True)

    def _mlp_block(self, layer: LayerWeights, bufs: _ChunkBuffers) -> None:
        rmsnorm(bufs.x, layer.ffn_norm, self.config.rms_norm_eps, bufs.h)
        self.linear(bufs.h, layer.gate_up, bufs.gate_up)
        silu_mul(bufs.gate_up, bufs.act)
        self.linear(bufs.act, [layer.ffn_down], bufs.x, accumulate=True)

    def linear(self, x: torch.Tensor, matrices: list[QuantWeight], out: torch.Tensor,
               bias: torch.Tensor | None = None, accumulate: bool = False) -> None:
        """out (+)= x [T, K] f32 or f16 @ [W0|W1|...]^T (+ bias): each matrix writes its column slice of out
        [T, N] f32, by the method measured fastest for its shape and T. Both methods round x to f16 first, so an
        f16 x gives the same result as the f32 x it was rounded from."""
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
        elements = self._scratch_elements()
        if elements:
            self.scratch = torch.empty(elements, dtype=torch.float16, device=self.weights.output_norm.device)

    def _scratch_elements(self) -> int:
        """f16 elements of the scratch: the largest quantized matrix or SCRATCH_BYTES, whichever is smaller, but
        at least its widest row; 0 when every matrix is F16."""
        quantized = [m for m in self.weights.matrices() if m.ggml_type != GGMLQuantizationType.F16]
        if not quantized:
            return 0
        largest = max(m.n_rows * m.n_cols for m in quantized)
        return max(min(largest, SCRATCH_BYTES // 2), max(m.n_cols for m in quantized))


def dequant_gemm(x: torch.Tensor, w: QuantWeight, out: torch.Tensor, scratch: torch.Tensor | None,
                 bias: torch.Tensor | None = None, accumulate: bool = False) -> None:
    """out (+)= x @ W^T (+ bias) through an f16 scratch: W dequantized a slice of rows at a time, each slice
    multiplied by the vendor GEMM. An F16 weight is already what the vendor GEMM wants: no copy, no scratch.
    An f32 x is copied to f16 once; an f16 x is used as it is."""
    x16 = x.to(torch.float16)  # no copy when x is f16 already
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
