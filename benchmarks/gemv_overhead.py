"""What a decode GEMV launch costs beyond its bytes: the 16-bit Q4_K GEMV at 4,096 columns and 1,024 to 32,768
rows, 24 launches on 24 copies (nothing from L2) per CUDA-graph replay, with PDL off and on, at two launch
shapes; and a kernel that does nothing, as the floor of a launch in a graph. A least-squares fit of
time = fixed + bytes / rate over the sizes splits each launch into a fixed cost (launch, ramp, first round trip
to memory, tail) and a streaming rate: the part of a 7B step's GEMV time that more bandwidth cannot buy back.

Writes --out/gemv_overhead.json and prints one line per point and the fits. Usage:
python benchmarks/gemv_overhead.py --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType

from replayllm.bench.kernel_bench import time_graph_replay
from replayllm.kernels import pack_weight
from replayllm.kernels.int8_activations import QuantizedActivations, quantize_activations
from replayllm.kernels.pdl import _pdl_wait, launch_options
from replayllm.kernels.quant_matvec_q8 import quant_matvec_q8
from replayllm.synth.random_rows import random_gguf_rows

ROWS = (1024, 2048, 4096, 8192, 16384, 32768)
N_COLS = 4096
COPIES = 24
SHAPES = ({"block_n": 1, "chunks": 32, "num_warps": 1, "rows": 4},  # the tuned gate_up / QK shape
          {"block_n": 4, "chunks": 64, "num_warps": 4, "rows": 1})  # the tuned attn_output shape


@triton.jit
def _empty_kernel(out_ptr, USE_PDL: tl.constexpr):
    _pdl_wait(USE_PDL)
    if tl.program_id(0) == 0:
        tl.store(out_ptr, 1.0)


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(fixed us, GB/s) of time_us = fixed + bytes / rate, least squares over (bytes, us)."""
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_t = sum(t for _, t in points) / n
    slope = sum((b - mean_b) * (t - mean_t) for b, t in points) / sum((b - mean_b) ** 2 for b, _ in points)
    return mean_t - slope * mean_b, 1e-3 / slope  # slope in us per byte -> GB/s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    out_dir = parser.parse_args().out
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0)
    xq = quantize_activations(torch.randn(1, N_COLS, device="cuda"),
                              QuantizedActivations.allocate(1, N_COLS, "cuda", wide=True))
    results = {"device": device, "copies": COPIES, "n_cols": N_COLS, "points": [], "fits": [], "empty": []}
    flag = torch.zeros(1, device="cuda")
    for pdl in (False, True):
        def empty_body():
            for _ in range(COPIES):
                _empty_kernel[(132,)](flag, **launch_options(pdl))
        us = 1e3 * time_graph_replay(empty_body) / COPIES
        results["empty"].append({"pdl": pdl, "us_per_launch": us})
        print(f"empty kernel, 132 programs, pdl={pdl}: {us:.2f} us a launch in a graph", flush=True)
    base = random_gguf_rows(GGMLQuantizationType.Q4_K, max(ROWS), N_COLS, 0)
    for n_rows in ROWS:
        first = pack_weight(GGMLQuantizationType.Q4_K, base[:n_rows], N_COLS).to("cuda")
        weights = [dataclasses.replace(first, **{k: v.clone() for k, v in first.tensors().items()})
                   for _ in range(COPIES)]
        n_bytes = weights[0].nbytes
        out = torch.empty(1, n_rows, device="cuda")
        for shape in SHAPES:
            for pdl in (False, True):
                def body():
                    for w in weights:
                        quant_matvec_q8(xq, w, out, pdl=pdl, **shape)
                us = 1e3 * time_graph_replay(body) / COPIES
                results["points"].append({"n_rows": n_rows, "bytes": n_bytes, "shape": shape, "pdl": pdl,
                                          "us_per_launch": us, "gbps": n_bytes / us / 1e3})
                print(f"Q4_K {n_rows:5d} x {N_COLS} ({n_bytes / 1e6:5.1f} MB) {shape} pdl={pdl}: {us:6.2f} us, "
                      f"{n_bytes / us / 1e3:5.0f} GB/s", flush=True)
        del weights
        (out_dir / "gemv_overhead.json").write_text(json.dumps(results, indent=1))
    for shape in SHAPES:
        for pdl in (False, True):
            points = [(p["bytes"], p["us_per_launch"]) for p in results["points"] if p["shape"] == shape
                      and p["pdl"] == pdl]
            fixed, rate = fit(points)
            results["fits"].append({"shape": shape, "pdl": pdl, "fixed_us": fixed, "streaming_gbps": rate})
            print(f"gemv_overhead fit {shape} pdl={pdl}: {fixed:.2f} us fixed a launch + bytes at {rate:.0f} GB/s",
                  flush=True)
    (out_dir / "gemv_overhead.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
