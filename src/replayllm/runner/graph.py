"""Capture and replay of the decode step as a CUDA graph.

A `DecodeGraph` owns one batch bucket's captured work: `steps_per_graph` consecutive decode steps over the
same `StepBuffers`. With `sample_on_device`, each captured step runs all layers, samples on the GPU, writes the
sampled token into the step's own input buffer and into `out_tokens`, and advances `positions` (for a
greedy-only graph all of that after the layers is one launch, kernels/greedy_sample); per token the
host only calls `replay()`: no allocation, no synchronisation, no Python work per layer. Without it (kept to
measure what sampling on the host costs), the graph stops at the logits and advances `positions`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from ..kernels.greedy_sample import GreedySampleWorkspace, greedy_sample_step
from ..sampling import SamplerState, sampler_for
from .decode_step import StepBuffers

T = TypeVar("T")


_warm_up_streams: dict[int, torch.cuda.Stream] = {}  # device index -> the one side stream warm-ups run on


def warm_up(body: Callable[[], object]) -> None:
    """Run `body` once on a side stream, outside any capture: Triton compiles and autotunes there, and vendor
    libraries make their workspaces, which a capture may not do. Every warm-up on a device shares one stream:
    cuBLAS keeps a workspace (32 MiB on Hopper) for every stream it has run on, for the life of the process, so
    a new stream per warm-up (each prefill bucket, each batch bucket) would hold one each."""
    device = torch.cuda.current_device()
    side = _warm_up_streams.get(device)
    if side is None:
        side = _warm_up_streams[device] = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def record(body: Callable[[], T], pool=None) -> tuple[torch.cuda.CUDAGraph, T]:
    """Record `body` (already warmed up) into a new graph, in memory pool `pool` if given. Returns the graph and
    what the recorded body returned (tensors the replays overwrite)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = body()
    torch.cuda.synchronize()
    return graph, out


def capture_after_warm_up(body: Callable[[], T], pool=None) -> tuple[torch.cuda.CUDAGraph, T]:
    """`warm_up(body)`, then `record(body, pool)`."""
    warm_up(body)
    return record(body, pool)


class DecodeGraph:
    def __init__(self, step: Callable[[StepBuffers], torch.Tensor], bufs: StepBuffers,
                 sampler: SamplerState | None, steps_per_graph: int = 1, greedy_only: bool = False,
                 one_launch_greedy: bool = True):
        if steps_per_graph < 1:
            raise ValueError(f"steps_per_graph must be >= 1, got {steps_per_graph}")
        if sampler is None and steps_per_graph != 1:
            raise ValueError("several steps per graph need sampling on the device")
        self.step, self.bufs, self.sampler = step, bufs, sampler
        self.steps_per_graph = steps_per_graph
        # A greedy-only graph draws with `sample_greedy`; replay it only while every row's temperature is 0.
        self.greedy_only = greedy_only
        self._draw = sampler_for(greedy_only)
        # out_tokens[s] is the token sampled by the s-th step of one replay.
        self.out_tokens = torch.zeros(steps_per_graph, bufs.batch_size, dtype=torch.int64,
                                      device=bufs.tokens.device)
        # A greedy-only graph draws, records, feeds the token back and advances the position in one launch
        # (kernels/greedy_sample) instead of ~25 torch ones (`one_launch_greedy` off: those, for comparison); the
        # tokens are sample_greedy's either way.
        self._greedy = (GreedySampleWorkspace.create(bufs.batch_size, sampler.vocab_size, bufs.tokens.device)
                        if greedy_only and one_launch_greedy and sampler is not None else None)
        self.graph: torch.cuda.CUDAGraph | None = None

    def run_steps(self) -> None:
        """The body that is captured."""
        for s in range(self.steps_per_graph):
            logits = self.step(self.bufs)
            if self._greedy is not None:
                sampler = self.sampler
                greedy_sample_step(logits, sampler.token_counts, sampler.repetition_penalty,
                                   sampler.frequency_penalty, sampler.presence_penalty, sampler.penalty_last_n,
                                   sampler.window, sampler.window_count, sampler.step, self.bufs.tokens,
                                   self.out_tokens[s], self.bufs.positions, self._greedy, pdl=self.bufs.pdl)
                continue
            if self.sampler is not None:
                tokens = self._draw(logits, self.sampler)
                self.sampler.record(tokens)
                self.bufs.tokens.copy_(tokens)
                self.out_tokens[s].copy_(tokens)
            self.bufs.positions.add_(1)

    def capture(self) -> None:
        """Compile every kernel outside the capture, then record the body once.

        The warm-up really runs the body, so it writes the KV cache at the buffers' current positions: call this
        only while no sequence owns cache pages, and reset positions and the sampler rows afterwards (every
        request does at its start).
        """
        self.graph, _ = capture_after_warm_up(self.run_steps)

    def replay(self) -> None:
        self.graph.replay()
