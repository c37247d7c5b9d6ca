"""Synthetic GGUF models: real architectures' shapes, metadata, vocabularies and per-tensor
quantization mix, with random weights quantized for real (blocks carry correct scales for the data).

Used to benchmark the engine (and other GGUF engines on the same file) at sizes that cannot be
downloaded here.
"""

from .quantize import SUPPORTED_TYPES, quantize_tensor
from .recipe import MIXES, QUANTS, QuantMix, tensor_type, use_more_bits
from .shapes import SHAPES, ModelShape, TensorSpec, tensor_specs
from .vocab import Vocab, VocabSpec, build_vocab
from .writer import TensorPlan, plan_tensors, write_model, write_synthetic_model

__all__ = [
    "MIXES", "QUANTS", "SHAPES", "SUPPORTED_TYPES", "ModelShape", "QuantMix", "TensorPlan", "TensorSpec", "Vocab",
    "VocabSpec", "build_vocab", "plan_tensors", "quantize_tensor", "tensor_specs", "tensor_type", "use_more_bits",
    "write_model", "write_synthetic_model",
]
