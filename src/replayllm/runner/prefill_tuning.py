"""Which way prefill multiplies by each weight, chosen by measurement on the device.

Two ways: FUSED (kernels/quant_matmul reads the quantized blocks and feeds the tensor cores) and DEQUANT_GEMM
(dequantize into an f16 scratch, then the vendor GEMM). Which is faster depends on the type, the shape and the
number of prompt rows: the vendor GEMM is the faster multiplier, but expanding the weight to f16 costs a write
and a read of 2 bytes a weight, which only many rows amortise. `tune_methods` times both, once, for every
distinct weight shape at a few row counts (buckets), and `LinearMethods` answers for any T from the bucket at
or above it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..kernels.quant_weight import QuantWeight

FUSED = "fused"
DEQUANT_GEMM = "dequant_gemm"
TUNING_BUCKETS = (16, 128, 512, 2048)  # prompt rows at which both methods are timed


def shape_key(w: QuantWeight) -> tuple[str, int, int]:
    return (w.ggml_type.name, w.n_rows, w.n_cols)


@dataclass
class LinearMethods:
    """(type, n_rows, n_cols) -> [(bucket rows, method, fused ms, dequant ms)], buckets ascending. Shapes not
    measured use FUSED."""

    table: dict[tuple[str, int, int], list[tuple[int, str, float, float]]] = field(default_factory=dict)

    def get(self, w: QuantWeight, rows: int) -> str:
        entries = self.table.get(shape_key(w))
        if not entries:
            return FUSED
        for bucket, method, _, _ in entries:
            if rows <= bucket:
                return method
        return entries[-1][1]

    def as_json(self) -> list[dict]:
        return [{"type": k[0], "n_rows": k[1], "n_cols": k[2], "rows": bucket, "method": method,
                 "fused_ms": round(fused, 4) if fused != float("inf") else None,
                 "dequant_gemm_ms": round(dequant, 4)}
                for k, entries in self.table.items() for bucket, method, fused, dequant in entries]


def _time_ms(fn, reps: int = 3) -> float:
    """Median CUDA-event time of fn() after one warm-up call (which also compiles)."""
    fn()
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def tune_methods(prefiller, chunk_tokens: int) -> LinearMethods:
    """Time FUSED and DEQUANT_GEMM for each distinct weight shape of the layers at the buckets up to
    chunk_tokens; the faster wins per bucket. (Not the LM head: prefill multiplies it for one row, with the
    decode GEMV, except for all-position logits, which take the FUSED default.)"""
    from ..kernels.quant_matmul import quant_matmul

    weights = prefiller.weights
    device = weights.output_norm.device
    buckets = [b for b in TUNING_BUCKETS if b < chunk_tokens] + [chunk_tokens]
    used = [w for layer in weights.layers for w in (*layer.qkv, layer.attn_output, *layer.gate_up, layer.ffn_down)]
    distinct = {shape_key(w): w for w in used}
    methods = LinearMethods()
    for key, w in distinct.items():
        entries = []
        for rows in buckets:
            x = torch.randn(rows, w.n_cols, device=device)
            out = torch.empty(rows, w.n_rows, device=device)
            dequant = _time_ms(lambda: prefiller.dequant_gemm(x, w, out, None, False))
            try:
                fused = _time_ms(lambda: quant_matmul(x, w, out))
            except Exception as exc:  # e.g. a launch shape this GPU cannot hold: the vendor GEMM does it all
                warnings.warn(f"prefill: the quantized GEMM failed for {key} at {rows} rows ({exc!r:.200}); "
                              f"using dequantize + GEMM there", stacklevel=2)
                fused = float("inf")
            entries.append((rows, FUSED if fused <= dequant else DEQUANT_GEMM, fused, dequant))
        methods.table[key] = entries
    if all(m == FUSED for entries in methods.table.values() for _, m, _, _ in entries):
        prefiller.scratch = None  # the timing made it; nothing will use it
    return methods
