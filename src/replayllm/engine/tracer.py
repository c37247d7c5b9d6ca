"""Per-token timing, collected only while profiling.

The decode loops test `if trace:` before any timing call, so with no tracer attached they make none. With one
attached, each token's host time is split into activities, and each decode step's GPU work is bracketed by
CUDA events, so the gaps in which the GPU waited can be measured on the GPU's own clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

ACTIVITIES = ("launch", "sampling", "copy", "wait", "detokenize")
"""launch: host time issuing GPU work (graph replay, or every kernel in eager mode); sampling: host-side
sampling; copy: host-device copies issued or performed; wait: host blocked on the GPU; detokenize: text and
stop checks. Whatever else the host does between two tokens is 'other'."""


@dataclass
class TokenTracer:
    gpu: bool = True
    per_token: list[dict[str, float]] = field(default_factory=list)
    token_stamps: list[float] = field(default_factory=list)
    step_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)
    _open: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ACTIVITIES, 0.0))

    def add(self, activity: str, seconds: float) -> None:
        self._open[activity] += seconds

    def step_begin(self) -> None:
        if self.gpu:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.step_events.append((start, None))

    def step_end(self) -> None:
        if self.gpu:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.step_events[-1] = (self.step_events[-1][0], end)

    def end_token(self) -> None:
        self.token_stamps.append(time.perf_counter())
        self.per_token.append(self._open)
        self._open = dict.fromkeys(ACTIVITIES, 0.0)

    def reset(self) -> None:
        self.per_token.clear()
        self.token_stamps.clear()
        self.step_events.clear()
        self._open = dict.fromkeys(ACTIVITIES, 0.0)
