"""Real models' hyperparameters and the tensors a GGUF of that shape holds.

The numbers are the published configurations of the models named; only the weights are made up.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidParameterError
from .vocab import VocabSpec

_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def _llama3_control_tokens() -> tuple[str, ...]:
    """Ids 128000..128255 of the Llama 3 vocabulary: the named tokens at their real ids, the rest
    `<|reserved_special_token_N|>` numbered in order."""
    named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>",
             9: "<|eot_id|>"}
    tokens, reserved = [], 0
    for offset in range(256):
        if offset in named:
            tokens.append(named[offset])
        else:
            tokens.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return tuple(tokens)


_SPM_LLAMA2 = VocabSpec(model="llama", pre="default", num_regular_tokens=32000)
_BPE_LLAMA3 = VocabSpec(model="gpt2", pre="llama-bpe", num_regular_tokens=128000,
                        control_tokens=_llama3_control_tokens(), bos_token="<|begin_of_text|>",
                        eos_token="<|end_of_text|>", add_bos_token=True, chat_template=_LLAMA3_TEMPLATE)
# Qwen2's tokenizer has 151643 regular tokens and 3 control tokens; the embedding has 152064 rows,
# and the rest of the vocab is padding.
_BPE_QWEN2 = VocabSpec(model="gpt2", pre="qwen2", num_regular_tokens=151643,
                       control_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), bos_token="<|endoftext|>",
                       eos_token="<|endoftext|>", add_bos_token=False, chat_template=_CHATML_TEMPLATE)
# The tiny test model tokenizes like the default model (SmolLM2: gpt2 BPE, pre-tokenizer `smollm`,
# ChatML), so the whole text pipeline runs on it unchanged.
_BPE_TINY = VocabSpec(model="gpt2", pre="smollm", num_regular_tokens=381,
                      control_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), bos_token="<|im_start|>",
                      eos_token="<|im_end|>", add_bos_token=False, chat_template=_CHATML_TEMPLATE)


@dataclass(frozen=True)
class ModelShape:
    """A llama-family decoder's hyperparameters, validated."""

    name: str
    arch: str  # general.architecture: "llama" or "qwen2"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_size: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rms_norm_eps: float
    vocab: VocabSpec
    has_qkv_bias: bool = False

    def __post_init__(self):
        if self.arch not in ("llama", "qwen2"):
            raise InvalidParameterError(f"{self.name}: architecture {self.arch!r} is not supported; use llama or qwen2")
        for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_size", "vocab_size",
                      "context_length"):
            if getattr(self, field) <= 0:
                raise InvalidParameterError(f"{self.name}: {field} must be positive, got {getattr(self, field)}")
        if self.hidden_size % self.num_heads:
            raise InvalidParameterError(f"{self.name}: hidden_size {self.hidden_size} is not a multiple of "
                                        f"num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise InvalidParameterError(f"{self.name}: num_heads {self.num_heads} is not a multiple of "
                                        f"num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise InvalidParameterError(f"{self.name}: head_dim {self.head_dim} must be even for RoPE")
        if self.vocab_size < self.vocab.min_vocab_size:
            raise InvalidParameterError(f"{self.name}: vocab_size {self.vocab_size} is smaller than the "
                                        f"{self.vocab.min_vocab_size} tokens of its tokenizer")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise InvalidParameterError(f"{self.name}: rope_theta and rms_norm_eps must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the file. `numpy_shape` is (out_features, in_features) for a matrix, the reverse
    of the GGUF dimension order; rows are quantized along `in_features`."""

    name: str
    numpy_shape: tuple[int, ...]
    layer: int | None  # blk.N index, None outside the blocks

    @property
    def is_matrix(self) -> bool:
        return len(self.numpy_shape) == 2

    @property
    def is_norm(self) -> bool:
        return self.name.endswith("_norm.weight")


def tensor_specs(shape: ModelShape) -> list[TensorSpec]:
    """Every tensor, in the order llama.cpp's converter writes them."""
    h, kv, ffn = shape.hidden_size, shape.kv_dim, shape.ffn_size
    specs = [TensorSpec("token_embd.weight", (shape.vocab_size, h), None)]
    for i in range(shape.num_layers):
        block = [("attn_norm.weight", (h,)), ("attn_q.weight", (h, h)), ("attn_k.weight", (kv, h)),
                 ("attn_v.weight", (kv, h))]
        if shape.has_qkv_bias:
            block += [("attn_q.bias", (h,)), ("attn_k.bias", (kv,)), ("attn_v.bias", (kv,))]
        block += [("attn_output.weight", (h, h)), ("ffn_norm.weight", (h,)), ("ffn_gate.weight", (ffn, h)),
                  ("ffn_up.weight", (ffn, h)), ("ffn_down.weight", (h, ffn))]
        specs += [TensorSpec(f"blk.{i}.{name}", dims, i) for name, dims in block]
    specs.append(TensorSpec("output_norm.weight", (h,), None))
    specs.append(TensorSpec("output.weight", (shape.vocab_size, h), None))
    return specs


def _llama2(name: str, hidden: int, layers: int, heads: int, ffn: int) -> ModelShape:
    return ModelShape(name=name, arch="llama", hidden_size=hidden, num_layers=layers, num_heads=heads,
                      num_kv_heads=heads, ffn_size=ffn, vocab_size=32000, context_length=4096, rope_theta=10000.0,
                      rms_norm_eps=1e-5, vocab=_SPM_LLAMA2)


SHAPES: dict[str, ModelShape] = {
    # K-quant rows are 256 wide, so hidden and ffn are multiples of 256: q4_k_m then gives the real mix.
    "tiny": ModelShape(name="tiny", arch="llama", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                       ffn_size=768, vocab_size=384, context_length=256, rope_theta=10000.0, rms_norm_eps=1e-5,
                       vocab=_BPE_TINY),
    "llama2-7b": _llama2("llama2-7b", hidden=4096, layers=32, heads=32, ffn=11008),
    "llama2-13b": _llama2("llama2-13b", hidden=5120, layers=40, heads=40, ffn=13824),
    "llama3-8b": ModelShape(name="llama3-8b", arch="llama", hidden_size=4096, num_layers=32, num_heads=32,
                            num_kv_heads=8, ffn_size=14336, vocab_size=128256, context_length=8192,
                            rope_theta=500000.0, rms_norm_eps=1e-5, vocab=_BPE_LLAMA3),
    "qwen2-7b": ModelShape(name="qwen2-7b", arch="qwen2", hidden_size=3584, num_layers=28, num_heads=28,
                           num_kv_heads=4, ffn_size=18944, vocab_size=152064, context_length=32768,
                           rope_theta=1000000.0, rms_norm_eps=1e-6, vocab=_BPE_QWEN2, has_qkv_bias=True),
}


def get_shape(name: str) -> ModelShape:
    try:
        return SHAPES[name]
    except KeyError:
        raise InvalidParameterError(f"unknown shape {name!r}; choose one of: {', '.join(SHAPES)}") from None
