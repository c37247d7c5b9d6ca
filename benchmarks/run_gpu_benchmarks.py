"""Everything the GPU machine measures, in one run: writes JSON/PNG under --out and a short summary.txt.

1. synthetic models (replayllm synth) with real shapes; 2. correctness of the GPU path on llama2-7b Q4_K_M
against the fp32 torch reference (run on the GPU for speed); 3. start-up time and memory of a 7B model with a
4096-token context; 4. `replayllm bench` tests; 5. `replayllm profile` of every decode mode.
Each stage records its own failure and the run goes on, so one broken stage never hides the others.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path

import torch

from replayllm import LLM, SamplingParams
from replayllm.bench.bandwidth import measure_copy_gbps
from replayllm.bench.device_info import environment
from replayllm.bench.llama_bench import BenchTest, markdown_table, model_facts, run_test
from replayllm.synth import write_synthetic_model

SYNTH_DIR = Path(os.environ.get("REPLAYLLM_SYNTH_DIR", "/tmp/replayllm-synth"))
summary: list[str] = []


def stage(name):
    def wrap(fn):
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
                summary.append(f"[ok {time.perf_counter() - started:5.0f}s] {name}")
                return result
            except Exception as exc:  # keep going: later stages still report
                traceback.print_exc()
                summary.append(f"[FAILED] {name}: {type(exc).__name__}: {str(exc)[:300]}")
                return None
        return run
    return wrap


def synth(shape: str, quant: str) -> Path:
    path = SYNTH_DIR / f"{shape}-{quant}.gguf"
    if not path.exists():
        SYNTH_DIR.mkdir(parents=True, exist_ok=True)
        write_synthetic_model(shape, quant, path, progress=False, workers=os.cpu_count())
    return path


@stage("correctness: llama2-7b Q4_K_M, GPU vs fp32 reference on the GPU")
def check_7b(path: Path, out: Path) -> None:
    from replayllm.engine.model_file import open_model_file
    from replayllm.engine.reference_backend import ReferenceBackend

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32000, (n,), generator=gen).tolist() for n in (16, 5, 40)]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    model_file = open_model_file(path)
    reference = ReferenceBackend(model_file, 256, progress=False, device="cuda")
    ref_logits = reference.logits(prompts[0])
    ref_tokens = [list(reference.generate_ids(p, params, 0, 32)) for p in prompts]
    del reference
    torch.cuda.empty_cache()
    result = {}
    for mode in ("graph", "eager"):
        with LLM(path, device="cuda", mode=mode, max_context=256, progress=False) as llm:
            logits = llm.logits(prompts[0])
            result[mode] = {
                "max_rel_logit_error": ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item(),
                "argmax_equal": bool(torch.equal(logits.argmax(-1), ref_logits.argmax(-1))),
                "greedy_32_equal": [llm.generate([p], params)[0].token_ids == t for p, t in zip(prompts, ref_tokens)],
                "tokens": [llm.generate([p], params)[0].token_ids for p in prompts],
            }
    result["graph_equals_eager"] = result["graph"]["tokens"] == result["eager"]["tokens"]
    (out / "correctness_7b.json").write_text(json.dumps(result, indent=1))
    g = result["graph"]
    summary.append(f"    7B: max rel logit err {g['max_rel_logit_error']:.2e}, argmax equal {g['argmax_equal']}, "
                   f"greedy32 equal {g['greedy_32_equal']}, graph==eager {result['graph_equals_eager']}")


@stage("start-up and memory: llama2-7b Q4_K_M, 4096-token context")
def startup_7b(path: Path, out: Path) -> None:
    runs = []
    for _ in range(2):  # the second load finds Triton's kernel cache warm
        started = time.perf_counter()
        llm = LLM(path, device="cuda", max_context=4096, progress=False)
        total = time.perf_counter() - started
        b = llm.backend
        runs.append({"total_s": total, "load_s": b.load_seconds, "startup_s": b.startup_seconds,
                     "weights_gib": b.memory.weights_bytes / 2**30, "kv_gib": b.memory.kv_cache_bytes / 2**30,
                     "workspace_gib": b.memory.workspace_bytes / 2**30, "total_gib": b.memory.total_bytes / 2**30,
                     "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30})
        llm.close()
        torch.cuda.reset_peak_memory_stats()
    (out / "startup_7b.json").write_text(json.dumps(runs, indent=1))
    w = runs[-1]
    summary.append(f"    7B ctx4096: start-up {w['total_s']:.1f} s (warm Triton cache), memory "
                   f"{w['total_gib']:.2f} GiB (weights {w['weights_gib']:.2f}, KV {w['kv_gib']:.2f}, "
                   f"workspace {w['workspace_gib']:.2f}), peak allocated {w['max_allocated_gib']:.2f} GiB")


@stage("bench")
def bench(models: list[tuple[Path, list[BenchTest], str]], copy_gbps: float, out: Path, reps: int) -> None:
    results = []
    for path, tests, mode in models:
        needed = max(t.depth + t.n_tokens for t in tests) + 2
        with LLM(path, device="cuda", mode=mode, max_context=max(needed, 640), progress=False) as llm:
            facts = model_facts(llm.model_file.gguf, llm.config)
            for test in tests:
                results.append(run_test(llm.backend, test, facts, llm.config.vocab_size, reps, copy_gbps))
                print(markdown_table(results[-1:]).splitlines()[-1], flush=True)
    env = environment(torch.device("cuda"))
    (out / "bench.json").write_text(json.dumps({"kind": "bench", **env, "copy_gbps": copy_gbps,
                                               "results": [r.to_json() for r in results]}, indent=1))
    table = markdown_table(results)
    (out / "bench.md").write_text(table + "\n")
    summary.append(table)


@stage("profile")
def profile(paths: list[Path], out: Path, n_tokens: int) -> None:
    from replayllm.bench.chart import draw
    from replayllm.bench.profiler import DEFAULT_MODES, profile_modes, table

    rows = []
    for path in paths:
        with LLM(path, device="cuda", max_context=1024, progress=False) as llm:
            rows += profile_modes(llm, DEFAULT_MODES, n_tokens)
    env = environment(torch.device("cuda"))
    (out / "profile.json").write_text(json.dumps({"kind": "profile", **env,
                                                 "profiles": [r.to_json() for r in rows]}, indent=1))
    draw(rows, str(out / "profile.png"), f"replayllm per-token critical path, {env['device']}, "
                                         f"commit {env['commit']}, {env['date'][:10]}")
    summary.append(table(rows))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="7B Q4_K_M only, fewer repetitions")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    copy_gbps = measure_copy_gbps(torch.device("cuda"))
    summary.append(f"copy bandwidth {copy_gbps:.0f} GB/s (read + write)")
    q4 = stage("synth llama2-7b q4_k_m")(synth)("llama2-7b", "q4_k_m")
    if q4:
        check_7b(q4, out)
        startup_7b(q4, out)
    plan = [(q4, [BenchTest("pp", 512), BenchTest("tg", 128), BenchTest("tg", 128, depth=4096)], "graph")]
    if not args.quick:
        plan.append((q4, [BenchTest("tg", 128)], "graph-4step"))
        for shape, quant in (("llama2-13b", "q4_k_m"), ("llama2-7b", "q8_0"), ("llama2-7b", "f16")):
            path = stage(f"synth {shape} {quant}")(synth)(shape, quant)
            if path:
                plan.append((path, [BenchTest("pp", 512), BenchTest("tg", 128)], "graph"))
    bench([p for p in plan if p[0]], copy_gbps, out, reps=2 if args.quick else 3)
    q13 = SYNTH_DIR / "llama2-13b-q4_k_m.gguf"
    profile([p for p in (q4, q13 if q13.exists() else None) if p], out, 64 if args.quick else 128)
    (out / "summary.txt").write_text("\n".join(summary) + "\n")


if __name__ == "__main__":
    main()
