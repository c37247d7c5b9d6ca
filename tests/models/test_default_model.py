"""The reference forward on the real default model (SmolLM2-135M-Instruct, Q4_1) against transformers' Llama
holding the same dequantized weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from replayllm.models import ModelConfig, get_architecture

TOKENS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2]


def unpermute_from_gguf(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: GGUF row 2i + j of a head is transformers' row j * (head_dim / 2) + i."""
    rows, cols = w.shape
    return w.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


@pytest.mark.slow
def test_default_model_matches_transformers(default_model_path, rel_err):
    import gguf
    from gguf.quants import dequantize
    from transformers import LlamaConfig, LlamaForCausalLM

    reader = gguf.GGUFReader(str(default_model_path))
    metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    tensors = {t.name: t for t in reader.tensors}

    def load_weight(name: str) -> torch.Tensor:
        t = tensors[name]
        values = dequantize(t.data, t.tensor_type).astype(np.float32)
        return torch.from_numpy(values.reshape(tuple(reversed(shapes[name]))))

    config = ModelConfig.from_metadata(metadata, shapes, str(default_model_path))
    assert (config.architecture, config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
            config.vocab_size, config.tied_embeddings) == ("llama", 30, 576, 9, 3, 49152, True)
    model = get_architecture("llama").build_reference(config, load_weight)

    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        max_position_embeddings=config.max_context_tokens, tie_word_embeddings=True,
        attn_implementation="eager")).eval()
    state = {"model.embed_tokens.weight": model.token_embd, "model.norm.weight": model.output_norm}
    for i, block in enumerate(model.blocks):
        p, attn = f"model.layers.{i}.", block.attention
        state |= {p + "input_layernorm.weight": block.attn_norm,
                  p + "post_attention_layernorm.weight": block.ffn_norm,
                  p + "self_attn.q_proj.weight": torch.from_numpy(unpermute_from_gguf(attn.w_q.numpy(), 9)),
                  p + "self_attn.k_proj.weight": torch.from_numpy(unpermute_from_gguf(attn.w_k.numpy(), 3)),
                  p + "self_attn.v_proj.weight": attn.w_v, p + "self_attn.o_proj.weight": attn.w_output,
                  p + "mlp.gate_proj.weight": block.mlp.gate, p + "mlp.up_proj.weight": block.mlp.up,
                  p + "mlp.down_proj.weight": block.mlp.down}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: lm_head is embed_tokens
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        expected = hf(torch.tensor([TOKENS])).logits[0]
        logits = model(torch.tensor(TOKENS), 0, model.new_kv_cache(len(TOKENS)))
    assert rel_err(logits, expected) < 1e-4
    assert torch.equal(logits.argmax(dim=-1), expected.argmax(dim=-1))
