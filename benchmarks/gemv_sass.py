"""Compile the decode GEMV for Hopper (sm_90) on any machine, no GPU needed, and show what its inner loop does.

Triton's package carries ptxas and cuobjdump, so the kernel's machine code can be read where it is written:
registers, shared memory, local memory (spills), and the instruction mix of the K loop (the body between the
loop's backward branch and its target). Loads 16 bytes wide (LDG.E.128), barriers (BAR.SYNC) and shared-memory
round trips (STS/LDS/LDSM: Triton converting a tensor between layouts) are what to look at first.

    python benchmarks/gemv_sass.py Q4_K --n-cols 4096 [--block-n 8 --groups 16 --warps 4 --stages 1] [--out DIR]

The machine code comes from the local Triton, whose version may differ from the one on the GPU host.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
from pathlib import Path

import triton
from gguf import GGMLQuantizationType

from replayllm.bench.hopper_compile import compile_for_hopper
from replayllm.kernels.quant_dequant import plan_steps
from replayllm.kernels.quant_matvec import _quant_matvec_kernel
from replayllm.kernels.quant_weight import FLOAT_TYPES, _LAYOUTS

T = GGMLQuantizationType
_POINTER = {"x_ptr": "*fp32", "out_ptr": "*fp32", "bias_ptr": "*fp32"}
_FIELD_OF_ARG = {"qs_ptr": "qs", "qh_ptr": "qh", "sc_ptr": "scales", "mn_ptr": "mins", "d_ptr": "d", "dm_ptr": "dmin"}
_TRITON_DTYPE = {"uint8": "*u8", "int8": "*i8", "float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}
_ALIGNED_INTS = ("stride_qs", "stride_qh", "stride_sc", "stride_d", "n_cols", "stride_xb", "stride_ob")


def compile_gemv(ggml_type: GGMLQuantizationType, n_cols: int, block_n: int, groups: int, warps: int, stages: int):
    layout = _LAYOUTS[ggml_type]
    w_stub = type("W", (), {"ggml_type": ggml_type, "n_cols": n_cols})  # plan_steps reads only these two
    plan = plan_steps(w_stub, groups)
    constants = dict(QTYPE=int(ggml_type), IS_FLOAT=ggml_type in FLOAT_TYPES, S=plan.groups, W=plan.width,
                     BLOCK_N=block_n, BLOCK_B=1, HAS_BIAS=False, ACCUMULATE=False, F16_PRODUCT=False,
                     USE_PDL=False)
    types = {}
    for name in _quant_matvec_kernel.arg_names:
        if name in _POINTER:
            types[name] = _POINTER[name]
        elif name in _FIELD_OF_ARG:
            field = _FIELD_OF_ARG[name]
            if name == "mn_ptr" and "scales_hi" in layout:  # the K-quants' min slot: their scales' top bits
                field = "scales_hi"
            dtype = layout.get(field, layout["qs"])[0]  # absent fields get a placeholder, as weight_args does
            types[name] = _TRITON_DTYPE[str(dtype).removeprefix("torch.")]
        else:
            types[name] = "i32"
    aligned = [n for n, t in types.items() if t.startswith("*") or n in _ALIGNED_INTS]
    return compile_for_hopper(_quant_matvec_kernel, types, constants, aligned, warps, stages), plan


def compile_q8_gemv(n_cols: int, block_n: int, chunks: int, warps: int, stages: int, wide: bool = False,
                    rows: int = 1):
    """The integer-dot Q4_K kernel (kernels/quant_matvec_q8.py), with dp4a: int8 activations, or 16-bit ones
    (`wide`: int64 activation words, two byte planes); `rows` row tiles a program."""
    from replayllm.kernels.quant_matvec_q8 import _kquant_matvec_q8_kernel

    pointers = {"xq_ptr": "*i64" if wide else "*i32", "xs_ptr": "*fp32", "xsum_ptr": "*fp32", "out_ptr": "*fp32",
                "bias_ptr": "*fp32",
                "qs_ptr": "*i32", "qh_ptr": "*i32", "sc_ptr": "*u8", "mn_ptr": "*u8", "d_ptr": "*fp16",
                "dm_ptr": "*fp16"}
    constants = dict(C=chunks, BLOCK_N=block_n, ROWS=rows, HAS_QH=False, HAS_BIAS=False, ACCUMULATE=False, WIDE=wide,
                     USE_DP4A=True, USE_PDL=False)
    types = {n: pointers.get(n, "i32") for n in _kquant_matvec_q8_kernel.arg_names if n not in constants}
    aligned = [n for n in types if n in pointers or n.startswith("stride")]
    kernel = compile_for_hopper(_kquant_matvec_q8_kernel, types, constants, aligned, warps, stages)
    return kernel, block_n * rows * chunks * 64


def loop_histogram(sass: str) -> collections.Counter:
    """Opcode counts of the first backward-branching loop in the SASS listing."""
    lines = sass.splitlines()
    address = {}
    for i, line in enumerate(lines):
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if m:
            address[int(m.group(1), 16)] = i
    for i, line in enumerate(lines):
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?BRA\s+(0x[0-9a-f]+)", line)
        if m and int(m.group(3), 16) < int(m.group(1), 16):
            body = lines[address[int(m.group(3), 16)]: i + 1]
            ops = collections.Counter()
            for b in body:
                op = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", b)
                if op:
                    ops[op.group(1)] += 1
            return ops
    return collections.Counter()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("type", choices=sorted(t.name for t in _LAYOUTS))
    parser.add_argument("--n-cols", type=int, default=4096)
    parser.add_argument("--block-n", type=int, default=8)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=1)
    parser.add_argument("--q8", action="store_true", help="the int8-activation Q4_K kernel (--groups: chunks)")
    parser.add_argument("--wide", action="store_true", help="with --q8: the 16-bit-activation variant")
    parser.add_argument("--rows", type=int, default=1, help="with --q8: row tiles a program")
    parser.add_argument("--out", default="/tmp/gemv-sass")
    args = parser.parse_args()
    ggml_type = T[args.type]
    if args.q8:
        kernel, weights_per_step = compile_q8_gemv(args.n_cols, args.block_n, args.groups, args.warps, args.stages,
                                                   args.wide, args.rows)
        plan = None
    else:
        kernel, plan = compile_gemv(ggml_type, args.n_cols, args.block_n, args.groups, args.warps, args.stages)
        weights_per_step = args.block_n * plan.groups * 2 * plan.width
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (f"{args.type}-k{args.n_cols}-n{args.block_n}-g{args.groups}-w{args.warps}-s{args.stages}"
                  + ("-q8" if args.q8 else "") + ("-wide" if args.wide else "")
                  + (f"-r{args.rows}" if args.rows != 1 else ""))
    stem.with_suffix(".ptx").write_text(kernel.asm["ptx"])
    stem.with_suffix(".cubin").write_bytes(kernel.asm["cubin"])
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    sass = subprocess.run([str(tools / "cuobjdump"), "--dump-sass", str(stem.with_suffix(".cubin"))],
                          capture_output=True, text=True, check=True).stdout
    stem.with_suffix(".sass").write_text(sass)
    usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", str(stem.with_suffix(".cubin"))],
                           capture_output=True, text=True, check=True).stdout
    steps = (f"{plan.n_steps} steps of {plan.groups} groups x 2 x {plan.width} weights" if plan else
             f"int8 activations, {args.groups} chunks of 64 weights a step")
    print(f"{args.type}, {args.n_cols} columns: {steps}; block_n {args.block_n}, {args.warps} warps, "
          f"{args.stages} stages (Triton {triton.__version__})")
    print(" ".join(line.strip() for line in usage.splitlines() if "REG:" in line))
    ops = loop_histogram(sass)
    threads = 32 * args.warps
    print(f"K loop: {sum(ops.values())} instructions per thread per step, "
          f"{weights_per_step / threads:.0f} weights per thread per step")
    for op, n in ops.most_common(25):
        print(f"  {n:5d}  {op}")
    print(f"files: {stem}.(ptx|sass|cubin)")


if __name__ == "__main__":
    main()
