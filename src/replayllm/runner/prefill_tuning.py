"""Which way prefill multiplies by each weight, chosen by measurement on the device.

Two ways: FUSED (kernels/quant_matmul reads the quantized blocks and feeds the tensor cores) and DEQUANT_GEMM
(dequantize into an f16 scratch, then the vendor GEMM). Which is faster depends on the type, the shape and the
number of prompt rows: the vendor GEMM is the faster multiplier, but expanding the weight to f16 costs a write
and a read of 2 bytes a weight, which only many rows amortise. `tune_methods` times both, once, for every
distinct weight shape at a few row counts (buckets), and `LinearMethods` answers for any T from the bucket at
or above it.

The choices are kept in a `TuningCache` file per GPU and software versions, so a model loaded again (in this
process or a later one) reuses them. That makes loading faster, and it keeps two loads of a model on one GPU
bit-identical: timings that are close could otherwise pick different methods, whose f16 roundings differ.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from ..kernels.quant_matmul import MatmulConfig, quant_matmul
from ..kernels.quant_weight import QuantWeight
from .json_cache import JsonCache

FUSED = "fused"
DEQUANT_GEMM = "dequant_gemm"
TUNING_BUCKETS = (16, 128, 512, 2048)  # prompt rows at which the methods are timed
# The quantized GEMM's launch shapes tried: 64 or 128 activation rows a program (more rows decode each weight
# fewer times, at the cost of registers).
FUSED_CONFIGS = (MatmulConfig(), MatmulConfig(block_m=128))


def shape_key(w: QuantWeight) -> tuple[str, int, int]:
    return (w.ggml_type.name, w.n_rows, w.n_cols)


@dataclass(frozen=True)
class Choice:
    """For prompts of up to `rows` rows: `method` (FUSED with `config`, or DEQUANT_GEMM), and what was measured
    (ms of the best fused shape, inf if none ran; ms of dequantize + vendor GEMM)."""

    rows: int
    method: str
    config: MatmulConfig | None = None
    fused_ms: float = float("nan")
    dequant_ms: float = float("nan")


@dataclass
class LinearMethods:
    """(type, n_rows, n_cols) -> choices by ascending `rows`. Shapes not measured use FUSED at its default
    launch shape."""

    table: dict[tuple[str, int, int], list[Choice]] = field(default_factory=dict)

    def get(self, w: QuantWeight, rows: int) -> Choice:
        choices = self.table.get(shape_key(w))
        if not choices:
            return Choice(rows, FUSED)
        return next((c for c in choices if rows <= c.rows), choices[-1])

    def uses(self, method: str) -> bool:
        return any(c.method == method for choices in self.table.values() for c in choices)

    def as_json(self) -> list[dict]:
        def ms(value: float) -> float | None:
            return round(value, 4) if math.isfinite(value) else None

        return [{"type": k[0], "n_rows": k[1], "n_cols": k[2], "rows": c.rows, "method": c.method,
                 "config": None if c.config is None else dataclasses.asdict(c.config),
                 "fused_ms": ms(c.fused_ms), "dequant_gemm_ms": ms(c.dequant_ms)}
                for k, choices in self.table.items() for c in choices]


class TuningCache(JsonCache):
    """Measured choices by (type, n_rows, n_cols, rows), in a JSON file (runner/json_cache)."""

    VERSION = 1
    WHAT = "prefill tuning cache"

    @staticmethod
    def _key(key: tuple[str, int, int], rows: int) -> str:
        return f"{key[0]}:{key[1]}x{key[2]}:{rows}"

    def get(self, key: tuple[str, int, int], rows: int) -> Choice | None:
        entry = self.entries.get(self._key(key, rows))
        try:
            config = None if entry["config"] is None else MatmulConfig(**entry["config"])
            choice = Choice(rows, entry["method"], config, float(entry["fused_ms"]), float(entry["dequant_ms"]))
        except (TypeError, KeyError, ValueError):
            return None  # absent or malformed: measure it
        if choice.method not in (FUSED, DEQUANT_GEMM) or (choice.method == FUSED) != (config is not None):
            return None
        return choice

    def put(self, key: tuple[str, int, int], choice: Choice) -> None:
        self.put_entry(self._key(key, choice.rows), {
            "method": choice.method, "config": None if choice.config is None else dataclasses.asdict(choice.config),
            "fused_ms": choice.fused_ms, "dequant_ms": choice.dequant_ms})


def time_ms(fn, reps: int = 3, device: torch.device | str = "cuda") -> float:
    """Median time of fn() after one warm-up call (which also compiles): CUDA events on a GPU, the wall clock
    elsewhere (only for tests: the choices are meant to be measured on the device that runs them)."""
    fn()
    times = []
    for _ in range(reps):
        if torch.device(device).type != "cuda":
            started = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - started))
            continue
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def tuning_buckets(chunk_tokens: int) -> list[int]:
    """The row counts timed for a prefill chunk of chunk_tokens: the TUNING_BUCKETS below it, then the chunk."""
    return [b for b in TUNING_BUCKETS if b < chunk_tokens] + [chunk_tokens]


@torch.inference_mode()
def tune_methods(prefiller, chunk_tokens: int, cache: TuningCache | None = None) -> LinearMethods:
    """Time FUSED (each of FUSED_CONFIGS) and DEQUANT_GEMM for each distinct weight shape of the layers at the
    buckets up to chunk_tokens; the fastest wins per bucket. Choices found in `cache` are not measured again; new
    ones are added to it and saved. (Not the LM head: prefill multiplies it for one row, with the decode GEMV,
    except for all-position logits, which take the FUSED default.)

    Every timing multiplies views of one activation pool made for chunk_tokens rows (made only if something is
    timed), the input in the dtype a pass gives that matrix: the tuning needs no more memory than a pass of
    the chunk does (prefill.prefill_peak_bytes)."""
    device = prefiller.weights.output_norm.device
    buckets = tuning_buckets(chunk_tokens)
    pool = None
    methods = LinearMethods()
    for key, (w, input_dtype) in prefiller.gemm_inputs().items():
        choices = []
        for rows in buckets:
            cached = cache.get(key, rows) if cache is not None else None
            if cached is None:
                if pool is None:
                    pool = prefiller.activation_pool(buckets[-1])
                x = pool.gemm_input((rows, w.n_cols), input_dtype).normal_()
                cached = _measure(prefiller, w, x, pool.gemm_output((rows, w.n_rows)), key, device)
                if cache is not None:
                    cache.put(key, cached)
            choices.append(cached)
        methods.table[key] = choices
    if cache is not None:
        cache.save()
    return methods


def _measure(prefiller, w: QuantWeight, x: torch.Tensor, out: torch.Tensor, key: tuple[str, int, int],
             device: torch.device) -> Choice:
    """Time out = x @ w^T both ways (every FUSED_CONFIGS shape) and choose the faster, for x.shape[0] rows."""
    rows = x.shape[0]
    dequant = time_ms(lambda: prefiller.dequant_gemm(x, w, out, None, False), device=device)
    fused, best = float("inf"), None
    for cfg in FUSED_CONFIGS:
        try:
            ms = time_ms(lambda: quant_matmul(x, w, out, config=cfg), device=device)
        except Exception as exc:  # e.g. a launch shape this GPU cannot hold: the others may still run
            warnings.warn(f"prefill: the quantized GEMM {cfg} failed for {key} at {rows} rows ({exc!r:.200})",
                          stacklevel=3)
            continue
        if ms < fused:
            fused, best = ms, cfg
    method = FUSED if fused <= dequant else DEQUANT_GEMM
    return Choice(rows, method, best if method == FUSED else None, fused, dequant)
