"""Where one decode step's GPU time goes, kernel by kernel: the torch profiler's record of graph replays.

Kernels inside a replayed CUDA graph are recorded one by one (CUPTI), so `record_step_kernels` replays the
step's graph back to back under the profiler and `summarize` turns the kernels' intervals into, per step: the
time and launches of each kernel name, the time the GPU is busy with at least one kernel (the union of the
intervals) and the idle rest of the span, and one step's kernels in launch order.

With programmatic dependent launch a kernel starts while its predecessor drains and waits, so its recorded
duration includes that wait: the per-name times then add up to more than the step. A record with PDL off gives
each kernel's own time (`record_step_kernels(..., pdl=False)`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class KernelInterval:
    name: str
    start_us: float
    end_us: float

    @property
    def us(self) -> float:
        return self.end_us - self.start_us


@dataclass(frozen=True)
class KernelTotal:
    kernel: str
    launches_per_step: float
    us_per_step: float
    us_per_launch: float


@dataclass
class StepBreakdown:
    steps: int
    launches_per_step: int
    busy_us_per_step: float
    idle_us_per_step: float
    by_name: list[KernelTotal]  # largest time first
    last_step: list[KernelInterval]  # the last step's kernels, in launch order
    step_us: float | None = None  # the step's GPU time measured with events, where known
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"steps": self.steps, "step_us": self.step_us, "launches_per_step": self.launches_per_step,
                "busy_us_per_step": self.busy_us_per_step, "idle_us_per_step": self.idle_us_per_step,
                **self.settings,
                "by_name": [vars(t) for t in self.by_name],
                "last_step": [{"kernel": k.name, "us": k.us} for k in self.last_step]}


def summarize(kernels: list[KernelInterval], steps: int, name_width: int = 60) -> StepBreakdown:
    """The breakdown of `steps` identical steps whose kernels are `kernels` (any order)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if len(kernels) < steps:
        raise ValueError(f"{len(kernels)} kernels recorded for {steps} steps: the profiler saw no graph kernels")
    kernels = sorted(kernels, key=lambda k: k.start_us)
    busy, end = 0.0, float("-inf")
    for k in kernels:  # the union of the intervals: overlapping kernels (PDL) count once
        start = max(k.start_us, end)
        if k.end_us > start:
            busy += k.end_us - start
        end = max(end, k.end_us)
    span = end - kernels[0].start_us
    per_name: dict[str, list[float]] = {}
    for k in kernels:
        per_name.setdefault(k.name[:name_width], []).append(k.us)
    totals = [KernelTotal(name, len(t) / steps, sum(t) / steps, sum(t) / len(t)) for name, t in per_name.items()]
    totals.sort(key=lambda t: -t.us_per_step)
    per_step = len(kernels) // steps
    return StepBreakdown(steps=steps, launches_per_step=per_step, busy_us_per_step=busy / steps,
                         idle_us_per_step=(span - busy) / steps, by_name=totals, last_step=kernels[-per_step:])


POSITIONS = 64  # the context the step is recorded at (tg128's range)
REPLAYS = 20


def context_needed(positions: int = POSITIONS, replays: int = REPLAYS) -> int:
    """Tokens of context a record at `positions` with `replays` replays steps through (one replay before)."""
    return positions + replays + 2


def positions_within(max_context_tokens: int, replays: int = REPLAYS) -> int:
    """POSITIONS, or less where a record there would step past `max_context_tokens` (at least 1)."""
    return max(1, min(POSITIONS, max_context_tokens - context_needed(0, replays)))


def record_step_kernels(backend, positions: int = POSITIONS, replays: int = REPLAYS, greedy: bool = True,
                        pdl: bool | None = None) -> StepBreakdown:
    """Replay `backend`'s decode graph `replays` times at context `positions` under the torch profiler (the
    greedy variant, as tgN replays it, unless `greedy` is False) and summarize its kernels. `pdl` None keeps
    the backend's setting; True / False sets it for the record (recapturing) and restores it after."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    before = backend.bufs.pdl
    if pdl is not None and pdl != before:
        backend.set_pdl(pdl)
    try:
        backend.measure_step_gpu_ms("graph", positions, replays=3, greedy=greedy)  # warm
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step_ms = backend.measure_step_gpu_ms("graph", positions, replays=replays, greedy=greedy)
    finally:
        if backend.bufs.pdl != before:
            backend.set_pdl(before)
    kernels = [KernelInterval(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == DeviceType.CUDA]
    breakdown = summarize(kernels, replays + 1)  # measure_step_gpu_ms replays once before it starts timing
    breakdown.step_us = 1e3 * step_ms
    breakdown.settings = {"positions": positions, "greedy": greedy, "pdl": backend.bufs.pdl if pdl is None else pdl}
    return breakdown


def record_as_loaded_and_without_pdl(backend, positions: int = POSITIONS,
                                     replays: int = REPLAYS) -> list[StepBreakdown]:
    """`record_step_kernels` with the backend's PDL setting, then, where that is on, with PDL off too (each
    kernel's own time, no overlap)."""
    return [record_step_kernels(backend, positions, replays, pdl=pdl)
            for pdl in dict.fromkeys((backend.bufs.pdl, False))]


def breakdown_table(b: StepBreakdown, rows: int = 12) -> str:
    """Markdown: the kernels taking the most time a step, then the step's busy and idle time."""
    lines = ["| kernel | launches/step | us/step | us/launch |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {t.kernel} | {t.launches_per_step:.0f} | {t.us_per_step:.1f} | {t.us_per_launch:.2f} |"
              for t in b.by_name[:rows]]
    step = f"{b.step_us:.0f} us a step, " if b.step_us is not None else ""
    lines.append(f"\n{step}{b.launches_per_step} launches, GPU busy {b.busy_us_per_step:.0f} us and idle "
                 f"{b.idle_us_per_step:.0f} us of each step ({', '.join(f'{k} {v}' for k, v in b.settings.items())})")
    return "\n".join(lines)
