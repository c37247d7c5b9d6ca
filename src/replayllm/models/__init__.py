"""Model definitions: `ModelConfig` from GGUF metadata, the architecture registry, and the plain-torch fp32
reference forward that every faster path is checked against."""

from .config import ModelConfig, RopeScaling
from .layers import KVCache
from .registry import get_architecture, supported_architectures
from .transformer import Architecture, ReferenceModel, expected_tensor_shapes

__all__ = [
    "Architecture",
    "KVCache",
    "ModelConfig",
    "ReferenceModel",
    "RopeScaling",
    "expected_tensor_shapes",
    "get_architecture",
    "supported_architectures",
]
