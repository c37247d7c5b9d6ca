"""Reading GGUF files: a hostile-file-safe, memory-mapped reader, tensor types and dequantization.

    with read_gguf(path) as f:
        f.metadata["general.architecture"]        # plain Python values
        info = f.tensors["blk.0.attn_q.weight"]   # TensorInfo: shape in GGUF order (ne[0] first)
        weight = dequantize(info, f.tensor_data(info.name))  # float32 [*info.numpy_shape]
"""

from .dequant import dequantize
from .reader import GGUFFile, read_gguf
from .types import SUPPORTED_TENSOR_TYPES, TensorInfo

__all__ = ["GGUFFile", "SUPPORTED_TENSOR_TYPES", "TensorInfo", "dequantize", "read_gguf"]
