"""replayllm: GGUF language models on NVIDIA GPUs, one CUDA-graph replay per token."""

from .engine import LLM, GenerationOutput
from .errors import ReplayLLMError
from .sampling import SamplingParams

__all__ = ["LLM", "GenerationOutput", "SamplingParams", "ReplayLLMError"]
__version__ = "0.1.0"
