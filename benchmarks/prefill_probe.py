"""Where a 512-token prefill's time goes: the torch profiler's table of GPU kernels for one pp512 pass.

Usage: python benchmarks/prefill_probe.py MODEL.gguf --out DIR   (writes DIR/prefill_profile.txt)
The prefill path (runner/prefill.py) multiplies by each weight with the quantized GEMM or, where measured faster
at load, dequantize + vendor GEMM (DIR/prefill_methods.json lists the choices); this table says how the time
splits between those, attention, and the small kernels around them.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from replayllm import LLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    llm = LLM(args.model, device="cuda", max_context=max(1024, args.tokens + 1), progress=False)
    ids = [random.Random(0).randrange(llm.config.vocab_size) for _ in range(args.tokens)]
    for _ in range(2):
        llm.backend.prefill_only(ids, 2048)  # warm-up: compilation, cuBLAS handles, allocator
    started = time.perf_counter()
    llm.backend.prefill_only(ids, 2048)
    wall_ms = 1e3 * (time.perf_counter() - started)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.backend.prefill_only(ids, 2048)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    text = (f"{args.tokens}-token prefill: {wall_ms:.1f} ms wall unprofiled "
            f"({args.tokens / wall_ms * 1e3:.0f} tokens/s)\n\n{table}\n")
    (out / "prefill_profile.txt").write_text(text)
    methods = llm.backend.prefiller.methods.as_json()
    (out / "prefill_methods.json").write_text(json.dumps(methods, indent=1))
    for m in methods:
        print(f"prefill method {m['type']} {m['n_rows']}x{m['n_cols']} rows {m['rows']}: {m['method']} "
              f"{m['config'] or ''} (fused {m['fused_ms']} ms, dequant+gemm {m['dequant_gemm_ms']} ms)")
    print(text.splitlines()[0])
    print("\n".join(table.splitlines()[:16]))
    llm.close()


if __name__ == "__main__":
    main()
