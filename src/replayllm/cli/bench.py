"""`replayllm bench`: llama-bench's ppN / tgN table, plus achieved bandwidth and the roofline."""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from ..errors import InvalidParameterError
from .generate import add_decode_options, add_prefill_option


def add_commands(sub) -> None:
    bench = sub.add_parser("bench", help="prompt processing and generation speed (llama-bench compatible)")
    bench.add_argument("model", help="GGUF file (see `replayllm synth` for large synthetic ones)")
    bench.add_argument("-p", "--n-prompt", default="512", help="prompt tokens, comma list (0: skip)")
    bench.add_argument("-n", "--n-gen", default="128", help="generated tokens, comma list (0: skip)")
    bench.add_argument("-r", "--repetitions", type=int, default=5)
    bench.add_argument("-d", "--n-depth", default="0", help="context depth before the test, comma list")
    bench.add_argument("-b", "--batch-size", type=int,
                       help="prompt chunk size of the pp tests (default: the loaded model's prefill chunk)")
    bench.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    bench.add_argument("--mode", default="graph", help="GPU decode mode (see generate --help)")
    add_prefill_option(bench)
    add_decode_options(bench)
    bench.add_argument("--kernels", action="store_true",
                       help="also show where a decode step's GPU time goes, kernel by kernel (CUDA only)")
    bench.add_argument("--json", help="write all results and the environment to this file")
    bench.add_argument("--quiet", "-q", action="store_true")
    bench.set_defaults(run=run_bench)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InvalidParameterError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise InvalidParameterError(f"{flag} values must be >= 0, got {text!r}")
    return values


def run_bench(args: argparse.Namespace) -> int:
    from ..bench.bandwidth import measure_copy_gbps
    from ..bench.device_info import environment
    from ..bench.llama_bench import BenchTest, markdown_table, model_facts, run_test
    from ..engine import LLM
    from ..engine.llm import check_prefill_chunk

    check_prefill_chunk(args.prefill_chunk)  # before the model file is opened
    if args.kernels and args.device == "cpu":
        raise InvalidParameterError("--kernels records GPU kernels: it needs --device cuda (or auto with a GPU)")
    if args.repetitions < 1:
        raise InvalidParameterError(f"-r must be >= 1, got {args.repetitions}")
    if args.batch_size is not None and args.batch_size < 1:
        raise InvalidParameterError(f"-b must be >= 1, got {args.batch_size}")
    depths = _int_list(args.n_depth, "-d") or [0]
    shapes = [("pp", n, d) for d in depths for n in _int_list(args.n_prompt, "-p") if n]
    shapes += [("tg", n, d) for d in depths for n in _int_list(args.n_gen, "-n") if n]
    if not shapes:
        raise InvalidParameterError("nothing to run: give -p and/or -n values above 0")
    needed = max(depth + n for _, n, depth in shapes) + 2
    if args.kernels:  # the breakdown steps through context of its own (bench/step_breakdown)
        from ..bench.step_breakdown import context_needed

        needed = max(needed, min(context_needed(), _model_context(args.model)))
    llm = LLM(args.model, device=args.device, mode=args.mode, progress=not args.quiet,
              max_context=min(max(needed, 16), _model_context(args.model)),
              int8_activations=args.int8_activations, pdl=args.pdl, prefill_chunk=args.prefill_chunk,
              activations=args.activations, prefill_graphs=args.prefill_graphs, kv_cache=args.kv_cache)
    if needed > llm.max_context_tokens:
        raise InvalidParameterError(f"depth + tokens = {needed} exceeds the model's context "
                                    f"({llm.max_context_tokens})")
    # The reference backend has no prefill chunk of its own: llama-bench's default there.
    batch = args.batch_size or getattr(llm.backend, "prefill_chunk_tokens", 2048)
    tests = [BenchTest(kind, n, depth, batch) for kind, n, depth in shapes]
    device = llm.backend.device if hasattr(llm.backend, "device") else None
    import torch

    device = device or torch.device("cpu")
    copy_gbps = measure_copy_gbps(device) if device.type == "cuda" else None
    facts = model_facts(llm._model_file.gguf, llm.config)
    results = []
    with tqdm(total=len(tests) * args.repetitions, desc="bench", disable=args.quiet, leave=False) as bar:
        for test in tests:
            results.append(run_test(llm.backend, test, facts, llm.config.vocab_size, args.repetitions,
                                    copy_gbps, on_sample=lambda: bar.update(1)))
    print(markdown_table(results))
    breakdowns = _kernel_breakdowns(llm) if args.kernels else []
    env = environment(device)
    if copy_gbps:
        print(f"\n{env['device']}: measured copy bandwidth {copy_gbps:.0f} GB/s (read + write); "
              f"commit {env['commit']}, {env['date']}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kind": "bench", **env, "copy_gbps": copy_gbps,
                       "results": [r.to_json() for r in results],
                       "step_kernels": [b.to_json() for b in breakdowns]}, f, indent=2)
    llm.close()
    return 0


def _kernel_breakdowns(llm) -> list:
    """The decode step's kernels at context 64 (bench/step_breakdown), as loaded and, where PDL is on, with it
    off (each kernel's own time); each printed as a table."""
    from ..bench.step_breakdown import breakdown_table, positions_within, record_as_loaded_and_without_pdl

    backend = llm.backend
    if not getattr(backend, "is_cuda", False):
        raise InvalidParameterError("--kernels records GPU kernels, and this model was loaded on the CPU (no "
                                    "usable CUDA GPU)")
    out = record_as_loaded_and_without_pdl(backend, positions_within(llm.max_context_tokens))
    for b in out:
        print(f"\ndecode step kernels ({backend.name if b.settings['pdl'] == backend.bufs.pdl else 'PDL off'}):")
        print(breakdown_table(b))
    return out


def _model_context(path: str) -> int:
    from ..engine.model_file import open_model_file

    model_file = open_model_file(path)
    try:
        return model_file.config.max_context_tokens
    finally:
        model_file.close()
