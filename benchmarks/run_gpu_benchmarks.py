"""Everything the GPU machine measures, in one run, within a wall-clock budget.

Writes under --out: results.json (correctness, start-up, memory), bench.json and bench.md (`replayllm bench`
format), profile.json and profile.png (`replayllm profile` format), and summary.txt, the short summary.

Stages, most important first; each records its own failure and the run goes on, and a stage that would start
after the deadline is skipped (and says so), so a run under a wall-clock limit still brings back the first results:
1. llama2-7b Q4_K_M (synthetic, `replayllm synth`): load once with a 4096-token context (start-up time and the
   memory report), correctness against the fp32 torch reference run on the GPU, bench (pp512, tg128, tg128 deep
   in the context, 4-step graphs), profile of every decode mode. Then the memory claim: loaded again under a
   6 GiB per-process cap (default prefill chunk, chosen for the memory left), a 4095-token prompt and 1 token.
2. llama2-13b Q4_K_M (written in the background once the 7B profile is done): bench and profile.
3. llama2-7b Q4_K_M loaded again: start-up with Triton's kernel cache warm.
4. A 16k-token prompt on a 16k-context model.
Between 1 and 2: the default model's greedy agreement with the fp32 reference on chat prompts, for the default
and the int8-activation paths.
With --only types: llama2-7b F16 and Q8_0 (written here), bench and graph == eager; a run of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

from replayllm import LLM, SamplingParams
from replayllm.bench.agreement import greedy_agreement
from replayllm.bench.bandwidth import measure_copy_gbps
from replayllm.bench.device_info import environment
from replayllm.bench.llama_bench import BenchTest, markdown_table, model_facts, run_test

SYNTH_DIR = Path(os.environ.get("REPLAYLLM_SYNTH_DIR", "/tmp/replayllm-synth"))
CONTEXT = 4096  # llama2's trained context: the deep test sits as far into it as tg128 still fits
DEEP = CONTEXT - 256
LOGIT_TOLERANCE = 1e-2


class Run:
    def __init__(self, out: Path, deadline_s: float):
        self.out, self.deadline = out, time.perf_counter() + deadline_s
        self.summary: list[str] = []
        self.results: dict = {}
        self.bench_rows: list = []
        self.profile_rows: list = []

    def stage(self, name: str, fn, *args):
        left = self.deadline - time.perf_counter()
        if left <= 0:
            self.summary.append(f"[skipped: out of time] {name}")
            return None
        started = time.perf_counter()
        print(f"==== {name} ({left:.0f} s left)", flush=True)
        try:
            result = fn(*args)
            self.summary.append(f"[ok {time.perf_counter() - started:5.0f}s] {name}")
            return result
        except Exception as exc:  # keep going: later stages still report
            traceback.print_exc()
            self.summary.append(f"[FAILED] {name}: {type(exc).__name__}: {str(exc)[:300]}")
            return None
        finally:
            self.flush()

    def flush(self) -> None:
        env = environment(torch.device("cuda"))
        (self.out / "results.json").write_text(json.dumps({"kind": "gpu-suite", **env, **self.results}, indent=1))
        if self.bench_rows:
            (self.out / "bench.json").write_text(json.dumps(
                {"kind": "bench", **env, "copy_gbps": self.results.get("copy_gbps"),
                 "results": [r.to_json() for r in self.bench_rows]}, indent=1))
            (self.out / "bench.md").write_text(markdown_table(self.bench_rows) + "\n")
        if self.profile_rows:
            (self.out / "profile.json").write_text(json.dumps(
                {"kind": "profile", **env, "profiles": [r.to_json() for r in self.profile_rows]}, indent=1))
        (self.out / "summary.txt").write_text("\n".join(self.summary) + "\n")


def start_synth(shape: str, quant: str) -> subprocess.Popen | None:
    """Write a synthetic model in the background (12 workers: this process keeps cores of its own)."""
    path = SYNTH_DIR / f"{shape}-{quant}.gguf"
    if path.exists():
        return None
    return subprocess.Popen([sys.executable, "-m", "replayllm.cli.main", "synth", "--shape", shape, "--quant", quant,
                             "--workers", "12", "--quiet", str(path)])


def wait_for(path: Path, timeout_s: float) -> Path:
    started = time.perf_counter()
    while not path.exists():
        if time.perf_counter() - started > timeout_s:
            raise TimeoutError(f"{path} did not appear within {timeout_s:.0f} s")
        time.sleep(1)
    return path


def load(run: Run, key: str, path: Path, mode: str = "graph", **options) -> LLM:
    """options: LLM's (kv_cache="int8", ...)."""
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    llm = LLM(path, device="cuda", mode=mode, max_context=CONTEXT, progress=False, **options)
    total = time.perf_counter() - started
    b, gib = llm.backend, 2**30
    info = {"total_s": total, "load_s": b.load_seconds, "startup_s": b.startup_seconds,
            "weights_gib": b.memory.weights_bytes / gib, "kv_cache_gib": b.memory.kv_cache_bytes / gib,
            "workspace_gib": b.memory.workspace_bytes / gib, "total_gib": b.memory.total_bytes / gib,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / gib,
            "reserved_gib": torch.cuda.memory_reserved() / gib, "context_tokens": CONTEXT,
            "prefill_scratch_gib": 0.0 if b.prefiller.scratch is None else b.prefiller.scratch.nbytes / gib,
            "prefill_graph_gib": b.memory.prefill_graph_bytes / gib,
            "prefill_graph_capture_s": 0.0 if b.prefill_graphs is None else b.prefill_graphs.capture_seconds,
            "peak_after_gib": {phase: peak / gib for phase, peak in b.load_peaks.items()}}
    run.results[key] = info
    phases = ", ".join(f"{phase} {peak:.2f}" for phase, peak in info["peak_after_gib"].items())
    run.summary.append(f"    {key}: ready in {total:.1f} s (weights loaded in {b.load_seconds:.1f} s, prefill "
                       f"graphs captured in {info['prefill_graph_capture_s']:.1f} s); {b.memory}; "
                       f"peak allocated {info['peak_allocated_gib']:.2f} GiB (peak after {phases})")
    return llm


@contextmanager
def decode_options(llm: LLM, activations: str | None = None, pdl: bool | None = None):
    """Inside: the backend with the decode activation form ("16bit", "int8", "f32") and / or PDL set as given
    (None: as it was); on leaving, both as they were. Each switch recaptures the decode graphs."""
    b = llm.backend
    before = (b.bufs.activations, b.bufs.pdl)
    try:
        if activations is not None:
            b.set_activations(activations)
        if pdl is not None:
            b.set_pdl(pdl)
        yield
    finally:
        if b.bufs.activations != before[0]:
            b.set_activations(before[0])
        if b.bufs.pdl != before[1]:
            b.set_pdl(before[1])


def correctness(run: Run, llm: LLM, path: Path) -> None:
    """GPU (graph and eager, PDL on and off) against the fp32 reference on the GPU: logits, and 32 greedy tokens
    on 3 prompts. The int8-activation path is scored against both the fp32 reference and the int8 reference (the
    fp32 reference with the int8 path's products, models/int8_reference.py)."""
    from replayllm.engine.reference_backend import ReferenceBackend

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, llm.config.vocab_size, (n,), generator=gen).tolist() for n in (16, 5, 40)]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    b = llm.backend
    pdl_default = b.bufs.pdl
    tokens = {}
    for mode in ("graph", "eager"):
        b.set_mode(mode)
        tokens[mode] = [llm.generate([p], params)[0].token_ids for p in prompts]
    b.set_mode("graph")
    with decode_options(llm, pdl=not pdl_default):
        tokens["graph-pdl-switched"] = [llm.generate([p], params)[0].token_ids for p in prompts]
    gpu_logits = llm.logits(prompts[0])
    decode = {"default": b.decode_logits(prompts[2] + tokens["graph"][2], len(prompts[2]))}
    with decode_options(llm, activations="f32"):  # the exact path the 16-bit default replaced
        tokens["graph-f32"] = [llm.generate([p], params)[0].token_ids for p in prompts]
        decode["f32"] = b.decode_logits(prompts[2] + tokens["graph"][2], len(prompts[2]))
    with decode_options(llm, activations="int8"):
        tokens["graph-int8"] = [llm.generate([p], params)[0].token_ids for p in prompts]
        decode["int8"] = b.decode_logits(prompts[2] + tokens["graph"][2], len(prompts[2]))
    reference = ReferenceBackend(llm.model_file, 256, progress=False, device="cuda")
    try:
        ref_logits = reference.logits(prompts[0])
        ref_tokens = [list(reference.generate_ids(p, params, 0, 32)) for p in prompts]
        agreements = [greedy_agreement(reference.logits(p + t), len(p), t) for p, t in zip(prompts, tokens["graph"])]
        f32 = [greedy_agreement(reference.logits(p + t), len(p), t) for p, t in zip(prompts, tokens["graph-f32"])]
        int8 = [greedy_agreement(reference.logits(p + t), len(p), t) for p, t in zip(prompts, tokens["graph-int8"])]
        int8_vs_int8_ref = [greedy_agreement(reference.int8_reference_logits(p + t, len(p)), len(p), t)
                            for p, t in zip(prompts, tokens["graph-int8"])]
        teacher = prompts[2] + tokens["graph"][2]
        decode_ref = reference.logits(teacher)[len(prompts[2]):]
        decode_int8_ref = reference.int8_reference_logits(teacher, len(prompts[2]))[len(prompts[2]):]
    finally:
        del reference
        torch.cuda.empty_cache()

    def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
        return ((a - ref).abs().max() / ref.abs().max()).item()

    result = {
        "model": str(path.name), "metric": "max |gpu - ref| / max |ref| over the prefill logit matrix",
        "max_rel_logit_error": rel(gpu_logits, ref_logits), "tolerance": LOGIT_TOLERANCE,
        "argmax_equal_every_position": bool(torch.equal(gpu_logits.argmax(-1), ref_logits.argmax(-1))),
        "greedy_32_identical_to_reference": [t == r for t, r in zip(tokens["graph"], ref_tokens)],
        "greedy_32_max_relative_shortfall": [a.max_relative_shortfall for a in agreements],
        "greedy_32_first_divergence": [a.first_divergence for a in agreements],
        "graph_equals_eager": tokens["graph"] == tokens["eager"],
        "pdl_default": pdl_default,
        "graph_pdl_switched_equals_graph": tokens["graph-pdl-switched"] == tokens["graph"],
        "decode_step_metric": "max |step - ref| / max |ref| over 32 teacher-forced decode steps' logits",
        "default_activations": b.bufs.activations,
        "decode_step_rel_error_default_vs_fp32": rel(decode["default"], decode_ref),
        "decode_step_rel_error_f32_activations_vs_fp32": rel(decode["f32"], decode_ref),
        "decode_step_rel_error_default_vs_f32_activations": rel(decode["default"], decode["f32"]),
        "f32_greedy_32_identical_to_reference": [t == r for t, r in zip(tokens["graph-f32"], ref_tokens)],
        "f32_greedy_32_first_divergence": [a.first_divergence for a in f32],
        "default_greedy_32_identical_to_f32_activations":
            [t == r for t, r in zip(tokens["graph"], tokens["graph-f32"])],
        "decode_step_rel_error_int8_vs_fp32": rel(decode["int8"], decode_ref),
        "decode_step_rel_error_int8_vs_int8_reference": rel(decode["int8"], decode_int8_ref),
        "decode_step_rel_error_int8_reference_vs_fp32": rel(decode_int8_ref, decode_ref),
        "int8_greedy_32_identical_to_reference": [t == r for t, r in zip(tokens["graph-int8"], ref_tokens)],
        "int8_greedy_32_first_divergence": [a.first_divergence for a in int8],
        "int8_greedy_32_max_relative_shortfall": [a.max_relative_shortfall for a in int8],
        "int8_greedy_32_max_relative_shortfall_vs_int8_reference":
            [a.max_relative_shortfall for a in int8_vs_int8_ref],
        "tokens_graph": tokens["graph"], "tokens_reference": ref_tokens, "tokens_int8": tokens["graph-int8"],
    }
    run.results["correctness_7b"] = result
    run.summary.append(
        f"    7B correctness: max rel logit err {result['max_rel_logit_error']:.2e} (tol {LOGIT_TOLERANCE}), argmax "
        f"equal {result['argmax_equal_every_position']}, greedy32 identical "
        f"{result['greedy_32_identical_to_reference']}, max rel shortfall "
        f"{max(result['greedy_32_max_relative_shortfall']):.1e}, graph==eager {result['graph_equals_eager']}, "
        f"PDL on/off same tokens {result['graph_pdl_switched_equals_graph']}; decode-step logit err default "
        f"({result['default_activations']}) {result['decode_step_rel_error_default_vs_fp32']:.1e}, f32 activations "
        f"{result['decode_step_rel_error_f32_activations_vs_fp32']:.1e}, default vs f32 activations "
        f"{result['decode_step_rel_error_default_vs_f32_activations']:.1e}; f32-activation greedy32 identical "
        f"{result['f32_greedy_32_identical_to_reference']}, default == f32 activations "
        f"{result['default_greedy_32_identical_to_f32_activations']}; "
        f"int8 {result['decode_step_rel_error_int8_vs_fp32']:.1e} "
        f"(int8 reference vs fp32 {result['decode_step_rel_error_int8_reference_vs_fp32']:.1e}, int8 vs int8 "
        f"reference {result['decode_step_rel_error_int8_vs_int8_reference']:.1e}); int8 greedy32 first divergence "
        f"{result['int8_greedy_32_first_divergence']}, max rel shortfall vs fp32 "
        f"{max(result['int8_greedy_32_max_relative_shortfall']):.1e}, vs int8 reference "
        f"{max(result['int8_greedy_32_max_relative_shortfall_vs_int8_reference']):.1e}")


def kv_quantized_7b(run: Run, path: Path, kv_cache: str) -> None:
    """A quantized KV cache ("int8" or "q4") on the 7B Q4_K_M (a load of its own): tg128 at depth 0 and deep in
    the context (an int8 cache also with its attention's int8 products, set_int8_attention_products, and its f32
    multiply-adds, set_fma_attention_products; a q4 cache has those only); graph == eager; its error against the
    fp32 reference and against the reference that rounds keys and values the same way (ReferenceBackend
    kv_cache=kv_cache): prefill logits, 32 greedy tokens of 3 prompts, and the decode-step logits of 16
    teacher-forced steps after a prompt of DEEP tokens, where the rounding of thousands of cached keys and values
    adds up."""
    from replayllm.engine.reference_backend import ReferenceBackend

    llm = load(run, f"startup_7b_kv_{kv_cache}", path, kv_cache=kv_cache)
    try:
        bench(run, llm, [BenchTest("tg", 128)], ["graph"], 3)
        bench(run, llm, [BenchTest("tg", 128, depth=DEEP)], ["graph"], 2)
        if kv_cache == "int8":
            bench_with(run, llm, llm.backend.set_int8_attention_products)  # "-int8-products": no f16 conversion
            bench_fma_products(run, llm)  # "-fma-products": int8 values to f32 on the CUDA cores
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, llm.config.vocab_size, (n,), generator=gen).tolist() for n in (16, 5, 40)]
        deep = torch.randint(3, llm.config.vocab_size, (DEEP + 16,), generator=gen).tolist()
        params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
        b = llm.backend
        tokens = {}
        for mode in ("graph", "eager"):
            b.set_mode(mode)
            tokens[mode] = [llm.generate([p], params)[0].token_ids for p in prompts]
        b.set_mode("graph")
        gpu_logits = llm.logits(prompts[0])
        deep_logits = b.decode_logits(deep, DEEP)
        result = {"graph_equals_eager": tokens["graph"] == tokens["eager"], "tokens_graph": tokens["graph"],
                  "metric": "max |gpu - ref| / max |ref|", "deep_prompt_tokens": DEEP, "deep_decode_steps": 16}
        for name, reference_cache in (("fp32", "f16"), (f"{kv_cache}_kv_reference", kv_cache)):
            reference = ReferenceBackend(llm.model_file, DEEP + 32, progress=False, device="cuda",
                                         kv_cache=reference_cache)
            try:
                ref_logits = reference.logits(prompts[0])
                agreements = [greedy_agreement(reference.logits(p + t), len(p), t)
                              for p, t in zip(prompts, tokens["graph"])]
                ref_tokens = [list(reference.generate_ids(p, params, 0, 32)) for p in prompts]
                deep_ref = reference.logits(deep)[DEEP:]
            finally:
                del reference
                torch.cuda.empty_cache()
            rel = lambda a, ref: ((a - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
            result[f"vs_{name}"] = {
                "prefill_rel_logit_error": rel(gpu_logits, ref_logits),
                "argmax_equal_every_position": bool(torch.equal(gpu_logits.argmax(-1), ref_logits.argmax(-1))),
                "greedy_32_identical": [t == r for t, r in zip(tokens["graph"], ref_tokens)],
                "greedy_32_first_divergence": [a.first_divergence for a in agreements],
                "greedy_32_max_relative_shortfall": [a.max_relative_shortfall for a in agreements],
                "deep_decode_rel_logit_error": rel(deep_logits, deep_ref),
                "deep_decode_argmax_equal": int((deep_logits.argmax(-1) == deep_ref.argmax(-1)).sum()),
            }
    finally:
        llm.close()
        del llm
        torch.cuda.empty_cache()
    run.results[f"kv_{kv_cache}_7b"] = result
    parts = []
    for name in ("fp32", f"{kv_cache}_kv_reference"):
        r = result[f"vs_{name}"]
        parts.append(f"vs {name}: prefill {r['prefill_rel_logit_error']:.1e}, argmax equal "
                     f"{r['argmax_equal_every_position']}, greedy32 identical {r['greedy_32_identical']} (first "
                     f"divergence {r['greedy_32_first_divergence']}, max rel shortfall "
                     f"{max(r['greedy_32_max_relative_shortfall']):.1e}), decode at depth {DEEP} "
                     f"{r['deep_decode_rel_logit_error']:.1e} (argmax equal {r['deep_decode_argmax_equal']}/16)")
    run.summary.append(f"    7B {kv_cache} KV cache: graph==eager {result['graph_equals_eager']}; " + "; ".join(parts))


CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
                "Explain what a CUDA graph is in two sentences.", "List three prime numbers greater than 50."]


def default_model_agreement(run: Run) -> None:
    """The default (real) model: 48 greedy tokens of 4 chat prompts from the default path, the int8-activation
    path and the int8 KV cache, each against the fp32 reference: where they first differ from it, the int8
    tokens' largest shortfall under the fp32 and the int8 reference, and where the int8 KV cache's tokens first
    differ from its own reference's (keys and values rounded the same way)."""
    from replayllm.default_model import DEFAULT_MODEL, cache_dir
    from replayllm.engine.reference_backend import ReferenceBackend

    path = cache_dir() / "models" / DEFAULT_MODEL.file_name  # staged by gpu_suite.sh: this host has no network
    if not path.is_file():
        raise FileNotFoundError(f"the default model is not here ({path.name}): stage both halves first")
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    rows = []
    with LLM(path, device="cuda", max_context=512, progress=False) as llm:
        prompts = [llm.chat_prompt_ids([{"role": "user", "content": m}]) for m in CHAT_PROMPTS]
        default = [llm.generate([p], params)[0].token_ids for p in prompts]
        with decode_options(llm, activations="int8"):
            int8 = [llm.generate([p], params)[0].token_ids for p in prompts]
        reference = ReferenceBackend(llm.model_file, 512, progress=False, device="cuda")
        kv_reference = ReferenceBackend(llm.model_file, 512, progress=False, device="cuda", kv_cache="int8")
        with LLM(path, device="cuda", max_context=512, progress=False, kv_cache="int8") as kv_llm:
            kv_int8 = [kv_llm.generate([p], params)[0].token_ids for p in prompts]
        q4_reference = ReferenceBackend(llm.model_file, 512, progress=False, device="cuda", kv_cache="q4")
        with LLM(path, device="cuda", max_context=512, progress=False, kv_cache="q4") as q4_llm:
            kv_q4 = [q4_llm.generate([p], params)[0].token_ids for p in prompts]
        for p, d, q, kv, kv4 in zip(prompts, default, int8, kv_int8, kv_q4):
            ref = list(reference.generate_ids(p, params, 0, 48))
            kv_ref = list(kv_reference.generate_ids(p, params, 0, 48))
            q4_ref = list(q4_reference.generate_ids(p, params, 0, 48))
            rows.append({
                "prompt_tokens": len(p),
                "default_first_difference": next((i for i, (a, r) in enumerate(zip(d, ref)) if a != r), None),
                "int8_first_difference": next((i for i, (a, r) in enumerate(zip(q, ref)) if a != r), None),
                "int8_max_relative_shortfall_vs_fp32":
                    greedy_agreement(reference.logits(p + q), len(p), q).max_relative_shortfall,
                "int8_max_relative_shortfall_vs_int8_reference":
                    greedy_agreement(reference.int8_reference_logits(p + q, len(p)), len(p), q).max_relative_shortfall,
                "kv_int8_first_difference": next((i for i, (a, r) in enumerate(zip(kv, ref)) if a != r), None),
                "kv_int8_first_difference_from_its_reference":
                    next((i for i, (a, r) in enumerate(zip(kv, kv_ref)) if a != r), None),
                "kv_q4_first_difference": next((i for i, (a, r) in enumerate(zip(kv4, ref)) if a != r), None),
                "kv_q4_first_difference_from_its_reference":
                    next((i for i, (a, r) in enumerate(zip(kv4, q4_ref)) if a != r), None),
                "kv_q4_max_relative_shortfall_vs_its_reference":
                    greedy_agreement(q4_reference.logits(p + kv4), len(p), kv4).max_relative_shortfall,
            })
        del reference, kv_reference, q4_reference
    run.results["default_model_agreement"] = {"tokens": 48, "prompts": CHAT_PROMPTS, "rows": rows}
    run.summary.append(
        "    default model, 48 greedy tokens of 4 chat prompts, first difference from the fp32 reference (None: "
        f"none): default path {[r['default_first_difference'] for r in rows]}, int8 "
        f"{[r['int8_first_difference'] for r in rows]}; int8 max rel shortfall vs fp32 "
        f"{max(r['int8_max_relative_shortfall_vs_fp32'] for r in rows):.1e}, vs int8 reference "
        f"{max(r['int8_max_relative_shortfall_vs_int8_reference'] for r in rows):.1e}; int8 KV cache "
        f"{[r['kv_int8_first_difference'] for r in rows]} (from the reference that rounds keys and values the same "
        f"way: {[r['kv_int8_first_difference_from_its_reference'] for r in rows]}); q4 KV cache "
        f"{[r['kv_q4_first_difference'] for r in rows]} (from its own reference: "
        f"{[r['kv_q4_first_difference_from_its_reference'] for r in rows]}, max rel shortfall "
        f"{max(r['kv_q4_max_relative_shortfall_vs_its_reference'] for r in rows):.1e})")


def prefill_breakdown(run: Run, llm: LLM, key: str, n_tokens: int = 512) -> None:
    """Where one n-token prefill's time goes: wall time, GPU time, the top GPU kernels, the tuned methods."""
    from torch.profiler import ProfilerActivity, profile

    ids = [random.Random(0).randrange(3, llm.config.vocab_size) for _ in range(n_tokens)]
    for _ in range(2):
        llm.backend.prefill_only(ids, 2048)
    started = time.perf_counter()
    llm.backend.prefill_only(ids, 2048)
    wall_ms = 1e3 * (time.perf_counter() - started)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.backend.prefill_only(ids, 2048)
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    gpu_ms = sum(e.self_device_time_total for e in events) / 1e3
    top = [{"kernel": e.key[:90], "ms": e.self_device_time_total / 1e3, "calls": e.count} for e in events[:10]]
    # the same passes launched kernel by kernel (prefill graphs off): what the graphs save on the host
    graphs, llm.backend.prefill_graphs = llm.backend.prefill_graphs, None
    try:
        llm.backend.prefill_only(ids, 2048)
        launched = []
        for _ in range(3):
            started = time.perf_counter()
            llm.backend.prefill_only(ids, 2048)
            launched.append(1e3 * (time.perf_counter() - started))
    finally:
        llm.backend.prefill_graphs = graphs
    launched_ms = min(launched)
    run.results[key] = {"tokens": n_tokens, "wall_ms": wall_ms, "gpu_ms": gpu_ms, "top_kernels": top,
                        "prefill_graphs": graphs is not None, "launched_wall_ms": launched_ms,
                        "methods": llm.backend.prefiller.methods.as_json()}
    how = "one graph replay" if graphs is not None else "launched"
    run.summary.append(f"    {key}: {n_tokens}-token prefill {wall_ms:.1f} ms wall ({how}; {launched_ms:.1f} ms "
                       f"launched kernel by kernel), {gpu_ms:.1f} ms GPU; top: " +
                       ", ".join(f"{t['kernel'][:40]} {t['ms']:.2f} ms x{t['calls']}" for t in top[:5]))


def bench(run: Run, llm: LLM, tests: list[BenchTest], modes: list[str], reps: int) -> None:
    facts = model_facts(llm.model_file.gguf, llm.config)
    for mode in modes:
        llm.backend.set_mode(mode)
        for test in tests:
            row = run_test(llm.backend, test, facts, llm.config.vocab_size, reps, run.results["copy_gbps"])
            run.bench_rows.append(row)
            print(markdown_table([row]).splitlines()[-1], flush=True)
            run.flush()
    llm.backend.set_mode("graph")


def bench_variants(run: Run, llm: LLM) -> None:
    """tg128 with the decode options against the default (PDL on where the GPU has it, 16-bit activations, rope,
    attention and the merge as launches of their own, the greedy draw in one launch): the merge in the attention
    launch (at depth too; measured slower there, off); rope and the cache write in it too (measured slower,
    off); the greedy draw as
    torch's launches; the GEMVs' weight prefetch on; PDL off; f32 activations (the path the default replaced);
    int8 activations, with PDL on and off; each row's backend name says which. Then int8 + PDL deep in the
    context (its attention is a larger share of its step)."""
    pdl_default = llm.backend.bufs.pdl
    bench_fused_merge(run, llm)
    bench_fma_products(run, llm)
    llm.backend.set_fused_attention_merge(True)  # "-fused-merge-rope-in-attention"
    llm.backend.set_rope_in_attention(True)
    try:
        bench(run, llm, [BenchTest("tg", 128)], ["graph"], 3)
    finally:
        llm.backend.set_rope_in_attention(False)
        llm.backend.set_fused_attention_merge(False)
    llm.backend.set_one_launch_greedy(False)  # "-torch-greedy": the greedy draw as the torch sampler's launches
    try:
        bench(run, llm, [BenchTest("tg", 128)], ["graph"], 3)
    finally:
        llm.backend.set_one_launch_greedy(True)
    if pdl_default:  # the GEMVs' L2 prefetch before their PDL wait, on (the backend's name says "-prefetch")
        llm.backend.set_weight_prefetch(True)
        try:
            bench(run, llm, [BenchTest("tg", 128)], ["graph"], 3)
        finally:
            llm.backend.set_weight_prefetch(False)
    for activations, pdl in ((None, not pdl_default), ("f32", pdl_default), ("int8", pdl_default),
                             ("int8", not pdl_default)):
        with decode_options(llm, activations, pdl):
            bench(run, llm, [BenchTest("tg", 128)], ["graph"], 3)
            if activations == "int8" and pdl:
                bench(run, llm, [BenchTest("tg", 128, depth=DEEP)], ["graph"], 2)


def bench_with(run: Run, llm: LLM, setter) -> None:
    """tg128 at depth 0 and deep with an attention option on (`setter`, a GPUBackend method taking a bool; the
    rows' backend name says which), on the same load as the default rows, then the option off again."""
    setter(True)
    try:
        bench(run, llm, [BenchTest("tg", 128)], ["graph"], 3)
        bench(run, llm, [BenchTest("tg", 128, depth=DEEP)], ["graph"], 2)
    finally:
        setter(False)


def bench_fused_merge(run: Run, llm: LLM) -> None:
    """The attention merge in the attention launch ("-fused-merge"): its worth, on one machine."""
    bench_with(run, llm, llm.backend.set_fused_attention_merge)


def bench_fma_products(run: Run, llm: LLM) -> None:
    """Decode attention's products as f32 multiply-adds on the CUDA cores, one program per q head
    ("-fma-products")."""
    bench_with(run, llm, llm.backend.set_fma_attention_products)


def bench_default_shapes(run: Run, llm: LLM) -> None:
    """tg128 with the decode GEMVs at their kernels' default launch shapes instead of the shapes tuned at load
    (runner/gemv_tuning): what the tuning buys, on the same machine. The backend's name says "-default-shapes"."""
    backend = llm.backend
    tuned = backend.bufs.gemv_shapes
    backend.bufs.gemv_shapes = None
    backend._recapture()
    try:
        bench(run, llm, [BenchTest("tg", 128)], ["graph"], 3)
    finally:
        backend.bufs.gemv_shapes = tuned
        backend._recapture()


def time_to_first_token(backend, prompt_ids: list[int]) -> float:
    """Seconds from the request to its first token on the host (prefill, first sample, copy back)."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    torch.cuda.synchronize()
    started = time.perf_counter()
    tokens = backend.generate_ids(prompt_ids, params, 0, 1)
    try:
        next(tokens)
        return time.perf_counter() - started
    finally:
        tokens.close()


def ttft_7b(run: Run, llm: LLM) -> None:
    """Time to first token for a prompt filling the context (4095 tokens + 1 generated), median of 3."""
    ids = [random.Random(1).randrange(3, llm.config.vocab_size) for _ in range(CONTEXT - 1)]
    time_to_first_token(llm.backend, ids)  # warms up
    torch.cuda.reset_peak_memory_stats()
    times = sorted(time_to_first_token(llm.backend, ids) for _ in range(3))
    peak = torch.cuda.max_memory_allocated() / 2**30
    run.results["ttft_7b_4095_tokens_s"] = times[1]
    run.results["ttft_7b_peak_allocated_gib"] = peak
    run.summary.append(f"    7B time to first token, 4095-token prompt: {1e3 * times[1]:.0f} ms; peak allocated "
                       f"{peak:.2f} GiB")


FIT_BYTES = 6 * 2**30  # the memory claim: llama2-7B Q4_K_M with a 4096-token context, at load and at a full prompt


def fit_6gib_7b(run: Run, path: Path) -> None:
    """llama2-7B Q4_K_M in 6 GiB: under a per-process cap of FIT_BYTES, load with a 4096-token context and the
    default prefill chunk (so the load chooses it for the memory left), prefill a 4095-token prompt and generate
    1 token. Records torch's peak allocation (reset before the load) and the chunk chosen; an out-of-memory
    error is recorded as not fitting, and the stage fails. The cap is lifted again whatever happens."""
    gib = 2**30
    gc.collect()
    torch.cuda.empty_cache()  # the earlier models' cached blocks would count against the cap
    before = torch.cuda.memory_allocated()  # e.g. cuBLAS workspaces kept from the earlier stages
    result = {"cap_gib": FIT_BYTES / gib, "context_tokens": CONTEXT, "prompt_tokens": CONTEXT - 1,
              "allocated_before_load_gib": before / gib}
    run.results["fit_6gib_7b"] = result
    try:
        torch.cuda.set_per_process_memory_fraction(FIT_BYTES / torch.cuda.get_device_properties(0).total_memory)
        torch.cuda.reset_peak_memory_stats()
        with LLM(path, device="cuda", max_context=CONTEXT, progress=False) as llm:
            result["prefill_chunk_tokens"] = llm.backend.prefill_chunk_tokens
            result["memory_report"] = str(llm.backend.memory)
            result["load_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / gib
            # The cap counts reserved memory, free parts of split blocks included (only smaller requests fit there)
            result["reserved_after_load_gib"] = torch.cuda.memory_reserved() / gib
            result["inactive_split_after_load_gib"] = (torch.cuda.memory_stats()["inactive_split_bytes.all.current"]
                                                       / gib)
            ids = [random.Random(1).randrange(3, llm.config.vocab_size) for _ in range(CONTEXT - 1)]
            out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))[0]
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            result.update(generated_tokens=len(out.token_ids), peak_allocated_gib=peak / gib,
                          peak_reserved_gib=torch.cuda.max_memory_reserved() / gib,
                          fits=len(out.token_ids) == 1 and peak <= FIT_BYTES)
    except torch.OutOfMemoryError as exc:
        root = f"{Path(__file__).resolve().parents[1]}/"  # frames named from the repository's root
        where = [line.strip().replace(root, "") for line in traceback.format_exc().splitlines()
                 if line.lstrip().startswith("File ")]
        result.update(fits=False, error=str(exc)[:300], where=where[-4:],
                      peak_allocated_gib=torch.cuda.max_memory_allocated() / gib,
                      peak_reserved_gib=torch.cuda.max_memory_reserved() / gib)
        raise
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        gc.collect()
        torch.cuda.empty_cache()
        run.summary.append(
            f"    7B Q4_K_M, 4096-token context, under a 6 GiB cap: fits {result.get('fits')}; prefill chunk "
            f"{result.get('prefill_chunk_tokens')} tokens; peak allocated {result.get('peak_allocated_gib', 0):.2f} "
            f"GiB (load {result.get('load_peak_allocated_gib', 0):.2f}), reserved "
            f"{result.get('peak_reserved_gib', 0):.2f} GiB (after load {result.get('reserved_after_load_gib', 0):.2f}, "
            f"of which free in split blocks {result.get('inactive_split_after_load_gib', 0):.2f}), over the 4095-token "
            f"prompt and 1 token")
        if result.get("where"):
            run.summary.append(f"    out of memory in {result['where'][-2:]}")


def fit_6gib_7b_fresh(run: Run, path: Path) -> None:
    """fit_6gib_7b in a process of its own (`--only fit`): memory that the earlier stages of this one leave
    reserved would count against the cap. Its figures and summary line join this run's."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, __file__, "--only", "fit", "--out", tmp, "--fit-model", str(path)],
                              capture_output=True, text=True, timeout=240)
        results = Path(tmp) / "results.json"
        if results.exists():
            run.results["fit_6gib_7b"] = json.loads(results.read_text()).get("fit_6gib_7b")
        summary = Path(tmp) / "summary.txt"
        if summary.exists():
            run.summary.extend(line for line in summary.read_text().splitlines() if line.strip())
    if done.returncode != 0:
        root = f"{Path(__file__).resolve().parents[1]}/"
        frames = [line.strip().replace(root, "") for line in done.stderr.splitlines()
                  if line.lstrip().startswith("File ")]
        raise RuntimeError(f"the fit process failed ({done.returncode}) in {frames[-3:]}: {done.stderr[-300:]}")


def long_prompt(run: Run) -> None:
    """A 16,000-token prompt on a (tiny) model with a 16k context: it works, and what prefill's memory peaks at."""
    from replayllm.synth import write_model
    from replayllm.synth.shapes import get_shape

    path = SYNTH_DIR / "tiny-16k-q8_0.gguf"
    if not path.exists():
        write_model(dataclasses.replace(get_shape("tiny"), context_length=16384), "q8_0", path, progress=False)
    with LLM(path, device="cuda", max_context=16384, progress=False) as llm:
        ids = [random.Random(2).randrange(3, llm.config.vocab_size) for _ in range(16000)]
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        seconds = time_to_first_token(llm.backend, ids)
        out = llm.generate([ids], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
        peak = torch.cuda.max_memory_allocated() - before
    run.results["long_prompt_16k"] = {"prompt_tokens": 16000, "generated": len(out.token_ids),
                                      "ttft_s": seconds, "prefill_peak_extra_gib": peak / 2**30,
                                      "chunk_tokens": 2048}
    run.summary.append(f"    16k-context tiny model, 16,000-token prompt: first token in {seconds:.2f} s, "
                       f"{len(out.token_ids)} tokens generated, prefill peak +{peak / 2**30:.2f} GiB over the "
                       f"loaded model (chunks of 2048)")


def profile(run: Run, llm: LLM, modes: tuple[str, ...], n_tokens: int) -> None:
    from replayllm.bench.profiler import profile_modes

    run.profile_rows += profile_modes(llm, modes, n_tokens)
    llm.backend.set_mode("graph")


def kernels(run: Run, llm: LLM) -> None:
    from replayllm.bench.kernel_bench import kernel_rows, kernel_table

    rows = kernel_rows(llm.backend, 512) + kernel_rows(llm.backend, DEEP)[-1:]
    for activations in ("16bit", "int8"):  # the integer-dot GEMVs, the same bytes
        rows += kernel_rows(llm.backend, 0, attention=False, activations=activations)
    step = [r.gpu_ms for r in run.profile_rows if r.mode == "graph"]
    step_us = 1e3 * step[0] if step else None
    shapes = llm.backend.bufs.gemv_shapes
    tuned = shapes.as_json() if shapes is not None else []
    run.results["kernels_7b"] = {"step_gpu_us": step_us, "rows": [r.to_json() for r in rows], "gemv_shapes": tuned}
    run.summary.append(kernel_table(rows, step_us, run.results["copy_gbps"]))
    run.summary.append("decode GEMV shapes (tuned at load): " + "; ".join(
        f"{t['type']} {t['n_rows']}x{t['n_cols']} {t['form']}: {t['shape']}" for t in tuned))


def decode_breakdown(run: Run, llm: LLM, positions: int = 64, replays: int = 20) -> None:
    """Where one decode step's GPU time goes (bench/step_breakdown): the kernels of `replays` greedy graph
    replays at context `positions`, with PDL as loaded and with it off (each kernel's own time)."""
    from replayllm.bench.step_breakdown import record_as_loaded_and_without_pdl

    out = {}
    for r in record_as_loaded_and_without_pdl(llm.backend, positions, replays):
        pdl = r.settings["pdl"]
        out["pdl" if pdl else "no_pdl"] = r.to_json()
        run.summary.append(
            f"    decode step kernels, PDL {pdl}, context {positions}: {r.step_us:.0f} us a step, "
            f"{r.launches_per_step} launches, GPU busy {r.busy_us_per_step:.0f} us, idle {r.idle_us_per_step:.0f} us; "
            + ", ".join(f"{t.kernel[:28]} {t.us_per_step:.0f} us x{t.launches_per_step:.0f}" for t in r.by_name[:8]))
    run.results["decode_kernels_7b"] = out


def draw_profile(run: Run) -> None:
    from replayllm.bench.chart import draw

    env = environment(torch.device("cuda"))
    draw(run.profile_rows, str(run.out / "profile.png"),
         f"replayllm per-token critical path, {env['device']}, commit {env['commit']}, {env['date'][:10]}")


def other_types(run: Run) -> None:
    """The decode-speed targets' other 7B files, F16 and Q8_0 (written here, one after the other: ~13 and ~7 GB):
    tg128 and pp512 in graph mode (and with the experimental options that apply), graph == eager on 16 greedy tokens."""
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    for quant in ("f16", "q8_0"):
        path = SYNTH_DIR / f"llama2-7b-{quant}.gguf"
        writer = start_synth("llama2-7b", quant)
        if writer is not None and run.stage(f"write llama2-7b {quant}", writer.wait) != 0:
            continue
        llm = run.stage(f"load llama2-7b {quant}", load, run, f"startup_7b_{quant}", path)
        if not llm:
            continue
        run.stage(f"bench llama2-7b {quant}", bench, run, llm, [BenchTest("tg", 128), BenchTest("pp", 512)],
                  ["graph"], 2)
        # The decode options that apply, against the default (PDL on where the GPU has it): PDL off; for Q8_0
        # also f32 and int8 activations (F16 has no integer-dot GEMV: it always takes f32 activations).
        pdl_default = llm.backend.bufs.pdl
        variants = [(None, not pdl_default)] + ([("f32", pdl_default), ("int8", pdl_default)] if quant == "q8_0"
                                                else [])
        for activations, pdl in variants:
            with decode_options(llm, activations, pdl):
                run.stage(f"bench llama2-7b {quant} activations {activations or 'default'} PDL {pdl}", bench, run,
                          llm, [BenchTest("tg", 128)], ["graph"], 2)
        tokens = {}
        for mode in ("graph", "eager"):
            llm.backend.set_mode(mode)
            tokens[mode] = llm.generate([[1, 450, 4996, 17354]], params)[0].token_ids
        run.results[f"graph_equals_eager_7b_{quant}"] = tokens["graph"] == tokens["eager"]
        run.summary.append(f"    7B {quant}: graph == eager on 16 greedy tokens: {tokens['graph'] == tokens['eager']}")
        llm.close()
        del llm
        torch.cuda.empty_cache()
        path.unlink()  # disk: the next file needs the room


def copy_bandwidth(run: Run) -> None:
    run.results["copy_gbps"] = measure_copy_gbps(torch.device("cuda"))
    run.summary.append(f"copy bandwidth {run.results['copy_gbps']:.0f} GB/s (read + write)")


def first_7b_rows(run: Run) -> tuple[Path | None, LLM | None]:
    """Wait for the 7B Q4_K_M file, load it (cold kernel cache) and bench tg128, pp512 and tg128 deep in the
    context: the rows every run starts with. Returns (the file, the loaded model), None where a stage failed."""
    q7 = run.stage("wait for llama2-7b q4_k_m", wait_for, SYNTH_DIR / "llama2-7b-q4_k_m.gguf", 240)
    if not q7:
        return None, None
    llm = run.stage("load llama2-7b Q4_K_M (cold kernel cache), ctx 4096", load, run, "startup_7b_cold", q7)
    if llm:
        run.stage("bench llama2-7b Q4_K_M", bench, run, llm, [BenchTest("tg", 128), BenchTest("pp", 512)],
                  ["graph"], 3)
        run.stage("bench llama2-7b Q4_K_M deep", bench, run, llm, [BenchTest("tg", 128, depth=DEEP)], ["graph"], 2)
    return q7, llm


def rows_13b(run: Run, wait_s: float, *more_stages: tuple) -> None:
    """13B Q4_K_M tg128 and pp512 once its file is there (written in the background, up to wait_s more seconds),
    then `more_stages`, each (name, fn, *args after run and the model)."""
    q13 = SYNTH_DIR / "llama2-13b-q4_k_m.gguf"
    if not (q13.exists() or run.stage("wait for llama2-13b q4_k_m", wait_for, q13, wait_s)):
        return
    llm = run.stage("load llama2-13b Q4_K_M", load, run, "startup_13b", q13)
    if not llm:
        return
    run.stage("bench llama2-13b Q4_K_M", bench, run, llm, [BenchTest("tg", 128), BenchTest("pp", 512)], ["graph"], 2)
    for name, fn, *args in more_stages:
        run.stage(name, fn, run, llm, *args)
    llm.close()
    del llm
    torch.cuda.empty_cache()


def finish(run: Run, synth_13b: subprocess.Popen | None) -> None:
    if run.bench_rows:
        run.summary.append(markdown_table(run.bench_rows))
    if synth_13b is not None and synth_13b.poll() is None:
        synth_13b.terminate()
    run.flush()


def targets(run: Run) -> None:
    """`--only targets`: the issue's Q4_K_M rows at today's defaults, with few comparisons (the variants of a full
    run measured the rest): 7B tg128 and pp512, tg128 deep in the context, the same with attention's products on
    the CUDA cores (fma), the step kernel by kernel, the 7B checks against the fp32 reference, the int8 KV cache (speed and
    accuracy), the default model's greedy agreement, then 13B tg128 and pp512."""
    copy_bandwidth(run)
    q7, llm = first_7b_rows(run)
    synth_13b = None
    if llm:
        synth_13b = start_synth("llama2-13b", "q4_k_m")
        # beside the f16 load (memory enough on one GPU): the newest change first
        run.stage("llama2-7b Q4_K_M with the q4 KV cache: speed and accuracy", kv_quantized_7b, run, q7, "q4")
        run.stage("llama2-7b Q4_K_M with the int8 KV cache: speed and accuracy", kv_quantized_7b, run, q7, "int8")
        run.stage("bench llama2-7b Q4_K_M, attention products on the CUDA cores", bench_fma_products, run, llm)
        run.stage("decode step kernel breakdown llama2-7b Q4_K_M", decode_breakdown, run, llm)
        run.stage("correctness llama2-7b Q4_K_M vs fp32 reference", correctness, run, llm, q7)
        llm.close()
        del llm
        torch.cuda.empty_cache()
    run.stage("default model: greedy agreement of the default and int8 paths", default_model_agreement, run)
    rows_13b(run, 150)
    finish(run, synth_13b)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--deadline-s", type=float, default=400.0, help="start no stage after this many seconds")
    parser.add_argument("--fit-model", default=None, help="with --only fit: the 7B Q4_K_M file")
    parser.add_argument("--only", choices=["types", "fit", "targets"], default=None,
                        help="types: only the 7B F16 and Q8_0 files (a run of its own: they take minutes to write); "
                             "fit: only the 7B Q4_K_M under a 6 GiB cap, in a process that has loaded nothing else; "
                             "targets: the decode-speed targets' Q4_K_M rows alone (7B at depth 0 and deep, 13B), "
                             "the step breakdown and the correctness checks")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, args.deadline_s)
    if args.only == "fit":
        run.stage("llama2-7b Q4_K_M in 6 GiB: 4096-token context, 4095-token prompt + 1 token", fit_6gib_7b, run,
                  Path(args.fit_model) if args.fit_model else SYNTH_DIR / "llama2-7b-q4_k_m.gguf")
        run.flush()
        if run.results.get("fit_6gib_7b", {}).get("fits") is not True:
            sys.exit(1)
        return
    if args.only == "types":
        run.results["copy_gbps"] = measure_copy_gbps(torch.device("cuda"))
        other_types(run)
        if run.bench_rows:
            run.summary.append(markdown_table(run.bench_rows))
        run.flush()
        return
    if args.only == "targets":
        targets(run)
        return
    synth_13b = None
    from replayllm.bench.profiler import DEFAULT_MODES, table

    copy_bandwidth(run)
    q7, llm = first_7b_rows(run)
    if q7:
        if llm:
            # The newest changes' comparisons first, so that a run cut short by its deadline still has them.
            run.stage("bench llama2-7b Q4_K_M decode variants", bench_variants, run, llm)
            run.stage("decode step kernel breakdown llama2-7b Q4_K_M", decode_breakdown, run, llm)
            run.stage("correctness llama2-7b Q4_K_M vs fp32 reference", correctness, run, llm, q7)
            run.stage("profile llama2-7b Q4_K_M", profile, run, llm, DEFAULT_MODES, 64)
            synth_13b = start_synth("llama2-13b", "q4_k_m")  # after the profile: no host contention there
            run.stage("bench llama2-7b Q4_K_M, GEMVs at the kernels' default shapes", bench_default_shapes, run, llm)
            run.stage("kernels llama2-7b Q4_K_M", kernels, run, llm)
            run.stage("bench llama2-7b Q4_K_M 4-step", bench, run, llm, [BenchTest("tg", 128)], ["graph-4step"], 2)
            run.stage("time to first token llama2-7b Q4_K_M, 4095-token prompt", ttft_7b, run, llm)
            run.stage("prefill breakdown llama2-7b Q4_K_M", prefill_breakdown, run, llm, "prefill_7b")
            llm.close()
            del llm
            torch.cuda.empty_cache()
        run.stage("llama2-7b Q4_K_M in 6 GiB (own process): 4096-token context, 4095-token prompt + 1 token",
                  fit_6gib_7b_fresh, run, q7)
    run.stage("default model: greedy agreement of the default and int8 paths", default_model_agreement, run)
    rows_13b(run, 90, ("profile llama2-13b Q4_K_M", profile, ("eager", "graph"), 64),
             ("prefill breakdown llama2-13b Q4_K_M", prefill_breakdown, "prefill_13b"))
    if q7:
        llm = run.stage("load llama2-7b Q4_K_M again (warm kernel cache)", load, run, "startup_7b_warm", q7)
        if llm:
            llm.close()
    run.stage("16,000-token prompt on a 16k-context model", long_prompt, run)
    if run.profile_rows:
        run.stage("profile chart", draw_profile, run)
        run.summary.append(table(run.profile_rows))
    finish(run, synth_13b)


if __name__ == "__main__":
    main()
