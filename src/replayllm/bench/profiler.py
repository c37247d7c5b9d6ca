"""`replayllm profile`: each token's critical path, split into GPU execution and host activities, per decode mode.

Definitions (also in docs/profiling.md):
- token_ms: mean wall time between consecutive generated tokens at steady state (warm-up tokens dropped).
- gpu_ms: the GPU's own time for one decode step of the mode's kernels, measured by replaying them back to back
  with no host work in between (eager mode runs the same kernels as its graph, so it has the same gpu_ms).
- own_ms[activity]: host time spent per token in each activity (launch, sampling, copy, wait, detokenize,
  other = the rest of the token's wall time).
- critical host time = token_ms - gpu_ms: the part of each token the GPU spends waiting for the host. It is
  attributed to the host activities (all but `wait`, which is the host idling on the GPU) in proportion to their
  own times, giving parts_ms; gpu + parts sum to token_ms.
- host_critical_fraction = critical host time / token_ms; gpu_idle_fraction = 1 - gpu_ms / token_ms, the same
  quantity seen from the GPU; gpu_gap_fraction is a separate reading from CUDA events bracketing each step in
  the real loop: the gaps between one step's end and the next step's start over the span of the run (in eager
  mode it misses the gaps between kernels inside a step).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from ..engine.tracer import ACTIVITIES, TokenTracer
from ..sampling import SamplingParams

DEFAULT_MODES = ("eager", "graph-host-sampling", "graph", "graph-4step")
HOST_PARTS = ("launch", "sampling", "copy", "detokenize", "other")


@dataclass
class ProfileRow:
    model: str
    quant: str
    mode: str
    n_tokens: int
    token_ms: float
    gpu_ms: float
    own_ms: dict[str, float]
    parts_ms: dict[str, float]  # "gpu" + critical host parts; sums to token_ms
    host_critical_fraction: float
    gpu_idle_fraction: float
    gpu_gap_fraction: float | None

    def to_json(self) -> dict:
        return asdict(self)


def summarize(tracer: TokenTracer, gpu_ms: float, warmup: int, model: str, quant: str, mode: str) -> ProfileRow:
    """Turn a tracer's per-token records into a ProfileRow (pure arithmetic: tested on the CPU)."""
    if len(tracer.token_stamps) < warmup + 2:
        raise ValueError(f"need at least {warmup + 2} traced tokens, got {len(tracer.token_stamps)}")
    stamps = tracer.token_stamps[warmup:]
    periods_ms = [1e3 * (b - a) for a, b in zip(stamps, stamps[1:])]
    token_ms = statistics.fmean(periods_ms)
    records = tracer.per_token[warmup + 1:]
    own = {a: 1e3 * statistics.fmean(r[a] for r in records) for a in ACTIVITIES}
    own["other"] = max(token_ms - sum(own.values()), 0.0)
    critical_ms = max(token_ms - gpu_ms, 0.0)
    host_total = sum(own[p] for p in HOST_PARTS)
    parts = {"gpu": min(gpu_ms, token_ms)}
    for p in HOST_PARTS:
        parts[p] = critical_ms * own[p] / host_total if host_total > 0 else 0.0
    if host_total <= 0:  # the host only waited, yet the GPU idled: nothing measured explains it
        parts["other"] = critical_ms
    return ProfileRow(model, quant, mode, len(periods_ms), token_ms, gpu_ms, own, parts,
                      critical_ms / token_ms, 1.0 - parts["gpu"] / token_ms, _gap_fraction(tracer, warmup))


def _gap_fraction(tracer: TokenTracer, warmup: int) -> float | None:
    events = [e for e in tracer.step_events[warmup:] if e[1] is not None]
    if len(events) < 2:
        return None
    span = events[0][0].elapsed_time(events[-1][1])
    gaps = sum(max(a[1].elapsed_time(b[0]), 0.0) for a, b in zip(events, events[1:]))
    return gaps / span if span > 0 else None


def profile_modes(llm, modes, n_tokens: int, warmup: int = 8,
                  prompt: str = "The history of the city begins") -> list[ProfileRow]:
    """Generate `n_tokens` greedy tokens in each mode with a tracer attached; the backend must be a GPUBackend."""
    import torch

    from ..bench.llama_bench import model_facts

    backend = llm.backend
    facts = model_facts(llm.model_file.gguf, llm.config)
    prompt_ids = llm.tokenizer.encode(prompt)
    params = SamplingParams(max_tokens=n_tokens + warmup + 1, temperature=0.0, ignore_eos=True)
    rows = []
    for mode in modes:
        backend.set_mode(mode)
        llm.generate([prompt_ids], params)  # warm-up run: lazy allocations, caches
        tracer = TokenTracer(gpu=True)
        backend.tracer = tracer
        try:
            llm.generate([prompt_ids], params)
        finally:
            backend.tracer = None
        torch.cuda.synchronize()
        gpu_ms = backend.measure_step_gpu_ms(mode, positions=len(prompt_ids) + warmup + n_tokens // 2,
                                             greedy=params.is_greedy)
        rows.append(summarize(tracer, gpu_ms, warmup, facts.name, facts.quant, mode))
    return rows


def table(rows: list[ProfileRow]) -> str:
    head = ("| model | mode | token ms | GPU ms | " + " | ".join(f"{p} ms" for p in HOST_PARTS)
            + " | host critical | GPU idle |\n" + "| --- | --- |" + " ---: |" * (4 + len(HOST_PARTS)))
    lines = [head]
    for r in rows:
        parts = " | ".join(f"{r.parts_ms[p]:.3f}" for p in HOST_PARTS)
        lines.append(f"| {r.model} {r.quant} | {r.mode} | {r.token_ms:.3f} | {r.gpu_ms:.3f} | {parts} | "
                     f"{100 * r.host_critical_fraction:.1f}% | {100 * r.gpu_idle_fraction:.1f}% |")
    return "\n".join(lines)
