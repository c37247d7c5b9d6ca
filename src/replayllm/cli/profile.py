"""`replayllm profile`: the per-token critical path of each decode mode, as a table, JSON and a chart."""

from __future__ import annotations

import argparse
import json

from .generate import add_decode_options


def add_commands(sub) -> None:
    prof = sub.add_parser("profile", help="split each token's time into GPU work and host activities, per mode")
    prof.add_argument("models", nargs="+", metavar="MODEL", help="GGUF files (e.g. from `replayllm synth`)")
    prof.add_argument("--modes", default="eager,graph-host-sampling,graph,graph-4step",
                      help="comma list of decode modes")
    prof.add_argument("-n", "--n-tokens", type=int, default=128, help="tokens per mode (after warm-up)")
    prof.add_argument("--json", help="write the results to this file")
    prof.add_argument("--png", help="draw the chart to this file")
    add_decode_options(prof)
    prof.add_argument("--quiet", "-q", action="store_true")
    prof.set_defaults(run=run_profile)


def run_profile(args: argparse.Namespace) -> int:
    import torch

    from ..bench.device_info import environment
    from ..bench.profiler import profile_modes, table
    from ..engine import LLM
    from ..engine.decode_mode import DecodeMode
    from ..errors import InvalidParameterError

    if args.n_tokens < 4:
        raise InvalidParameterError(f"-n must be >= 4, got {args.n_tokens}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        DecodeMode.parse(mode)  # a bad mode name fails before any model loads
    if not torch.cuda.is_available():
        raise InvalidParameterError("profile measures the GPU decode modes and needs a CUDA device")
    rows = []
    for path in args.models:
        llm = LLM(path, device="cuda", mode="graph", progress=not args.quiet, max_context=min(1024, _context(path)),
                  int8_activations=args.int8_activations, pdl=args.pdl, activations=args.activations,
                  kv_cache=args.kv_cache)
        try:
            rows += profile_modes(llm, modes, args.n_tokens)
        finally:
            llm.close()
    print(table(rows))
    env = environment(torch.device("cuda"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kind": "profile", **env, "profiles": [r.to_json() for r in rows]}, f, indent=2)
    if args.png:
        from ..bench.chart import draw

        draw(rows, args.png, f"replayllm per-token critical path, {env['device']}, commit {env['commit']}, "
                             f"{env['date'][:10]}")
    return 0


def _context(path: str) -> int:
    from ..engine.model_file import open_model_file

    model_file = open_model_file(path)
    try:
        return model_file.config.max_context_tokens
    finally:
        model_file.close()
