"""One decode step of a llama-family model (llama, qwen2, qwen3) as a fixed sequence of kernel launches.

Every tensor the step touches lives in `StepBuffers`, allocated once per batch size; the step reads its inputs
(`tokens`, `positions`, `page_table`) from device memory, so the same launches, captured once in a CUDA graph,
serve every token. The residual stream is f32; projections accumulate into it in place (`accumulate=True`), so
no separate residual-add kernel runs.

The quantized matrices' GEMVs take their input in one of three forms (`StepBuffers.activations`):
- "16bit" (the default at batch sizes up to 4): the input quantized in blocks of 32 to 16 bits, made by the
  kernel that produces it (norm, SiLU gate, attention merge) in the same launch; integer dot products
  (kernels/quant_matvec_q8) whose rounding, at most 1.5e-5 of a block's largest value, is below f16's
  for all but its smallest values;
- "int8" (opt-in): the same with int8 quants, about 1.5-2x faster again, but its rounding changes greedy output;
- "f32": the f32 activations themselves (kernels/quant_matvec), the exact path, and the tensor-core one at
  larger batches.
F16 / BF16 matrices always take f32 activations: at batch sizes up to 4 in kernels/float_matvec (row tiles, one
FMA a weight), above in quant_matvec's tensor-core path; F32 matrices in quant_matvec.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import (
    DecodeAttentionWorkspace,
    gather_rows,
    paged_decode_attention,
    quant_matvec,
    rmsnorm,
    rope_and_cache_write,
    silu_mul,
)
from ..kernels.decode_attention import NewToken
from ..kernels.float_matvec import float_matvec, supports as supports_float_matvec
from ..kernels.int8_activations import ACTIVATION_BLOCK, QuantizedActivations
from ..kernels.quant_matvec_q8 import SUPPORTED_TYPES as INT8_ACTIVATION_TYPES, quant_matvec_q8
from ..errors import InvalidParameterError
from ..kernels.quant_weight import QuantWeight
from ..models import ModelConfig
from .gemv_tuning import GemvShapes
from .kv_cache import PagedKVCache
from .weights import DeviceWeights, LayerWeights


@dataclass
class StepBuffers:
    """Static inputs, activations and outputs of a decode step for a batch of `batch_size` sequences."""

    batch_size: int
    tokens: torch.Tensor  # [B] int64: the token each sequence feeds in this step
    positions: torch.Tensor  # [B] int32: its position (= tokens already in the cache)
    page_table: torch.Tensor  # [B, max_pages_per_seq] int32
    x: torch.Tensor  # [B, D] f32 residual stream
    h: torch.Tensor  # [B, D] f32 normalised input of the next projection
    qkv: torch.Tensor  # [B, (Hq + 2 Hkv) Dh] f32
    q: torch.Tensor  # [B, Hq, Dh] f32 (a view of qkv when B == 1)
    k: torch.Tensor  # [B, Hkv, Dh]
    v: torch.Tensor  # [B, Hkv, Dh]
    attn: torch.Tensor  # [B, Hq, Dh] f32
    gate_up: torch.Tensor  # [B, 2F] f32
    act: torch.Tensor  # [B, F] f32
    logits: torch.Tensor  # [B, vocab] f32
    attention_workspace: DecodeAttentionWorkspace
    # Quantized copies of the projection inputs (kernels/int8_activations.py), int8 and 16-bit, used by the
    # matrices of quant_matvec_q8's SUPPORTED_TYPES when `activations` says so (read when the step is captured).
    # None where a width (or, for attn, the head dimension) is not a multiple of the activation block.
    h_q8: QuantizedActivations | None = None
    attn_q8: QuantizedActivations | None = None
    act_q8: QuantizedActivations | None = None
    h_q16: QuantizedActivations | None = None
    attn_q16: QuantizedActivations | None = None
    act_q16: QuantizedActivations | None = None
    activations: str = "f32"  # one of ACTIVATION_FORMS
    # kernels/pdl.py: every kernel of the step launched with programmatic dependent launch (Hopper and later;
    # the engine's default there), read when the step is captured.
    pdl: bool = False
    # With pdl: each decode GEMV's programs ask L2 for their weight rows before their PDL wait (row_tiles
    # ._prefetch_rows_l2), so the reads start while the kernel before drains. Off: measured slower on an H100
    # (tg128 7B Q4_K_M 356 t/s with it, 404 without; benchmarks/NOTES.md). Read when the step is captured.
    prefetch_weights: bool = False
    # Decode attention's last split merges the splits in the same launch (kernels/decode_attention fused_merge)
    # instead of a merge kernel of its own. Off: on one H100 load it measured the same at depth 0 (412.2 t/s
    # against 411.3 apart) and slower at depth 3,840 (302.8 against 309.6; benchmarks/NOTES.md). Read when
    # the step is captured.
    fused_attention_merge: bool = False
    # Decode attention rotates q and the new k and writes the new token into the cache itself (NewToken) instead
    # of rope_and_cache_write's launch before it. Off: measured slower on an H100 (tg128 7B Q4_K_M 402.8 t/s
    # with it, 414.3 without; at depth 3,840 299.5 against 313.0: benchmarks/NOTES.md). Read when captured.
    rope_in_attention: bool = False
    # With an int8 KV cache: decode attention multiplies the cache's quants in integer products instead of f16
    # conversions of its tiles (kernels/decode_attention int8_products). Opt-in: not yet measured on a GPU.
    int8_attention_products: bool = False
    # Decode attention's products as f32 multiply-adds on the CUDA cores, one program per q head
    # (kernels/decode_attention fma_products), f16 or int8 caches. Opt-in: not yet measured on a GPU.
    fma_attention_products: bool = False
    # The integer-dot GEMVs' launch shapes, tuned at load on a GPU (runner/gemv_tuning); None: the defaults.
    gemv_shapes: GemvShapes | None = None

    @classmethod
    def allocate(cls, config: ModelConfig, batch_size: int, max_pages_per_seq: int, max_context_tokens: int,
                 device: torch.device) -> StepBuffers:
        B, Dh, Hq, Hkv = batch_size, config.head_dim, config.num_heads, config.num_kv_heads

        def f32(*shape):
            return torch.zeros(shape, dtype=torch.float32, device=device)

        qkv = f32(B, (Hq + 2 * Hkv) * Dh)
        if B == 1:  # views: no copies on the batch-1 path
            q, k, v = (t.view(1, -1, Dh) for t in qkv.split([Hq * Dh, Hkv * Dh, Hkv * Dh], dim=1))
        else:
            q, k, v = f32(B, Hq, Dh), f32(B, Hkv, Dh), f32(B, Hkv, Dh)
        bufs = cls(
            batch_size=B,
            tokens=torch.zeros(B, dtype=torch.int64, device=device),
            positions=torch.zeros(B, dtype=torch.int32, device=device),
            page_table=torch.zeros(B, max_pages_per_seq, dtype=torch.int32, device=device),
            x=f32(B, config.hidden_size), h=f32(B, config.hidden_size), qkv=qkv, q=q, k=k, v=v,
            attn=f32(B, Hq, Dh), gate_up=f32(B, 2 * config.intermediate_size),
            act=f32(B, config.intermediate_size), logits=f32(B, config.vocab_size),
            attention_workspace=DecodeAttentionWorkspace.create(B, Hq, Dh, max_context_tokens, device),
            # The attention merge quantizes each head on its own: its blocks of 32 must not straddle heads.
            **{f"{name}_{suffix}": _quantized(B, width, device, wide)
               for name, width in (("h", config.hidden_size), ("act", config.intermediate_size),
                                   ("attn", Hq * Dh if Dh % ACTIVATION_BLOCK == 0 else None))
               for suffix, wide in (("q8", False), ("q16", True))},
        )
        bufs.activations = default_activations(bufs)
        return bufs

    @property
    def gemv_options(self) -> dict:
        """What every decode GEMV launch of the step takes from these buffers (`project`'s keywords)."""
        return {"pdl": self.pdl, "shapes": self.gemv_shapes, "prefetch": self.prefetch_weights}

    @property
    def can_quantize_activations(self) -> bool:
        return None not in (self.h_q8, self.attn_q8, self.act_q8)

    def quantized_inputs(self, form: str | None = None) -> tuple[QuantizedActivations | None, ...]:
        """(h, attn, act) copies for activation form `form` (None: the step's), Nones for "f32": what the norm,
        attention and SiLU kernels write beside their f32 outputs and the GEMVs read."""
        form = form or self.activations
        if form == "int8":
            return self.h_q8, self.attn_q8, self.act_q8
        if form == "16bit":
            return self.h_q16, self.attn_q16, self.act_q16
        return None, None, None


ACTIVATION_FORMS = ("16bit", "int8", "f32")


def check_activation_form(form: str) -> None:
    """InvalidParameterError unless `form` is one of ACTIVATION_FORMS."""
    if form not in ACTIVATION_FORMS:
        raise InvalidParameterError(f"activations must be one of {', '.join(ACTIVATION_FORMS)}, got {form!r}")
MAX_QUANTIZED_BATCH = 4  # above it the f32 path's tensor-core GEMV reads the weights once for all rows


def default_activations(bufs: StepBuffers, weights: DeviceWeights | None = None) -> str:
    """"16bit" where every projection input can be quantized and the batch is small, else "f32"; also "f32"
    for `weights` none of whose matrices takes quantized inputs (F16 / BF16 / F32), so that its norm, attention
    and SiLU kernels write no copy that no GEMV reads."""
    if weights is not None and not any(w.ggml_type in INT8_ACTIVATION_TYPES
                                       for w in (weights.output, *weights.layer_matrices())):
        return "f32"
    return "16bit" if bufs.can_quantize_activations and bufs.batch_size <= MAX_QUANTIZED_BATCH else "f32"


def _quantized(batch: int, width: int | None, device: torch.device, wide: bool) -> QuantizedActivations | None:
    if width is None or width % ACTIVATION_BLOCK:
        return None
    return QuantizedActivations.allocate(batch, width, device, wide)


@dataclass
class RopeTables:
    cos: torch.Tensor  # [max_context, rope_dim / 2] f32, rope scaling included
    sin: torch.Tensor


def decode_step(config: ModelConfig, weights: DeviceWeights, cache: PagedKVCache, rope: RopeTables,
                bufs: StepBuffers) -> torch.Tensor:
    """Run all layers for `bufs.tokens` at `bufs.positions`; returns `bufs.logits` [B, vocab]."""
    gather_rows(weights.token_embd, bufs.tokens, bufs.x, pdl=bufs.pdl)
    for i, layer in enumerate(weights.layers):
        _attention_block(config, layer, cache.k[i], cache.v[i], cache.scales(i), rope, bufs)
        _mlp_block(config, layer, bufs)
    h_q8, _, _ = bufs.quantized_inputs()
    rmsnorm(bufs.x, weights.output_norm, config.rms_norm_eps, bufs.h, h_q8, pdl=bufs.pdl)
    project(bufs.h, [weights.output], bufs.logits, None, h_q8, **bufs.gemv_options)
    return bufs.logits


def _attention_block(config: ModelConfig, layer: LayerWeights, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     scales: dict, rope: RopeTables, bufs: StepBuffers) -> None:
    """scales: the layer's int8 cache scales as the kernels' keyword arguments (PagedKVCache.scales), or {}."""
    h_q8, attn_q8, _ = bufs.quantized_inputs()
    rmsnorm(bufs.x, layer.attn_norm, config.rms_norm_eps, bufs.h, h_q8, pdl=bufs.pdl)
    project(bufs.h, layer.qkv, bufs.qkv, layer.qkv_bias, h_q8, **bufs.gemv_options)
    if bufs.batch_size > 1:
        B, Dh = bufs.batch_size, config.head_dim
        q, k, v = bufs.qkv.split([t.shape[1] * Dh for t in (bufs.q, bufs.k, bufs.v)], dim=1)
        bufs.q.copy_(q.view(B, -1, Dh))
        bufs.k.copy_(k.view(B, -1, Dh))
        bufs.v.copy_(v.view(B, -1, Dh))
    head_norms(config, layer, bufs.q, bufs.k, pdl=bufs.pdl)
    new_token = None
    if bufs.rope_in_attention:
        new_token = NewToken(bufs.k, bufs.v, rope.cos, rope.sin, config.rope_neox)
    else:
        rope_and_cache_write(bufs.q, bufs.k, bufs.v, rope.cos, rope.sin, bufs.positions, k_cache, v_cache,
                             bufs.page_table, neox=config.rope_neox, pdl=bufs.pdl, **scales)
    paged_decode_attention(bufs.q, k_cache, v_cache, bufs.page_table, bufs.positions,
                           config.head_dim ** -0.5, bufs.attn, bufs.attention_workspace, out_q8=attn_q8,
                           pdl=bufs.pdl, fused_merge=bufs.fused_attention_merge, new_token=new_token,
                           int8_products=bufs.int8_attention_products, fma_products=bufs.fma_attention_products,
                           **scales)
    project(bufs.attn.view(bufs.batch_size, -1), [layer.attn_output], bufs.x, None, attn_q8, accumulate=True,
            **bufs.gemv_options)


def head_norms(config: ModelConfig, layer: LayerWeights, q: torch.Tensor, k: torch.Tensor, *,
               pdl: bool = False) -> None:
    """qwen3: RMSNorm of every query and key head before RoPE, in place (q [T, Hq, Dh], k [T, Hkv, Dh]);
    nothing for architectures without per-head norms. Decode and prefill both call it."""
    if layer.q_norm is None:
        return
    for t, w in ((q, layer.q_norm), (k, layer.k_norm)):
        flat = t.view(-1, config.head_dim)
        rmsnorm(flat, w, config.rms_norm_eps, flat, pdl=pdl)


def _mlp_block(config: ModelConfig, layer: LayerWeights, bufs: StepBuffers) -> None:
    h_q8, _, act_q8 = bufs.quantized_inputs()
    rmsnorm(bufs.x, layer.ffn_norm, config.rms_norm_eps, bufs.h, h_q8, pdl=bufs.pdl)
    project(bufs.h, layer.gate_up, bufs.gate_up, None, h_q8, **bufs.gemv_options)
    silu_mul(bufs.gate_up, bufs.act, act_q8, pdl=bufs.pdl)  # the quantized copy from the same launch
    project(bufs.act, [layer.ffn_down], bufs.x, None, act_q8, accumulate=True, **bufs.gemv_options)


def project(x: torch.Tensor, matrices: list[QuantWeight], out: torch.Tensor, bias: torch.Tensor | None,
             xq: QuantizedActivations | None = None, accumulate: bool = False, pdl: bool = False,
             shapes: GemvShapes | None = None, prefetch: bool = False) -> None:
    """out (+)= x @ [W0|W1|...]^T + bias: one launch per run of same-typed matrices (Q4_K_M keeps some V in
    Q6_K); with `accumulate` the product is added to out (the residual add, fused). Matrices of the integer-dot
    kernels' types (Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0) take the quantized activations `xq` when given, at the
    launch shapes tuned at load (`shapes`, runner/gemv_tuning; None: the kernel's defaults). With `pdl` and
    `prefetch`, the GEMVs ask L2 for their weight rows before their PDL wait.

    Each part writes a column slice of `out` (row stride > width when B > 1; the launcher takes row strides).
    """
    start = 0
    for w in matrices:
        end = start + w.n_rows
        part_bias = None if bias is None else bias[start:end]
        batch = x.shape[0]
        if xq is not None and w.ggml_type in INT8_ACTIVATION_TYPES:
            form = "16bit" if xq.wide else "int8"
            launch = shapes.launch_args(w, form, batch) if shapes is not None else {}
            quant_matvec_q8(xq, w, out[:, start:end], bias=part_bias, accumulate=accumulate, pdl=pdl,
                            prefetch=prefetch, **launch)
        elif batch <= MAX_QUANTIZED_BATCH and x.dtype == torch.float32 and supports_float_matvec(w):
            launch = shapes.launch_args(w, "f32", batch) if shapes is not None else {}
            float_matvec(x, w, out[:, start:end], bias=part_bias, accumulate=accumulate, pdl=pdl,
                         prefetch=prefetch, **launch)
        else:
            quant_matvec(x, w, out[:, start:end], bias=part_bias, accumulate=accumulate, pdl=pdl)
        start = end
