"""`replayllm info` and `replayllm tokenize`: look inside a GGUF without loading its weights."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from ..errors import ReplayLLMError


def add_commands(sub) -> None:
    info = sub.add_parser("info", help="metadata, tensor types and sizes, parameter count")
    info.add_argument("path", help="GGUF file")
    info.set_defaults(run=run_info)

    tok = sub.add_parser("tokenize", help="print the token ids of TEXT as a JSON list")
    tok.add_argument("text")
    tok.add_argument("--model", "-m", help="GGUF file (default: SmolLM2-135M-Instruct)")
    tok.add_argument("--no-bos", action="store_true", help="do not add the BOS token")
    tok.set_defaults(run=run_tokenize)


def run_tokenize(args: argparse.Namespace) -> int:
    from ..default_model import default_model_path
    from ..engine.model_file import open_model_file

    model_file = open_model_file(args.model or default_model_path())
    try:
        ids = model_file.tokenizer.encode(args.text, add_bos=False if args.no_bos else None)
    finally:
        model_file.close()
    print(json.dumps(ids))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..gguf import read_gguf

    if not Path(args.path).is_file():
        raise ReplayLLMError(f"{args.path}: no such file")
    with read_gguf(args.path) as f:
        print(f"file: {f.path}")
        print(f"GGUF version {f.version}, {len(f.metadata)} metadata keys, {len(f.tensors)} tensors")
        print("\nmetadata:")
        for key, value in f.metadata.items():
            print(f"  {key} = {_short(value)}")
        print("\ntensor types:")
        by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        for info in f.tensors.values():
            row = by_type[info.type_name]
            row[0] += 1
            row[1] += info.n_elements
            row[2] += info.nbytes
        print(f"  {'type':<6} {'tensors':>8} {'parameters':>15} {'bytes':>12}")
        for name, (count, elements, nbytes) in sorted(by_type.items(), key=lambda kv: -kv[1][2]):
            print(f"  {name:<6} {count:>8} {elements:>15,} {_size(nbytes):>12}")
        n_params = sum(i.n_elements for i in f.tensors.values())
        n_bytes = sum(i.nbytes for i in f.tensors.values())
        print(f"\nparameters: {n_params:,} ({n_params / 1e9:.2f} B), tensor data {_size(n_bytes)}, "
              f"{8 * n_bytes / max(n_params, 1):.2f} bits per weight")
        print("\ntensors:")
        for info in f.tensors.values():
            print(f"  {info.name:<32} {info.type_name:<6} {str(list(info.shape)):<20} {_size(info.nbytes):>10}")
    return 0


def _short(value, limit: int = 100) -> str:
    if isinstance(value, list):
        head = ", ".join(repr(v) for v in value[:8])
        return f"[{head}{', ...' if len(value) > 8 else ''}] ({len(value)} items)"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""
