"""ModelConfig.from_metadata: hyperparameters read from GGUF metadata, and every way a file can be rejected."""

from __future__ import annotations

import pytest

from replayllm.errors import GGUFError, InvalidParameterError, UnsupportedError
from replayllm.models import ModelConfig, RopeScaling

SOURCE = "model.gguf"
D, F, H, HKV, DH, V, L = 64, 128, 4, 2, 16, 10, 2


def llama_file(arch: str = "llama") -> tuple[dict, dict]:
    """Metadata and GGUF-order tensor shapes of a valid small model, written out by hand."""
    a = arch
    metadata = {"general.architecture": a, f"{a}.block_count": L, f"{a}.context_length": 2048,
                f"{a}.embedding_length": D, f"{a}.feed_forward_length": F, f"{a}.attention.head_count": H,
                f"{a}.attention.head_count_kv": HKV, f"{a}.attention.layer_norm_rms_epsilon": 1e-6,
                f"{a}.rope.freq_base": 500000.0, f"{a}.vocab_size": V,
                "tokenizer.ggml.tokens": [f"t{i}" for i in range(V)], "tokenizer.ggml.bos_token_id": 1,
                "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 9}
    shapes = {"token_embd.weight": (D, V), "output_norm.weight": (D,), "output.weight": (D, V)}
    for i in range(L):
        shapes |= {f"blk.{i}.attn_norm.weight": (D,), f"blk.{i}.attn_q.weight": (D, H * DH),
                   f"blk.{i}.attn_k.weight": (D, HKV * DH), f"blk.{i}.attn_v.weight": (D, HKV * DH),
                   f"blk.{i}.attn_output.weight": (H * DH, D), f"blk.{i}.ffn_norm.weight": (D,),
                   f"blk.{i}.ffn_gate.weight": (D, F), f"blk.{i}.ffn_up.weight": (D, F),
                   f"blk.{i}.ffn_down.weight": (F, D)}
        if arch == "qwen2":
            shapes |= {f"blk.{i}.attn_q.bias": (H * DH,), f"blk.{i}.attn_k.bias": (HKV * DH,),
                       f"blk.{i}.attn_v.bias": (HKV * DH,)}
        if arch == "qwen3":
            shapes |= {f"blk.{i}.attn_q_norm.weight": (DH,), f"blk.{i}.attn_k_norm.weight": (DH,)}
    return metadata, shapes


def rejected(metadata: dict, shapes: dict) -> GGUFError:
    with pytest.raises(GGUFError) as info:
        ModelConfig.from_metadata(metadata, shapes, SOURCE)
    assert info.value.path == SOURCE and str(info.value).startswith(f"{SOURCE}: {info.value.field}: ")
    return info.value


def test_valid_llama_file():
    c = ModelConfig.from_metadata(*llama_file(), SOURCE)
    assert c == ModelConfig(
        architecture="llama", num_layers=L, hidden_size=D, intermediate_size=F, num_heads=H, num_kv_heads=HKV,
        head_dim=DH, vocab_size=V, max_context_tokens=2048, rms_norm_eps=1e-6,
        rope_theta=500000.0, rope_dim=DH, rope_neox=False, rope_scaling=None, has_qkv_bias=False,
        has_qk_norm=False, tied_embeddings=False, has_rope_freqs=False)


@pytest.mark.parametrize("arch,neox,bias,qk_norm", [("qwen2", True, True, False), ("qwen3", True, False, True)])
def test_architecture_traits(arch, neox, bias, qk_norm):
    c = ModelConfig.from_metadata(*llama_file(arch), SOURCE)
    assert (c.architecture, c.rope_neox, c.has_qkv_bias, c.has_qk_norm) == (arch, neox, bias, qk_norm)


def test_defaults_and_tied_embeddings():
    metadata, shapes = llama_file()
    for key in ("llama.attention.head_count_kv", "llama.rope.freq_base", "llama.vocab_size",
                "tokenizer.ggml.tokens"):
        del metadata[key]
    del shapes["output.weight"]
    shapes |= {f"blk.{i}.attn_{x}.weight": (D, H * DH) for i in range(L) for x in "kv"}  # MHA: kv = heads
    c = ModelConfig.from_metadata(metadata, shapes, SOURCE)
    assert (c.num_kv_heads, c.rope_theta, c.rope_dim, c.vocab_size) == (H, 10000.0, DH, V)
    assert c.tied_embeddings


def test_key_length_allows_heads_that_do_not_divide_the_width():
    metadata, shapes = llama_file("qwen3")
    metadata |= {"qwen3.attention.head_count": 3, "qwen3.attention.head_count_kv": 1,
                 "qwen3.attention.key_length": 32, "qwen3.attention.value_length": 32}
    for i in range(L):
        shapes |= {f"blk.{i}.attn_q.weight": (D, 96), f"blk.{i}.attn_k.weight": (D, 32),
                   f"blk.{i}.attn_v.weight": (D, 32), f"blk.{i}.attn_output.weight": (96, D),
                   f"blk.{i}.attn_q_norm.weight": (32,), f"blk.{i}.attn_k_norm.weight": (32,)}
    c = ModelConfig.from_metadata(metadata, shapes, SOURCE)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.rope_dim) == (3, 1, 32, 32)


REQUIRED = ["general.architecture", "llama.block_count", "llama.context_length", "llama.embedding_length",
            "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.layer_norm_rms_epsilon"]


@pytest.mark.parametrize("key", REQUIRED)
def test_missing_required_key(key):
    metadata, shapes = llama_file()
    del metadata[key]
    error = rejected(metadata, shapes)
    assert error.field == key and "missing" in error.reason


@pytest.mark.parametrize("key,value,reason", [
    ("general.architecture", 7, "expected a string"),
    ("llama.block_count", "2", "expected an integer"),
    ("llama.block_count", 2.0, "expected an integer"),
    ("llama.block_count", True, "expected an integer"),
    ("llama.attention.head_count_kv", [2, 2], "expected an integer"),
    ("llama.attention.layer_norm_rms_epsilon", "1e-6", "expected a number"),
    ("llama.rope.freq_base", None, "expected a number"),
    ("tokenizer.ggml.tokens", "abc", "expected a list"),
    ("tokenizer.ggml.bos_token_id", "1", "expected an integer"),
])
def test_wrong_type(key, value, reason):
    metadata, shapes = llama_file()
    metadata[key] = value
    error = rejected(metadata, shapes)
    assert error.field == key and reason in error.reason


@pytest.mark.parametrize("key,value", [
    ("llama.block_count", 0), ("llama.embedding_length", -64), ("llama.feed_forward_length", 0),
    ("llama.attention.head_count", 0), ("llama.attention.head_count_kv", 0), ("llama.context_length", 0),
    ("llama.attention.layer_norm_rms_epsilon", 0.0), ("llama.attention.layer_norm_rms_epsilon", -1e-6),
    ("llama.attention.layer_norm_rms_epsilon", float("nan")), ("llama.rope.freq_base", 0.0),
    ("llama.rope.freq_base", float("inf")), ("llama.rope.dimension_count", 0), ("llama.vocab_size", 0),
])
def test_non_positive_values(key, value):
    metadata, shapes = llama_file()
    metadata[key] = value
    error = rejected(metadata, shapes)
    assert error.field == key and "positive" in error.reason


def test_heads_must_divide_the_width_without_key_length():
    metadata, shapes = llama_file()
    metadata["llama.attention.head_count"] = 5
    metadata["llama.attention.head_count_kv"] = 5
    error = rejected(metadata, shapes)
    assert error.field == "llama.attention.head_count" and "do not divide" in error.reason


def test_kv_heads_must_divide_heads():
    metadata, shapes = llama_file()
    metadata["llama.attention.head_count_kv"] = 3
    error = rejected(metadata, shapes)
    assert error.field == "llama.attention.head_count_kv" and "3 key/value heads" in error.reason


@pytest.mark.parametrize("rope_dim", [15, 32])
def test_rope_dimension_must_be_even_and_fit_the_head(rope_dim):
    metadata, shapes = llama_file()
    metadata["llama.rope.dimension_count"] = rope_dim
    assert rejected(metadata, shapes).field == "llama.rope.dimension_count"


def test_absurd_context_length():
    metadata, shapes = llama_file()
    metadata["llama.context_length"] = 2**24 + 1
    error = rejected(metadata, shapes)
    assert error.field == "llama.context_length" and "corrupt" in error.reason
    metadata["llama.context_length"] = 2**24
    assert ModelConfig.from_metadata(metadata, shapes, SOURCE).max_context_tokens == 2**24


def test_vocab_sources_must_agree():
    metadata, shapes = llama_file()
    metadata["tokenizer.ggml.tokens"] = metadata["tokenizer.ggml.tokens"][:-1]
    error = rejected(metadata, shapes)
    assert error.field == "tokenizer.ggml.tokens" and "9 disagrees with llama.vocab_size (10)" in error.reason

    metadata, shapes = llama_file()
    metadata["llama.vocab_size"] = 11
    assert rejected(metadata, shapes).field == "tokenizer.ggml.tokens"

    metadata, shapes = llama_file()
    shapes["token_embd.weight"] = (D, 12)
    error = rejected(metadata, shapes)
    assert error.field == "token_embd.weight" and "12" in error.reason


@pytest.mark.parametrize("name", ["bos", "eos", "eot", "unknown", "padding"])
def test_special_token_ids_must_be_in_the_vocabulary(name):
    metadata, shapes = llama_file()
    metadata[f"tokenizer.ggml.{name}_token_id"] = V
    error = rejected(metadata, shapes)
    assert error.field == f"tokenizer.ggml.{name}_token_id" and "outside the vocabulary (0..9)" in error.reason


@pytest.mark.parametrize("arch,name", [
    ("llama", "token_embd.weight"), ("llama", "output_norm.weight"), ("llama", "blk.1.ffn_up.weight"),
    ("llama", "blk.0.attn_k.weight"), ("qwen2", "blk.1.attn_v.bias"), ("qwen3", "blk.0.attn_k_norm.weight"),
])
def test_missing_tensor(arch, name):
    metadata, shapes = llama_file(arch)
    del shapes[name]
    error = rejected(metadata, shapes)
    assert error.field == name and "missing" in error.reason


@pytest.mark.parametrize("arch,name,bad", [
    ("llama", "blk.0.attn_k.weight", (D, H * DH)), ("llama", "blk.1.ffn_down.weight", (D, F)),
    ("llama", "output.weight", (D, V, 1)), ("llama", "blk.0.attn_norm.weight", (D + 1,)),
    ("qwen2", "blk.0.attn_q.bias", (HKV * DH,)), ("qwen3", "blk.1.attn_q_norm.weight", (D,)),
])
def test_tensor_with_wrong_shape(arch, name, bad):
    metadata, shapes = llama_file(arch)
    expected = shapes[name]
    shapes[name] = bad
    error = rejected(metadata, shapes)
    assert error.field == name and f"expected shape {expected}" in error.reason and str(bad) in error.reason


@pytest.mark.parametrize("extra", ["blk.0.attn_q.bias", "blk.2.attn_norm.weight"])
def test_tensor_the_model_would_ignore_is_refused(extra):
    metadata, shapes = llama_file()
    shapes[extra] = (H * DH,)
    with pytest.raises(UnsupportedError, match=f"{SOURCE}: tensor {extra} is not used"):
        ModelConfig.from_metadata(metadata, shapes, SOURCE)


def test_unknown_architecture():
    metadata, shapes = llama_file()
    metadata["general.architecture"] = "gpt2"
    with pytest.raises(UnsupportedError, match="'gpt2' is not supported; supported: llama, qwen2, qwen3"):
        ModelConfig.from_metadata(metadata, shapes, SOURCE)


def test_value_heads_of_another_width_are_unsupported():
    metadata, shapes = llama_file()
    metadata["llama.attention.value_length"] = 2 * DH
    with pytest.raises(UnsupportedError, match="value_length"):
        ModelConfig.from_metadata(metadata, shapes, SOURCE)


def test_rope_scaling_from_metadata():
    metadata, shapes = llama_file()
    metadata |= {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    assert ModelConfig.from_metadata(metadata, shapes, SOURCE).rope_scaling == RopeScaling("linear", 4.0)

    metadata, shapes = llama_file()
    metadata["llama.rope.scale_linear"] = 2.0  # older files: a factor without a type
    assert ModelConfig.from_metadata(metadata, shapes, SOURCE).rope_scaling == RopeScaling("linear", 2.0)

    metadata, shapes = llama_file()
    metadata |= {"llama.rope.scaling.type": "llama3", "llama.rope.scaling.factor": 8.0,
                 "llama.rope.scaling.original_context_length": 1024}
    assert ModelConfig.from_metadata(metadata, shapes, SOURCE).rope_scaling == RopeScaling(
        "llama3", 8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context_tokens=1024)

    metadata["llama.rope.scaling.type"] = "none"
    assert ModelConfig.from_metadata(metadata, shapes, SOURCE).rope_scaling is None


def test_rope_freqs_tensor_replaces_llama3_metadata():
    metadata, shapes = llama_file()
    metadata |= {"llama.rope.scaling.type": "llama3", "llama.rope.scaling.factor": 8.0,
                 "llama.rope.scaling.original_context_length": 1024}
    shapes["rope_freqs.weight"] = (DH // 2,)
    c = ModelConfig.from_metadata(metadata, shapes, SOURCE)
    assert c.has_rope_freqs and c.rope_scaling is None  # applied once, from the tensor
    shapes["rope_freqs.weight"] = (DH,)
    error = rejected(metadata, shapes)
    assert error.field == "rope_freqs.weight" and f"expected shape ({DH // 2},)" in error.reason


@pytest.mark.parametrize("extra,field", [
    ({"llama.rope.scaling.type": "linear"}, "llama.rope.scaling.factor"),
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": -2.0}, "llama.rope.scaling.factor"),
    ({"llama.rope.scaling.type": "llama3", "llama.rope.scaling.factor": 8.0},
     "llama.rope.scaling.original_context_length"),
    ({"llama.rope.scaling.type": "llama3", "llama.rope.scaling.factor": 8.0,
      "llama.rope.scaling.original_context_length": 1024, "llama.rope.scaling.low_freq_factor": 4.0},
     "llama.rope.scaling.high_freq_factor"),
    ({"llama.rope.scaling.type": 3}, "llama.rope.scaling.type"),
])
def test_bad_rope_scaling(extra, field):
    metadata, shapes = llama_file()
    metadata |= extra
    assert rejected(metadata, shapes).field == field


def test_unsupported_rope_scaling_type():
    metadata, shapes = llama_file()
    metadata |= {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}
    with pytest.raises(UnsupportedError, match="'yarn' is not supported; supported: none, linear, llama3"):
        ModelConfig.from_metadata(metadata, shapes, SOURCE)


@pytest.mark.parametrize("field,value", [
    ("num_layers", 0), ("hidden_size", -1), ("vocab_size", 2.5), ("head_dim", True), ("num_kv_heads", 3),
    ("rope_dim", 15), ("rope_dim", 32), ("max_context_tokens", 2**24 + 1), ("rms_norm_eps", 0.0),
    ("rope_theta", float("nan")), ("rope_theta", "1e4"), ("rms_norm_eps", None),
])
def test_config_constructor_validates(field, value):
    metadata, shapes = llama_file()
    valid = ModelConfig.from_metadata(metadata, shapes, SOURCE)
    fields = {name: getattr(valid, name) for name in valid.__dataclass_fields__}
    with pytest.raises(InvalidParameterError, match=field):
        ModelConfig(**(fields | {field: value}))


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="yarn", factor=2.0), "kind"), (dict(kind="linear", factor=0.0), "factor"),
    (dict(kind="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0), "low_freq_factor"),
    (dict(kind="llama3", factor=8.0, original_context_tokens=0), "original_context_tokens"),
])
def test_rope_scaling_validates(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        RopeScaling(**kwargs)
