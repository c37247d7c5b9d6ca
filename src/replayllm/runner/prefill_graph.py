"""Prefill as CUDA graphs: one captured pass per bucket of chunk sizes, so that a prompt chunk costs the host one
replay instead of a thousand kernel launches.

Launched one by one from Python, a 7B pass of 512 tokens kept the host busy ~29 ms for 19 ms of GPU work
(benchmarks/NOTES.md): prefill was host-bound. A graph fixes the shapes, so each bucket of rows has its own, and
a chunk runs in the smallest bucket that holds it (`Prefiller.run_padded`): the chunk's ids first, padding rows
after them, and its span (start, rows) and last row written on the device before the replay. Padding rows cost
GPU time in the GEMMs only, so the buckets step by 1.5x and 2x (from 48 rows on, at most a third of a pass is
padding).

All buckets share one memory pool, captured largest first: they never run at once, so the pool is as large as
the largest pass's activations, which a pass launched one by one would leave in the caching allocator anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .graph import record, warm_up
from .prefill import Prefiller

# Rows of the captured passes: multiples of 16 (the tensor-core tiles' granularity), then x1.5 and x2 in turn.
GRAPH_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


def graph_buckets(max_tokens: int) -> list[int]:
    """The buckets captured for chunks of up to max_tokens rows: GRAPH_BUCKETS below it, then max_tokens."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    return [b for b in GRAPH_BUCKETS if b < max_tokens] + [max_tokens]


class PrefillGraphs:
    """Captured prefill passes of one sequence (page-table row `page_table_row`) for chunks of 1..max_tokens rows,
    returning the last row's logits. Static inputs: `token_ids`, `span` (start, rows) and `last_row`."""

    def __init__(self, prefiller: Prefiller, page_table_row: torch.Tensor, max_tokens: int):
        device = page_table_row.device
        self.prefiller, self.page_table_row = prefiller, page_table_row
        self.buckets = graph_buckets(max_tokens)
        self.token_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)  # [max_tokens]
        self.span = torch.zeros(2, dtype=torch.int32, device=device)  # (start, rows)
        self.last_row = torch.zeros(1, dtype=torch.int64, device=device)  # rows - 1
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, its logits)
        self.pool_bytes = 0  # GPU memory the captured passes hold (measured by capture)
        self.capture_seconds = 0.0

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, rows: int) -> int | None:
        """The smallest bucket of at least `rows` rows; None past max_tokens."""
        return next((b for b in self.buckets if b >= rows), None)

    def capture(self, progress: bool = False) -> None:
        """Compile every bucket's pass, then record them all, largest first, into one pool. The warm-ups all run
        before the first recording: a warm-up beside a pool that already holds the largest pass would need the
        memory of two passes at once, and the memory left after load may hold only one (a 7B model in 6 GiB).
        They run with a span of no rows, so they write no cache slot: safe whatever the page-table row holds."""
        from tqdm import tqdm

        started = time.perf_counter()
        device = self.page_table_row.device
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        reserved_before = torch.cuda.memory_reserved(device)
        self.span.zero_()
        self.last_row.zero_()
        order = self.buckets[::-1]
        with tqdm(total=2 * len(order), desc="prefill graphs", unit="step", disable=not progress,
                  leave=False) as bar:
            for bucket in order:  # the largest first: the smaller passes reuse its cached blocks
                warm_up(self._body(bucket))
                bar.update()
            torch.cuda.empty_cache()  # only the pool holds a pass's memory from here on
            pool = torch.cuda.graph_pool_handle()
            for bucket in order:
                self._graphs[bucket] = record(self._body(bucket), pool)
                bar.update()
        self.pool_bytes = torch.cuda.memory_reserved(device) - reserved_before
        self.capture_seconds = time.perf_counter() - started

    def _body(self, bucket: int) -> Callable[[], torch.Tensor]:
        def body() -> torch.Tensor:
            return self.prefiller.run_padded(self.token_ids[:bucket], self.page_table_row, self.span, self.last_row)

        return body

    def run(self, token_ids: torch.Tensor, start: int) -> torch.Tensor:
        """Prefill token_ids [T] int64 (device, 1 <= T <= max_tokens) at positions start..start+T-1 by one replay.
        Returns the last position's logits [1, vocab] f32 (a copy: the next replay overwrites the graph's)."""
        rows = token_ids.shape[0]
        bucket = self.bucket_for(rows)
        if rows < 1 or bucket is None:
            raise ValueError(f"a captured prefill takes 1..{self.max_tokens} tokens, got {rows}")
        self.token_ids[:rows].copy_(token_ids)
        self.span[0].fill_(start)  # fills launched as kernels: no host synchronisation
        self.span[1].fill_(rows)
        self.last_row.fill_(rows - 1)
        graph, logits = self._graphs[bucket]
        graph.replay()
        return logits.clone()
