"""Tiny random models for the model tests: a Hugging Face transformers model (the independent implementation)
and the same weights written as an F32 GGUF file the way llama.cpp's converter lays them out.

Helpers are exposed as fixtures so the test modules need no import path tricks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from replayllm.models import ModelConfig, ReferenceModel, get_architecture

VOCAB = 96
CONTEXT = 256


@dataclass(frozen=True)
class TinySpec:
    arch: str = "llama"  # "llama" | "qwen2" | "qwen3"
    tied: bool = True
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # None: hidden / heads; qwen3 may set another width
    hidden: int = 64
    ffn: int = 128
    layers: int = 2
    theta: float = 10000.0
    rope: str = "default"  # "default" | "linear" | "llama3_tensor" (rope_freqs.weight) | "llama3_metadata"
    seed: int = 0


# llama3 scaling parameters chosen so that, with head width 16, frequencies fall in all three bands
LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
LINEAR_FACTOR = 2.5


def _hf_config(spec: TinySpec):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    rope = {"rope_type": "default", "rope_theta": spec.theta}
    if spec.rope == "linear":
        rope = {"rope_type": "linear", "rope_theta": spec.theta, "factor": LINEAR_FACTOR}
    elif spec.rope.startswith("llama3"):
        rope = {"rope_type": "llama3", "rope_theta": spec.theta, **LLAMA3}
    common = dict(vocab_size=VOCAB, hidden_size=spec.hidden, intermediate_size=spec.ffn,
                  num_hidden_layers=spec.layers, num_attention_heads=spec.num_heads,
                  num_key_value_heads=spec.num_kv_heads, max_position_embeddings=CONTEXT, rms_norm_eps=1e-5,
                  rope_parameters=rope, tie_word_embeddings=spec.tied, attn_implementation="eager")
    if spec.arch == "llama":
        return LlamaConfig(**common, attention_bias=False, mlp_bias=False)
    if spec.arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    head_dim = spec.head_dim or spec.hidden // spec.num_heads
    return Qwen3Config(**common, head_dim=head_dim, attention_bias=False, use_sliding_window=False)


def build_hf_model(spec: TinySpec):
    """A transformers model with large random weights, so attention is sharp and every detail shows."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(_hf_config(spec)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(torch.randn_like(p))
            else:
                scale = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
                p.copy_(scale * torch.randn_like(p) / math.sqrt(p.shape[1]))
    return model


def permute_for_gguf(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter layout for Q/K rows: within each head, output row 2i + j is input row
    j * (head_dim / 2) + i, so rotating adjacent pairs equals transformers' half-split rotation."""
    rows, cols = w.shape
    head_dim = rows // num_heads
    return w.reshape(num_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def llama3_rope_freqs(spec: TinySpec, head_dim: int) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter writes it: the wavelength multiplier per frequency."""
    factors = []
    for i in range(head_dim // 2):
        freq = 1.0 / spec.theta ** (2 * i / head_dim)
        wavelength = 2 * math.pi / freq
        old = LLAMA3["original_max_position_embeddings"]
        low, high, factor = LLAMA3["low_freq_factor"], LLAMA3["high_freq_factor"], LLAMA3["factor"]
        if wavelength < old / high:
            factors.append(1.0)
        elif wavelength > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def gguf_tensors(hf_model, spec: TinySpec, permute_qk: bool = True) -> dict[str, np.ndarray]:
    """The transformers weights under their GGUF names, in numpy order (out, in)."""
    state = {k: v.detach().numpy().astype(np.float32) for k, v in hf_model.state_dict().items()}
    out = {"token_embd.weight": state["model.embed_tokens.weight"],
           "output_norm.weight": state["model.norm.weight"]}
    if not spec.tied:
        out["output.weight"] = state["lm_head.weight"]
    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
             "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
             "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for i in range(spec.layers):
        for hf_name, gguf_name in names.items():
            key = f"model.layers.{i}.{hf_name}"
            if key in state:
                out[f"blk.{i}.{gguf_name}"] = state[key]
        if spec.arch == "llama" and permute_qk:
            out[f"blk.{i}.attn_q.weight"] = permute_for_gguf(out[f"blk.{i}.attn_q.weight"], spec.num_heads)
            out[f"blk.{i}.attn_k.weight"] = permute_for_gguf(out[f"blk.{i}.attn_k.weight"], spec.num_kv_heads)
    if spec.rope == "llama3_tensor":
        out["rope_freqs.weight"] = llama3_rope_freqs(spec, spec.head_dim or spec.hidden // spec.num_heads)
    return out


def gguf_metadata(spec: TinySpec) -> dict:
    a = spec.arch
    md = {f"{a}.block_count": spec.layers, f"{a}.context_length": CONTEXT, f"{a}.embedding_length": spec.hidden,
          f"{a}.feed_forward_length": spec.ffn, f"{a}.attention.head_count": spec.num_heads,
          f"{a}.attention.head_count_kv": spec.num_kv_heads, f"{a}.attention.layer_norm_rms_epsilon": 1e-5,
          f"{a}.rope.freq_base": spec.theta, "tokenizer.ggml.model": "gpt2",
          "tokenizer.ggml.tokens": [f"t{i}" for i in range(VOCAB)], "tokenizer.ggml.bos_token_id": 1,
          "tokenizer.ggml.eos_token_id": 2}
    if spec.head_dim is not None:
        md[f"{a}.attention.key_length"] = spec.head_dim
        md[f"{a}.attention.value_length"] = spec.head_dim
    if spec.rope == "linear":
        md |= {f"{a}.rope.scaling.type": "linear", f"{a}.rope.scaling.factor": LINEAR_FACTOR}
    elif spec.rope == "llama3_metadata":
        md |= {f"{a}.rope.scaling.type": "llama3", f"{a}.rope.scaling.factor": LLAMA3["factor"],
               f"{a}.rope.scaling.original_context_length": LLAMA3["original_max_position_embeddings"],
               f"{a}.rope.scaling.low_freq_factor": LLAMA3["low_freq_factor"],
               f"{a}.rope.scaling.high_freq_factor": LLAMA3["high_freq_factor"]}
    return md


def write_gguf(path: Path, arch: str, metadata: dict, tensors: dict[str, np.ndarray]) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, array in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@dataclass
class GGUFContents:
    metadata: dict
    shapes: dict[str, tuple[int, ...]]  # GGUF order
    arrays: dict[str, np.ndarray]  # numpy order
    loaded: list[str] = field(default_factory=list)

    def load_weight(self, name: str) -> torch.Tensor:
        self.loaded.append(name)
        return torch.from_numpy(self.arrays[name].copy())


def read_gguf(path: Path) -> GGUFContents:
    import gguf

    reader = gguf.GGUFReader(str(path))
    metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    arrays = {t.name: np.array(t.data, dtype=np.float32).reshape(tuple(reversed(shapes[t.name])))
              for t in reader.tensors}
    return GGUFContents(metadata, shapes, arrays)


@dataclass
class TinyModel:
    spec: TinySpec
    hf: object  # the transformers model
    contents: GGUFContents
    config: ModelConfig
    model: ReferenceModel

    def hf_logits(self, tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.hf(torch.tensor([tokens])).logits[0].float()  # [T, V]


@pytest.fixture
def tiny_model(tmp_path):
    """tiny_model(spec, permute_qk=True) -> TinyModel built from a GGUF file written and read back."""

    def make(spec: TinySpec, permute_qk: bool = True) -> TinyModel:
        hf = build_hf_model(spec)
        path = tmp_path / f"{spec.arch}-{spec.rope}-{spec.seed}.gguf"
        write_gguf(path, spec.arch, gguf_metadata(spec), gguf_tensors(hf, spec, permute_qk))
        contents = read_gguf(path)
        config = ModelConfig.from_metadata(contents.metadata, contents.shapes, str(path))
        model = get_architecture(config.architecture).build_reference(config, contents.load_weight)
        return TinyModel(spec, hf, contents, config, model)

    return make


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.fixture
def rel_err():
    return relative_error


@pytest.fixture
def tiny_spec():
    return TinySpec
