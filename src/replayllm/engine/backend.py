"""The contract every backend (CPU reference, GPU eager, GPU graph) fulfils."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch

from ..sampling import SamplingParams


class Backend(ABC):
    """Runs one loaded model on one device.

    Backends deal in token ids only; text, stop strings and finish reasons are the engine's business, so every
    backend behaves the same from the user's side. A backend may run ahead of its consumer (the GPU graph
    backend does, to keep the GPU busy): the consumer stops it by closing the iterator.
    """

    name: str
    max_context_tokens: int

    @abstractmethod
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Float32 logits [len(token_ids), vocab] on the CPU, one row per position, from an empty context."""

    @abstractmethod
    def generate_ids(self, prompt_ids: list[int], params: SamplingParams, seed: int,
                     max_new_tokens: int) -> Iterator[int]:
        """Yield up to `max_new_tokens` sampled ids continuing `prompt_ids`; the caller decides when to stop."""

    @abstractmethod
    def prefill_only(self, token_ids: list[int], chunk_tokens: int) -> None:
        """Process a prompt into a scratch KV cache in chunks of `chunk_tokens`; return once the device is done.

        For benchmarks: prompt processing alone, as llama-bench's ppN measures it.
        """

    def close(self) -> None:
        """Release device memory; the backend is unusable afterwards."""
