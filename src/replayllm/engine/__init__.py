from .llm import LLM
from .outputs import GenerationOutput

__all__ = ["LLM", "GenerationOutput"]
