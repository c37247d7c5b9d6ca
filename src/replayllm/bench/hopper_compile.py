"""Compile every kernel the engine launches for Hopper (sm_90) on any machine, no GPU needed.

Triton's package carries ptxas and cuobjdump, so the machine code of a kernel can be produced and read where it
is written. `check_all` calls each public launcher with CPU tensors of a llama2-7b layer's shapes while
`JITFunction.run` is replaced by a recorder: the launcher checks its arguments and computes its grid and
constexprs as it would on the GPU, and the recorder compiles that exact specialisation for sm_90 instead of
running it (ints divisible by 16 and 16-byte aligned pointers are marked so, as Triton's launcher would).
Each result gives registers, spills (local memory) and shared memory; a kernel that fails to compile, spills or
needs more shared memory than an H100/H200 block may have is a failure, found before any GPU time is spent.

    python -m replayllm.bench.hopper_compile      (prints one line per kernel; exit 1 on a failure)

Run it without TRITON_INTERPRET: the interpreter replaces the JIT functions this relies on. The machine code
comes from the local Triton, whose version may differ from the one on a GPU host.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

HOPPER_SHARED_BYTES = 232448  # dynamic shared memory one block may have on sm_90 (227 KiB)
_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8",
                 torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}


@dataclass(frozen=True)
class CompiledFacts:
    name: str
    registers: int
    spill_bytes: int
    shared_bytes: int

    @property
    def problems(self) -> list[str]:
        found = []
        if self.spill_bytes:
            found.append(f"spills {self.spill_bytes} bytes to local memory")
        if self.shared_bytes > HOPPER_SHARED_BYTES:
            found.append(f"needs {self.shared_bytes} bytes of shared memory (> {HOPPER_SHARED_BYTES})")
        return found


def compile_for_hopper(fn: JITFunction, types: dict[str, str], constants: dict, aligned: list[str], warps: int,
                       stages: int, launch_pdl: bool = False):
    """Compile `fn` for sm_90: `types` gives each runtime argument's Triton type ("*u8", "i32"), `aligned` the
    arguments Triton may assume 16-byte divisible."""
    names = fn.arg_names
    signature = {n: "constexpr" if n in constants else types[n] for n in names}
    source = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in constants.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages, "launch_pdl": launch_pdl})


def cuobjdump(*args: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return subprocess.run([str(tool), *args], capture_output=True, text=True, check=True).stdout


def resource_usage(kernel) -> tuple[int, int]:
    """(registers, local-memory bytes) of a compiled kernel, from cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = cuobjdump("--dump-resource-usage", str(cubin))
    regs = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    return int(regs.group(1)) if regs else -1, int(local.group(1)) if local else 0


def _signature(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict, list, dict]:
    kwargs = dict(kwargs)
    options = {"warps": kwargs.pop("num_warps", 4), "stages": kwargs.pop("num_stages", 3),
               "launch_pdl": kwargs.pop("launch_pdl", False)}
    bound = dict(zip(fn.arg_names, args)) | kwargs
    # None (an unused optional pointer) is a constant to Triton's launcher too
    constants = {n: v for n, v in bound.items() if fn.params[fn.arg_names.index(n)].is_constexpr or v is None}
    types, aligned = {}, []
    for name, value in bound.items():
        if name in constants:
            continue
        if isinstance(value, torch.Tensor):
            types[name] = "*" + _TRITON_DTYPE[value.dtype]
            if value.data_ptr() % 16 == 0:
                aligned.append(name)
        elif isinstance(value, bool):
            types[name] = "i1"
        elif isinstance(value, int):
            types[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                aligned.append(name)
        elif isinstance(value, float):
            types[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__} not understood")
    return types, constants, aligned, options


@contextlib.contextmanager
def compiling_launches(results: list[CompiledFacts], label: str = "") -> Iterator[None]:
    """While active, every Triton launch is compiled for sm_90 (and not run); facts go to `results`."""
    real_run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        types, constants, aligned, options = _signature(self, args, kwargs)
        kernel = compile_for_hopper(self, types, constants, aligned, **options)
        registers, spills = resource_usage(kernel)
        if constants.get("USE_PDL") and "griddepcontrol.wait" not in kernel.asm["ptx"]:
            raise AssertionError(f"{self.__name__}: compiled with USE_PDL but its PTX never waits")
        # The instructions a flag exists for: missing, the flag would silently do nothing (or, for the fused
        # merge, leave other programs' partials unordered).
        for flag, needed in (("PREFETCH", ("prefetch.global.L2",)), ("FUSED_MERGE", ("fence.acq_rel.gpu", "atom.")),
                             ("EXACT", ("mul.rn.f32", "sub.rn.f32", "div.rn.f32", "fence.acq_rel.gpu")),
                             ("INT8_PRODUCTS", (".s32.s8.s8.s32",))):  # integer tensor-core products
            if constants.get(flag) and not all(n in kernel.asm["ptx"] for n in needed):
                raise AssertionError(f"{self.__name__}: compiled with {flag} but its PTX lacks {needed}")
        results.append(CompiledFacts(f"{label}{self.__name__}", registers, spills, kernel.metadata.shared))

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = real_run


def _launches() -> list[tuple[str, Callable[[], object]]]:
    """(label, a call of a public launcher at llama2-7b's shapes) for every kernel the engine launches."""
    from gguf import GGMLQuantizationType as T

    from .. import kernels as K
    from ..kernels.int8_activations import QuantizedActivations, quantize_activations
    from ..kernels.decode_attention import NewToken
    from ..kernels.greedy_sample import GreedySampleWorkspace, greedy_sample_step
    from ..sampling.sampler import SamplerState
    from ..kernels import float_matvec
    from ..kernels.quant_matvec_q8 import ROW_TILE_TYPES, quant_matvec_q8
    from ..kernels.quant_weight import MATVEC_TYPES
    from ..runner.gemv_tuning import CANDIDATES, FLOAT_CANDIDATES
    from ..synth.random_rows import random_gguf_rows

    hidden, ffn, heads, head_dim, page = 4096, 11008, 32, 128, 16

    def weight(ggml_type, n_cols=hidden, n_rows=32):
        return K.pack_weight(ggml_type, random_gguf_rows(ggml_type, n_rows, n_cols, 0), n_cols)

    calls = []
    x1, x16, x512 = (torch.zeros(b, hidden) for b in (1, 16, 512))
    for t in sorted(MATVEC_TYPES, key=int):
        w = weight(t)
        calls.append((f"{t.name} decode GEMV: ", lambda w=w: K.quant_matvec(x1, w, torch.zeros(1, 32))))
        calls.append((f"{t.name} prefill GEMM: ", lambda w=w: K.quant_matmul(x512, w, torch.zeros(512, 32))))
    w4 = weight(T.Q4_K)
    calls.append(("Q4_K batch-16 GEMV: ", lambda: K.quant_matvec(x16, w4, torch.zeros(16, 32))))
    calls.append(("Q4_K dequantize: ", lambda: K.dequantize_into(w4, torch.zeros(32, hidden, dtype=torch.float16))))
    calls.append(("Q4_K gather rows: ", lambda: K.gather_rows(w4, torch.zeros(3, dtype=torch.int64),
                                                              torch.zeros(3, hidden))))
    xq = QuantizedActivations.allocate(1, ffn, "cpu")
    calls.append(("int8 activations: ", lambda: quantize_activations(torch.zeros(1, ffn), xq)))
    for t in (T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0):
        w = weight(t, n_cols=ffn)
        calls.append((f"{t.name} int8 GEMV: ", lambda w=w: quant_matvec_q8(xq, w, torch.zeros(1, 32))))
    xq16 = QuantizedActivations.allocate(1, ffn, "cpu", wide=True)  # the default decode path's 16-bit activations
    calls.append(("16-bit activations: ", lambda: quantize_activations(torch.zeros(1, ffn), xq16)))
    for t in (T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0):
        w = weight(t, n_cols=ffn)
        calls.append((f"{t.name} 16-bit GEMV: ", lambda w=w: quant_matvec_q8(xq16, w, torch.zeros(1, 32))))
        if t in ROW_TILE_TYPES:  # the tuning's candidates with 4 row tiles: the most registers a thread
            for shape in [s for s in CANDIDATES if s.rows == 4]:
                calls.append((f"{t.name} 16-bit GEMV {shape}: ", lambda w=w, shape=shape: quant_matvec_q8(
                    xq16, w, torch.zeros(1, 32), **shape.launch_args())))
    for t in sorted(float_matvec.SUPPORTED_TYPES, key=int):
        w = weight(t)
        for shape in (FLOAT_CANDIDATES[0], max(FLOAT_CANDIDATES, key=lambda s: s.chunks)):
            calls.append((f"{t.name} float GEMV {shape}: ", lambda w=w, shape=shape: float_matvec.float_matvec(
                x1, w, torch.zeros(1, 32), **shape.launch_args())))
    norm = torch.ones(hidden)
    calls.append(("", lambda: K.rmsnorm(x1, norm, 1e-5, torch.zeros(1, hidden))))
    calls.append(("", lambda: K.add_rmsnorm(x1, torch.zeros(1, hidden), norm, 1e-5, torch.zeros(1, hidden))))
    calls.append(("", lambda: K.silu_mul(torch.zeros(1, 2 * ffn), torch.zeros(1, ffn))))
    h_q8 = QuantizedActivations.allocate(1, hidden, "cpu")
    calls.append(("+ int8 copy: ", lambda: K.rmsnorm(x1, norm, 1e-5, torch.zeros(1, hidden), h_q8)))
    calls.append(("+ int8 copy: ", lambda: K.silu_mul(torch.zeros(1, 2 * ffn), torch.zeros(1, ffn), xq)))
    h_q16 = QuantizedActivations.allocate(1, hidden, "cpu", wide=True)
    calls.append(("+ 16-bit copy: ", lambda: K.rmsnorm(x1, norm, 1e-5, torch.zeros(1, hidden), h_q16)))
    calls.append(("+ 16-bit copy: ", lambda: K.silu_mul(torch.zeros(1, 2 * ffn), torch.zeros(1, ffn), xq16)))
    cache = torch.zeros(4, heads, page, head_dim, dtype=torch.float16)
    table = torch.zeros(1, 4, dtype=torch.int32)
    positions = torch.zeros(1, dtype=torch.int32)
    rope = torch.zeros(64, head_dim // 2)
    q = torch.zeros(1, heads, head_dim)
    calls.append(("", lambda: K.rope_and_cache_write(q, q.clone(), q.clone(), rope, rope, positions, cache,
                                                     cache.clone(), table, neox=False)))
    workspace = K.DecodeAttentionWorkspace.create(1, heads, head_dim, 4096, "cpu")
    calls.append(("", lambda: K.paged_decode_attention(q, cache, cache, table, positions, 0.1,
                                                       torch.zeros_like(q), workspace)))
    calls.append(("PDL: ", lambda: K.paged_decode_attention(q, cache, cache, table, positions, 0.1,
                                                            torch.zeros_like(q), workspace, pdl=True)))
    attn_q8 = QuantizedActivations.allocate(1, heads * head_dim, "cpu")
    calls.append(("+ int8 copy: ", lambda: K.paged_decode_attention(q, cache, cache, table, positions, 0.1,
                                                                    torch.zeros_like(q), workspace, out_q8=attn_q8)))
    attn_q16 = QuantizedActivations.allocate(1, heads * head_dim, "cpu", wide=True)
    calls.append(("+ 16-bit copy: ", lambda: K.paged_decode_attention(q, cache, cache, table, positions, 0.1,
                                                                      torch.zeros_like(q), workspace, out_q8=attn_q16)))
    calls.append(("V beside K: ", lambda: K.paged_decode_attention(q, cache, cache, table, positions, 0.1,
                                                                   torch.zeros_like(q), workspace, early_v=True)))
    calls.append(("fused merge + 16-bit copy + PDL: ", lambda: K.paged_decode_attention(
        q, cache, cache, table, positions, 0.1, torch.zeros_like(q), workspace, out_q8=attn_q16, pdl=True,
        fused_merge=True)))
    cache8, scale8 = torch.zeros(cache.shape, dtype=torch.int8), torch.zeros(cache.shape[:3])
    int8_cache = (cache8, cache8.clone())
    int8_scales = dict(k_scale=scale8, v_scale=scale8.clone())
    calls.append(("int8 cache: ", lambda: K.rope_and_cache_write(q, q.clone(), q.clone(), rope, rope, positions,
                                                               *int8_cache, table, neox=False, **int8_scales)))
    calls.append(("int8 cache + 16-bit copy + PDL: ", lambda: K.paged_decode_attention(
        q, *int8_cache, table, positions, 0.1, torch.zeros_like(q), workspace, out_q8=attn_q16, pdl=True,
        **int8_scales)))
    calls.append(("int8 cache, int8 products + 16-bit copy + PDL: ", lambda: K.paged_decode_attention(
        q, *int8_cache, table, positions, 0.1, torch.zeros_like(q), workspace, out_q8=attn_q16, pdl=True,
        int8_products=True, **int8_scales)))
    calls.append(("f16 cache, fma products + 16-bit copy + PDL: ", lambda: K.paged_decode_attention(
        q, cache, cache, table, positions, 0.1, torch.zeros_like(q), workspace, out_q8=attn_q16, pdl=True,
        fma_products=True)))
    calls.append(("int8 cache, fma products + 16-bit copy + PDL: ", lambda: K.paged_decode_attention(
        q, *int8_cache, table, positions, 0.1, torch.zeros_like(q), workspace, out_q8=attn_q16, pdl=True,
        fma_products=True, **int8_scales)))
    cache4 = torch.zeros(*cache.shape[:3], head_dim // 2, dtype=torch.uint8)
    scale4 = torch.zeros(*cache.shape[:3], head_dim // 32)
    q4_cache, q4_scales = (cache4, cache4.clone()), dict(k_scale=scale4, v_scale=scale4.clone())
    calls.append(("q4 cache: ", lambda: K.rope_and_cache_write(q, q.clone(), q.clone(), rope, rope, positions,
                                                             *q4_cache, table, neox=False, **q4_scales)))
    calls.append(("q4 cache + 16-bit copy + PDL: ", lambda: K.paged_decode_attention(
        q, *q4_cache, table, positions, 0.1, torch.zeros_like(q), workspace, out_q8=attn_q16, pdl=True,
        **q4_scales)))
    new_token = NewToken(q.clone(), q.clone(), rope, rope, neox=False)
    calls.append(("rope in it + fused merge + 16-bit copy + PDL: ", lambda: K.paged_decode_attention(
        q, cache, cache, table, positions, 0.1, torch.zeros_like(q), workspace, out_q8=attn_q16, pdl=True,
        fused_merge=True, new_token=new_token)))
    calls.append(("rope in it: ", lambda: K.paged_decode_attention(
        q, cache, cache, table, positions, 0.1, torch.zeros_like(q), workspace, new_token=new_token)))
    calls.append(("PDL: ", lambda: quant_matvec_q8(xq, weight(T.Q4_K, n_cols=ffn), torch.zeros(1, 32), pdl=True)))
    calls.append(("PDL: ", lambda: quant_matvec_q8(xq16, weight(T.Q4_K, n_cols=ffn), torch.zeros(1, 32), pdl=True)))
    calls.append(("PDL: ", lambda: K.quant_matvec(x1, w4, torch.zeros(1, 32), pdl=True)))
    for t in (T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0):  # the weight rows asked of L2 before the PDL wait
        w, tiles = weight(t, n_cols=ffn), 4 if t in ROW_TILE_TYPES else None
        calls.append((f"PDL + prefetch {t.name}: ", lambda w=w, tiles=tiles: quant_matvec_q8(
            xq16, w, torch.zeros(1, 32), pdl=True, prefetch=True, rows=tiles)))
    calls.append(("PDL + prefetch F16: ", lambda: float_matvec.float_matvec(
        x1, weight(T.F16), torch.zeros(1, 32), pdl=True, prefetch=True)))
    calls.append(("PDL: ", lambda: K.rmsnorm(x1, norm, 1e-5, torch.zeros(1, hidden), h_q8, pdl=True)))
    sampler = SamplerState.create(1, 32000, "cpu")
    one = torch.zeros(1, dtype=torch.int64)
    calls.append(("PDL: ", lambda: greedy_sample_step(
        torch.zeros(1, 32000), sampler.token_counts, sampler.repetition_penalty, sampler.frequency_penalty,
        sampler.presence_penalty, sampler.penalty_last_n, sampler.window, sampler.window_count, sampler.step, one,
        one.clone(), torch.zeros(1, dtype=torch.int32), GreedySampleWorkspace.create(1, 32000, "cpu"), pdl=True)))
    q_prefill = torch.zeros(48, heads, head_dim)
    calls.append(("", lambda: K.paged_prefill_attention(q_prefill, cache, cache, table[0], 0,
                                                        torch.zeros_like(q_prefill))))
    # what a prefill CUDA graph launches: the span and the number of real rows read on the device
    span = torch.zeros(2, dtype=torch.int32)
    calls.append(("span on the device: ", lambda: K.paged_prefill_attention(q_prefill, cache, cache, table[0], span,
                                                                            torch.zeros_like(q_prefill))))
    rows_q = torch.zeros(4, heads, head_dim)
    calls.append(("row limit: ", lambda: K.rope_and_cache_write(
        rows_q, rows_q.clone(), rows_q.clone(), rope, rope, positions.repeat(4), cache, cache.clone(),
        table.repeat(4, 1), neox=False, num_rows=span[1:])))
    return calls


def check_all(verbose: bool = True) -> list[CompiledFacts]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("hopper_compile needs Triton's compiler: run it without TRITON_INTERPRET=1")
    results: list[CompiledFacts] = []
    for label, call in _launches():
        with compiling_launches(results, label):
            call()
    if verbose:
        for r in results:
            status = "; ".join(r.problems) or "ok"
            print(f"{r.name:55s} {r.registers:4d} regs  {r.shared_bytes:7d} B shared  {status}")
    return results


def main() -> None:
    results = check_all()
    bad = [r for r in results if r.problems]
    print(f"{len(results)} kernels compiled for sm_90 (Triton {triton.__version__}); {len(bad)} with problems")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
