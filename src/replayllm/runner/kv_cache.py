"""The paged KV cache: pages allocated once, handed to sequences through per-sequence page tables.

Layout per layer: k, v [num_pages, num_kv_heads, page_size, head_dim], f16 (the default) or int8 with one f32
scale per (token, kv head) in k_scale, v_scale [num_pages, num_kv_heads, page_size], or q4 (head_dim / 2 bytes a
row, with a scale per block of 32 dims; kernels/kv_cache.py), so one page of one head is a contiguous
[page_size, row] tile that the attention kernel reads with wide loads. A sequence's pages are
reserved on the host when its request starts (for prompt + max new tokens), so the per-token path never asks
for memory: the decode step only follows `page_table` on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidParameterError, ReplayLLMError
from ..kernels.kv_cache import KV_CACHE_DTYPES, kv_cache_type, kv_row_shape
from ..models import ModelConfig

DEFAULT_PAGE_SIZE = 16


@dataclass
class PagedKVCache:
    k: torch.Tensor  # [L, num_pages, Hkv, page_size, Dh] f16 or int8, or [..., Dh / 2] uint8 (q4)
    v: torch.Tensor
    page_size: int
    max_pages_per_seq: int
    _free: list[int]
    k_scale: torch.Tensor | None = None  # [L, num_pages, Hkv, page_size] f32 (int8), [..., Dh / 32] (q4)
    v_scale: torch.Tensor | None = None

    @classmethod
    def allocate(cls, config: ModelConfig, max_context_tokens: int, max_sequences: int, device: torch.device,
                 page_size: int = DEFAULT_PAGE_SIZE, dtype: str = "f16") -> PagedKVCache:
        """dtype: "f16", "int8" or "q4" (kernels/kv_cache.py)."""
        if dtype not in KV_CACHE_DTYPES:
            raise InvalidParameterError(f"KV cache type must be one of {', '.join(KV_CACHE_DTYPES)}, got {dtype!r}")
        try:
            row, scale_row = kv_row_shape(dtype, config.head_dim)
        except ValueError as err:
            raise InvalidParameterError(f"{err} (this model's head_dim); use kv_cache='int8' or 'f16'") from None
        max_pages_per_seq = -(-max_context_tokens // page_size)
        num_pages = max_pages_per_seq * max_sequences
        rows = (config.num_layers, num_pages, config.num_kv_heads, page_size)
        element = KV_CACHE_DTYPES[dtype]
        shapes = [(rows + row, element)] * 2 + ([(rows + scale_row, torch.float32)] * 2 if scale_row is not None else [])
        try:
            k, v, *scales = (torch.zeros(shape, dtype=kind, device=device) for shape, kind in shapes)
        except torch.OutOfMemoryError:
            need = sum(torch.Size(shape).numel() * kind.itemsize for shape, kind in shapes)
            raise ReplayLLMError(f"the KV cache for {max_context_tokens} tokens x {max_sequences} sequences needs "
                                 f"{need / 2**30:.2f} GiB of GPU memory, which is not free; lower --ctx") from None
        scales = scales or [None, None]
        return cls(k, v, page_size, max_pages_per_seq, list(range(num_pages - 1, -1, -1)), *scales)

    @property
    def dtype(self) -> str:
        return kv_cache_type(self.k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k_scale, self.v_scale)
                   if t is not None)

    def scales(self, layer: int) -> dict:
        """The keyword arguments the attention and cache-write kernels take for layer `layer`: its scales (int8,
        q4), or none (f16)."""
        if self.k_scale is None:
            return {}
        return dict(k_scale=self.k_scale[layer], v_scale=self.v_scale[layer])

    def reserve(self, num_tokens: int) -> list[int]:
        """Pages for a sequence of up to `num_tokens` tokens; give them back with `release`."""
        count = -(-num_tokens // self.page_size)
        if count > self.max_pages_per_seq or count > len(self._free):
            raise ReplayLLMError(f"no room in the KV cache for {num_tokens} tokens")
        return [self._free.pop() for _ in range(count)]

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))

    def fill_page_table_row(self, page_table: torch.Tensor, row: int, pages: list[int]) -> None:
        """Host-side, at request start: write a sequence's pages into row `row` of a device page table."""
        table = torch.zeros(page_table.shape[1], dtype=torch.int32)
        table[: len(pages)] = torch.tensor(pages, dtype=torch.int32)
        page_table[row].copy_(table, non_blocking=False)
