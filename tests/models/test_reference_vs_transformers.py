"""The reference forward against Hugging Face transformers holding the same weights, read from a GGUF file."""

from __future__ import annotations

import pytest
import torch

TOKENS = [5, 17, 90, 3, 3, 42, 61, 8, 77, 12, 30, 95, 0, 54]

CASES = {
    "llama-tied-gqa": dict(arch="llama", tied=True, num_heads=4, num_kv_heads=2),
    "llama-separate-output-mha": dict(arch="llama", tied=False, num_heads=4, num_kv_heads=4),
    "llama-multi-query": dict(arch="llama", tied=False, num_heads=4, num_kv_heads=1),
    "llama3-rope-freqs-tensor": dict(arch="llama", tied=False, rope="llama3_tensor", theta=10000.0),
    "llama3-rope-metadata": dict(arch="llama", tied=False, rope="llama3_metadata"),
    "llama-linear-rope": dict(arch="llama", rope="linear"),
    "qwen2-bias-gqa": dict(arch="qwen2", tied=True),
    "qwen2-bias-separate-output": dict(arch="qwen2", tied=False, num_kv_heads=4),
    "qwen3-qk-norm": dict(arch="qwen3", tied=True),
    "qwen3-wide-heads-separate-output": dict(arch="qwen3", tied=False, head_dim=32),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_logits_match_transformers(case, tiny_model, tiny_spec, rel_err):
    tiny = tiny_model(tiny_spec(**case))
    cache = tiny.model.new_kv_cache(len(TOKENS))
    with torch.no_grad():
        logits = tiny.model(torch.tensor(TOKENS), 0, cache)
    expected = tiny.hf_logits(TOKENS)
    assert logits.shape == expected.shape == (len(TOKENS), tiny.config.vocab_size)
    assert logits.dtype == torch.float32
    assert rel_err(logits, expected) < 1e-5  # observed ~1e-7; a wrong detail gives > 1e-2


def test_each_tensor_loaded_once_and_tied_head_shares_embedding(tiny_model, tiny_spec):
    tiny = tiny_model(tiny_spec(arch="llama", tied=True))
    assert sorted(tiny.contents.loaded) == sorted(tiny.contents.shapes)
    assert tiny.config.tied_embeddings and tiny.model.output is None


def test_config_read_from_file(tiny_model, tiny_spec):
    tiny = tiny_model(tiny_spec(arch="qwen3", tied=False, head_dim=32, num_heads=4, num_kv_heads=2))
    c = tiny.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.intermediate_size) == ("qwen3", 2, 64, 128)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.rope_dim, c.vocab_size) == (4, 2, 32, 32, 96)
    assert c.rope_neox and c.has_qk_norm and not c.has_qkv_bias and not c.tied_embeddings
    assert c.max_context_tokens == 256 and c.rope_theta == 10000.0
    assert c.rms_norm_eps == pytest.approx(1e-5, rel=1e-6)


@pytest.mark.parametrize("rope", ["default", "llama3_tensor"])
def test_the_comparison_detects_a_missing_qk_permutation(rope, tiny_model, tiny_spec, rel_err):
    """Control: with Q/K rows left in transformers' order, the llama model must disagree far beyond the
    tolerance, so the tolerance above is tight enough to see RoPE pairing (and the llama3 frequencies)."""
    tiny = tiny_model(tiny_spec(arch="llama", rope=rope), permute_qk=False)
    with torch.no_grad():
        logits = tiny.model(torch.tensor(TOKENS), 0, tiny.model.new_kv_cache(len(TOKENS)))
    assert rel_err(logits, tiny.hf_logits(TOKENS)) > 1e-2


def test_the_comparison_detects_missing_llama3_scaling(tiny_model, tiny_spec, rel_err):
    """Control: the same weights without rope_freqs.weight must disagree with the llama3-scaled model."""
    scaled = tiny_model(tiny_spec(arch="llama", rope="llama3_tensor"))
    plain = tiny_model(tiny_spec(arch="llama", rope="default"))
    assert torch.equal(scaled.model.token_embd, plain.model.token_embd)  # same seed, same weights
    with torch.no_grad():
        logits = plain.model(torch.tensor(TOKENS), 0, plain.model.new_kv_cache(len(TOKENS)))
    assert rel_err(logits, scaled.hf_logits(TOKENS)) > 1e-3
