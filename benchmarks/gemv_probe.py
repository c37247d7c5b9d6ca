"""Why is the decode GEMV at a quarter of the copy bandwidth? The evidence for the next change, in one call.

Runs `quant_matvec` on random packed weights of llama2-7b's gate|up shape (22016 x 4096) in Q4_K and of the
down shape (4096 x 11008) in Q6_K, 24 copies of each so that nothing is served from L2, and writes under --out:
- probe.json: per type, achieved GB/s (CUDA events over graph replays), registers and spills per thread, and
  shared memory of the compiled kernel; the same for the experimental int8-activation Q4_K kernel
  (kernels/quant_matvec_q8.py), with its difference from the default kernel's result;
- with --cubins, `<type>-<i>.cubin` of the compiled kernel (disassemble with `cuobjdump --dump-sass`; off in
  the GPU suite's `probe` mode, which brings back at most 8 files and compiles the SASS locally instead with
  benchmarks/gemv_sass.py). The suite also runs this script under Nsight Compute (--launches).
Usage: python benchmarks/gemv_probe.py --out DIR [--launches N] [--cubins]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from gguf import GGMLQuantizationType

from replayllm.bench.kernel_bench import time_graph_replay
from replayllm.kernels import pack_weight, quant_matvec
from replayllm.synth.random_rows import random_gguf_rows

T = GGMLQuantizationType
SHAPES = {T.Q4_K: (22016, 4096), T.Q6_K: (4096, 11008)}
COPIES = 24


def random_weight(ggml_type: GGMLQuantizationType, n_rows: int, n_cols: int, seed: int, device: str = "cuda"):
    """Random blocks with every bit pattern of the quants and no inf or NaN, packed for the kernels."""
    return pack_weight(ggml_type, random_gguf_rows(ggml_type, n_rows, n_cols, seed), n_cols).to(device)


def compiled_facts(kernel, out: Path, name: str, write_cubins: bool = False) -> list[dict]:
    """Registers, spills and shared memory of every compiled variant of `kernel` (its caches are cleared before
    each type, so these are that type's); with write_cubins each variant's cubin to a file. Triton's caches are internal
    and change between versions: any failure is recorded, never raised."""
    facts = []
    try:
        caches = [entry[0] if isinstance(entry, tuple) else entry for entry in kernel.device_caches.values()]
        for i, compiled in enumerate(c for cache in caches for c in cache.values()):
            compiled._init_handles()
            facts.append({"n_regs": compiled.n_regs, "n_spills": compiled.n_spills,
                          "shared_bytes": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps})
            if write_cubins:
                (out / f"{name}-{i}.cubin").write_bytes(compiled.asm["cubin"])
    except Exception as exc:  # introspection only: the timings stand without it
        facts.append({"introspection_error": repr(exc)})
    return facts


def probe_q8(weights, x, y, out: Path, write_cubins: bool = False) -> dict:
    """The experimental int8-activation Q4_K kernel on the same weights: its GB/s (quantizing the activations
    once per launch included, as the decode step would), and its agreement with the default kernel."""
    from replayllm.kernels.int8_activations import QuantizedActivations, quantize_activations
    from replayllm.kernels.quant_matvec_q8 import _kquant_matvec_q8_kernel, quant_matvec_q8

    xq = QuantizedActivations.allocate(1, x.shape[1], "cuda")
    reference = torch.empty_like(y)
    quant_matvec(x, weights[0], reference)
    quantize_activations(x, xq)
    quant_matvec_q8(xq, weights[0], y)
    agreement = ((y - reference).norm() / reference.norm()).item()

    def body():
        for w in weights:
            quantize_activations(x, xq)
            quant_matvec_q8(xq, w, y)
    if hasattr(_kquant_matvec_q8_kernel, "device_caches"):
        _kquant_matvec_q8_kernel.device_caches.clear()
    ms = time_graph_replay(body)
    nbytes = sum(w.nbytes for w in weights)
    return {"us_per_launch": 1e3 * ms / len(weights), "gbps": nbytes / (ms * 1e-3) / 1e9,
            "relative_difference_to_default_kernel": agreement,
            "compiled": compiled_facts(_kquant_matvec_q8_kernel, out, "Q4_K-q8", write_cubins)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--launches", type=int, default=0, help="just run N launches of each (for ncu)")
    parser.add_argument("--cubins", action="store_true", help="also write each compiled kernel's cubin")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from replayllm.kernels.quant_matvec import _quant_matvec_kernel

    results = {}
    for ggml_type, (n_rows, n_cols) in SHAPES.items():
        weights = [random_weight(ggml_type, n_rows, n_cols, seed) for seed in range(COPIES)]
        x = torch.randn(1, n_cols, device="cuda")
        y = torch.empty(1, n_rows, device="cuda")
        if args.launches:
            for i in range(args.launches):
                quant_matvec(x, weights[i % COPIES], y)
            if ggml_type == T.Q4_K:  # the int8-activation kernel too (its own ncu pass filters by name)
                from replayllm.kernels.int8_activations import QuantizedActivations, quantize_activations
                from replayllm.kernels.quant_matvec_q8 import quant_matvec_q8
                xq = quantize_activations(x, QuantizedActivations.allocate(1, n_cols, "cuda"))
                for i in range(args.launches):
                    quant_matvec_q8(xq, weights[i % COPIES], y)
            torch.cuda.synchronize()
            continue
        if hasattr(_quant_matvec_kernel, "device_caches"):
            _quant_matvec_kernel.device_caches.clear()

        def body(weights=weights, x=x, y=y):
            for w in weights:
                quant_matvec(x, w, y)
        ms = time_graph_replay(body)
        nbytes = sum(w.nbytes for w in weights)
        results[ggml_type.name] = {"shape": [n_rows, n_cols], "us_per_launch": 1e3 * ms / COPIES,
                                   "gbps": nbytes / (ms * 1e-3) / 1e9,
                                   "compiled": compiled_facts(_quant_matvec_kernel, out, ggml_type.name,
                                                              args.cubins)}
        print(ggml_type.name, results[ggml_type.name], flush=True)
        if ggml_type == T.Q4_K:
            results["Q4_K-int8-activations"] = probe_q8(weights, x, y, out, args.cubins)
            print("Q4_K-int8-activations", results["Q4_K-int8-activations"], flush=True)
        del weights
    if results:
        (out / "probe.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
