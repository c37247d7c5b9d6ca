"""`replayllm synth`: write a synthetic GGUF with a real model's shapes and quantization mix."""

from __future__ import annotations

import argparse


def add_commands(sub) -> None:
    from ..synth import QUANTS, SHAPES

    synth = sub.add_parser("synth", help="write a random-weight GGUF with a real model's shapes")
    synth.add_argument("out", help="output .gguf path")
    synth.add_argument("--shape", required=True, choices=sorted(SHAPES))
    synth.add_argument("--quant", required=True, choices=list(QUANTS))
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--workers", type=int, help="processes (default: all cores)")
    synth.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    synth.add_argument("--quiet", "-q", action="store_true")
    synth.set_defaults(run=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from ..synth import write_synthetic_model

    path = write_synthetic_model(args.shape, args.quant, args.out, seed=args.seed, progress=not args.quiet,
                                 workers=args.workers, overwrite=args.force)
    print(path)
    return 0
