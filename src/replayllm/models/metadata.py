"""Build a `ModelConfig` from GGUF metadata and tensor shapes, trusting nothing: every rejection is a
`GGUFError(file, field, reason)` naming the key or tensor at fault.

Hyperparameters come from `{arch}.*` keys only; tensor shapes are used to cross-check them, to detect tied
embeddings (no output.weight) and Llama 3 frequency factors (rope_freqs.weight).
"""

from __future__ import annotations

import math
from numbers import Integral, Real

from ..errors import GGUFError, InvalidParameterError, UnsupportedError
from .config import MAX_CONTEXT_TOKENS, ModelConfig, RopeScaling
from .registry import get_architecture
from .transformer import expected_tensor_shapes

SPECIAL_TOKEN_KEYS = [f"tokenizer.ggml.{name}_token_id" for name in ("bos", "eos", "eot", "eom", "unknown",
                                                                      "padding")]
_MISSING = object()


class _Fields:
    """Typed access to the metadata dict; errors name the key."""

    def __init__(self, metadata: dict, source: str):
        self.metadata, self.source = metadata, source

    def error(self, key: str, reason: str) -> GGUFError:
        return GGUFError(self.source, key, reason)

    def _get(self, key: str, default):
        value = self.metadata.get(key, _MISSING)
        if value is _MISSING and default is _MISSING:
            raise self.error(key, "required key is missing")
        return value

    def string(self, key: str, default=_MISSING) -> str:
        value = self._get(key, default)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {type(value).__name__}")
        return value

    def positive_int(self, key: str, default=_MISSING) -> int:
        value = self._get(key, default)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise self.error(key, f"expected an integer, got {type(value).__name__}")
        if value <= 0:
            raise self.error(key, f"must be positive, got {value}")
        return int(value)

    def positive_float(self, key: str, default=_MISSING) -> float:
        value = self._get(key, default)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, Real):
            raise self.error(key, f"expected a number, got {type(value).__name__}")
        if not (math.isfinite(value) and value > 0):
            raise self.error(key, f"must be a positive finite number, got {value}")
        return float(value)


def config_from_metadata(metadata: dict, tensor_shapes: dict[str, tuple[int, ...]], source: str) -> ModelConfig:
    fields = _Fields(metadata, source)
    name = fields.string("general.architecture")
    try:
        arch = get_architecture(name)
    except UnsupportedError as e:
        raise UnsupportedError(f"{source}: general.architecture: {e}") from None
    p = name + "."
    hidden_size = fields.positive_int(p + "embedding_length")
    num_heads = fields.positive_int(p + "attention.head_count")
    num_kv_heads = fields.positive_int(p + "attention.head_count_kv", num_heads)
    head_dim = _head_dim(fields, p, hidden_size, num_heads, num_kv_heads)
    rope_dim = fields.positive_int(p + "rope.dimension_count", head_dim)
    if rope_dim % 2 or rope_dim > head_dim:
        raise fields.error(p + "rope.dimension_count", f"must be even and at most the head width {head_dim}, "
                                                       f"got {rope_dim}")
    context = fields.positive_int(p + "context_length")
    if context > MAX_CONTEXT_TOKENS:
        raise fields.error(p + "context_length", f"{context} tokens is beyond any real model "
                                                 f"(limit {MAX_CONTEXT_TOKENS}); the file is corrupt")
    has_rope_freqs = "rope_freqs.weight" in tensor_shapes
    vocab_size = _vocab_size(fields, p, tensor_shapes)
    _check_special_tokens(fields, vocab_size)
    try:
        config = ModelConfig(
            architecture=name, num_layers=fields.positive_int(p + "block_count"), hidden_size=hidden_size,
            intermediate_size=fields.positive_int(p + "feed_forward_length"), num_heads=num_heads,
            num_kv_heads=num_kv_heads, head_dim=head_dim, vocab_size=vocab_size, max_context_tokens=context,
            rms_norm_eps=fields.positive_float(p + "attention.layer_norm_rms_epsilon"),
            rope_theta=fields.positive_float(p + "rope.freq_base", 10000.0), rope_dim=rope_dim,
            rope_neox=arch.rope_neox, rope_scaling=_rope_scaling(fields, p, has_rope_freqs),
            has_qkv_bias=arch.has_qkv_bias, has_qk_norm=arch.has_qk_norm,
            tied_embeddings="output.weight" not in tensor_shapes, has_rope_freqs=has_rope_freqs)
    except InvalidParameterError as e:  # every field is checked above; this is a last line of defence
        raise GGUFError(source, name, str(e)) from None
    _check_tensors(fields, expected_tensor_shapes(config), tensor_shapes)
    return config


def _head_dim(fields: _Fields, p: str, hidden_size: int, num_heads: int, num_kv_heads: int) -> int:
    if num_heads % num_kv_heads:
        raise fields.error(p + "attention.head_count_kv",
                           f"{num_kv_heads} key/value heads do not divide {num_heads} query heads")
    head_dim = fields.positive_int(p + "attention.key_length", None)
    if head_dim is None:
        if hidden_size % num_heads:
            raise fields.error(p + "attention.head_count", f"{num_heads} heads do not divide the embedding "
                                                           f"width {hidden_size} (and no attention.key_length)")
        head_dim = hidden_size // num_heads
    value_dim = fields.positive_int(p + "attention.value_length", head_dim)
    if value_dim != head_dim:
        raise UnsupportedError(f"{fields.source}: {p}attention.value_length: value heads of width {value_dim} "
                               f"differ from key heads of width {head_dim}; not supported")
    return head_dim


def _vocab_size(fields: _Fields, p: str, tensor_shapes: dict[str, tuple[int, ...]]) -> int:
    """The vocabulary size; the metadata key, the tokenizer's token list and token_embd must all agree."""
    sources: list[tuple[str, int]] = []
    if p + "vocab_size" in fields.metadata:
        sources.append((p + "vocab_size", fields.positive_int(p + "vocab_size")))
    tokens = fields.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None:
        if not isinstance(tokens, (list, tuple)):
            raise fields.error("tokenizer.ggml.tokens", f"expected a list of strings, got {type(tokens).__name__}")
        sources.append(("tokenizer.ggml.tokens", len(tokens)))
    embd = tensor_shapes.get("token_embd.weight")
    if embd is None:
        raise fields.error("token_embd.weight", "required tensor is missing")
    if len(embd) != 2:
        raise fields.error("token_embd.weight", f"expected a 2-D tensor, got shape {tuple(embd)}")
    sources.append(("token_embd.weight", int(embd[1])))
    key, vocab_size = sources[0]
    for other_key, other in sources[1:]:
        if other != vocab_size:
            raise fields.error(other_key, f"vocabulary size {other} disagrees with {key} ({vocab_size})")
    if vocab_size <= 0:
        raise fields.error(key, "the vocabulary is empty")
    return vocab_size


def _check_special_tokens(fields: _Fields, vocab_size: int) -> None:
    for key in SPECIAL_TOKEN_KEYS:
        value = fields.metadata.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise fields.error(key, f"expected an integer token id, got {type(value).__name__}")
        if not 0 <= value < vocab_size:
            raise fields.error(key, f"token id {value} is outside the vocabulary (0..{vocab_size - 1})")


def _rope_scaling(fields: _Fields, p: str, has_rope_freqs: bool) -> RopeScaling | None:
    kind = fields.string(p + "rope.scaling.type", None)
    if kind is None:
        # Older files: {arch}.rope.scale_linear holds a linear factor and no type.
        factor = fields.positive_float(p + "rope.scale_linear", 1.0)
        return None if factor == 1.0 else RopeScaling("linear", factor)
    if kind == "none":
        return None
    if kind == "linear":
        return RopeScaling("linear", fields.positive_float(p + "rope.scaling.factor"))
    if kind == "llama3":
        if has_rope_freqs:  # llama.cpp's converter already folded the scaling into rope_freqs.weight
            return None
        low = fields.positive_float(p + "rope.scaling.low_freq_factor", 1.0)
        high = fields.positive_float(p + "rope.scaling.high_freq_factor", 4.0)
        if low >= high:
            raise fields.error(p + "rope.scaling.high_freq_factor",
                               f"must exceed low_freq_factor ({low}), got {high}")
        return RopeScaling("llama3", fields.positive_float(p + "rope.scaling.factor"), low, high,
                           fields.positive_int(p + "rope.scaling.original_context_length"))
    raise UnsupportedError(f"{fields.source}: {p}rope.scaling.type: {kind!r} is not supported; "
                           f"supported: none, linear, llama3")


def _check_tensors(fields: _Fields, expected: dict[str, tuple[int, ...]],
                   actual: dict[str, tuple[int, ...]]) -> None:
    for name, shape in expected.items():
        if name not in actual:
            raise fields.error(name, "required tensor is missing")
        if tuple(actual[name]) != shape:
            raise fields.error(name, f"expected shape {shape} (GGUF order), got {tuple(actual[name])}")
    unused = sorted(set(actual) - set(expected))
    if unused:
        # A tensor the model would ignore (a bias, an extra layer) means the file is not the model we run.
        more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        raise UnsupportedError(f"{fields.source}: tensor {', '.join(unused[:3])}{more} is not used by "
                               f"replayllm's {fields.metadata['general.architecture']} model; refusing to "
                               f"run it without")
