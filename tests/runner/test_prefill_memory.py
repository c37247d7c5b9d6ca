"""Prefill's activation memory: the pool whose two regions a chunk's GEMM inputs and outputs share, and
`prefill_peak_bytes`, the estimate the engine sizes the prefill chunk with (pure arithmetic, so checked here
against hand-counted numbers; tests/engine/test_gpu_backend.py checks it against torch's counter on a GPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from replayllm.models import ModelConfig
from replayllm.runner.prefill import ACT_DTYPE, ActivationPool, PoolLayout, _ChunkBuffers, prefill_peak_bytes

LLAMA2_7B = ModelConfig(
    architecture="llama", num_layers=32, hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32,
    head_dim=128, vocab_size=32000, max_context_tokens=4096, rms_norm_eps=1e-5, rope_theta=10000.0, rope_dim=128,
    rope_neox=False, rope_scaling=None, has_qkv_bias=False, has_qk_norm=False, tied_embeddings=False)
PAGES_7B = 257  # a 4096-token context plus a multi-step graph's 16 tokens of slack, in pages of 16


def test_llama2_7b_costs_what_its_buffers_add_up_to():
    # Per token: x 4096 f32 (16384) + position and page-table row ((1 + 257) int32: 1032) + the pool's inputs
    # region (act, 11008 f16: 22016, larger than h or attn, 4096 f32) and outputs region (gate_up, 22016 f32:
    # 88064) + the largest transient, gate_up's (or qkv's) on dequant_gemm: h copied to f16 (8192) and a slice of
    # 8192 weight rows (64 MiB of scratch over 4096 columns) times the tokens in f16 (16384). All f32 buffers
    # live at once, as before the pool, would have been 230400 + the down projection's f16 input copy.
    per_token = 16384 + 1032 + 22016 + 88064 + 8192 + 16384
    logits = 2 * 4 * 32000  # the last position's, this chunk's and the previous one's
    assert PoolLayout.for_model(LLAMA2_7B) == PoolLayout(input_bytes=22016, output_bytes=88064)
    for chunk in (2048, 512):
        assert prefill_peak_bytes(LLAMA2_7B, chunk, PAGES_7B) == chunk * per_token + logits


def test_qk_norm_and_f16_weights_raise_the_estimate_by_their_transients():
    base = prefill_peak_bytes(LLAMA2_7B, 1024, PAGES_7B)
    # qwen3-style head norms: contiguous f32 copies of q and k (8192 values) alive through the o projection
    # (attn copied to f16: 8192 bytes, product 8192), above the MLP's 24576
    qk_norm = prefill_peak_bytes(dataclasses.replace(LLAMA2_7B, has_qk_norm=True), 1024, PAGES_7B)
    assert qk_norm - base == 1024 * (4 * 8192 + 8192 + 8192 - 24576)
    # F16 matrices are multiplied whole: gate_up's product is 22016 f16 wide instead of one 8192-row slice
    assert prefill_peak_bytes(LLAMA2_7B, 1024, PAGES_7B, f16_weights=True) - base == 1024 * 2 * (22016 - 8192)


def test_the_pool_is_smaller_than_a_pass_and_its_regions_never_overlap():
    layout = PoolLayout.for_model(LLAMA2_7B)
    assert layout.output_offset(7) >= 7 * layout.input_bytes and layout.output_offset(7) % 256 == 0
    assert layout.nbytes(2048) < prefill_peak_bytes(LLAMA2_7B, 2048, PAGES_7B)  # the tuning times in one pool


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


@pytest.mark.parametrize("tokens", [1, 7])
def test_chunk_buffers_alias_only_what_is_never_live_at_once(tokens):
    cfg = dataclasses.replace(LLAMA2_7B, num_layers=1, hidden_size=64, intermediate_size=176, num_heads=4,
                              num_kv_heads=2, head_dim=16, rope_dim=16)
    bufs = _ChunkBuffers.allocate(cfg, torch.arange(5, 5 + tokens, dtype=torch.int32),
                                  torch.zeros(3, dtype=torch.int32))
    assert bufs.act.dtype == ACT_DTYPE and bufs.h.dtype == bufs.attn.dtype == bufs.qkv.dtype == torch.float32
    assert bufs.positions.tolist() == list(range(5, 5 + tokens)) and bufs.page_table.shape == (tokens, 3)
    # inputs share one start, outputs another, in one allocation
    assert bufs.h.data_ptr() == bufs.attn.data_ptr() == bufs.act.data_ptr()
    assert bufs.qkv.data_ptr() == bufs.gate_up.data_ptr()
    assert bufs.h.untyped_storage().data_ptr() == bufs.qkv.untyped_storage().data_ptr()
    # what a block reads while writing another buffer never shares its bytes
    live_together = [("h", "qkv"), ("qkv", "attn"), ("h", "gate_up"), ("gate_up", "act")]
    live_together += [("x", name) for name in ("h", "qkv", "attn", "gate_up", "act")]
    for a, b in live_together:
        assert not _overlap(getattr(bufs, a), getattr(bufs, b)), (a, b)


def test_a_view_larger_than_its_region_is_refused():
    pool = ActivationPool(LLAMA2_7B, 2, torch.device("cpu"))
    assert pool.storage.numel() == PoolLayout.for_model(LLAMA2_7B).nbytes(2)
    assert pool.gemm_input((2, 11008), torch.float16).shape == (2, 11008)
    with pytest.raises(ValueError, match="activation pool"):
        pool.gemm_input((2, 11008), torch.float32)
    with pytest.raises(ValueError, match="activation pool"):
        pool.gemm_output((3, 22016))
