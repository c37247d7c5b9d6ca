"""Launch-shape sweeps of the kernels whose shape matters most, at llama2-7b's real shapes, in one GPU call:

- prefill: quant_matmul (quantized GEMM) over a list of MatmulConfigs against dequantize-then-vendor-GEMM
  (the prefiller's fallback), for each weight type and shape of a 7B Q4_K_M model, at 128, 512 and 2048 rows;
- decode: the integer-dot GEMV (quant_matvec_q8) over block_n / chunks / warps / stages, for each type it
  supports and each activation form (16-bit, the default, and int8), beside the f32-activation GEMV
  (quant_matvec), in GB/s of weights read (24 copies: nothing from L2; the activations quantized once, outside
  the timing, as the decode step's own kernels write them);
- decode attention over 32 layers' caches at 64, 512 and 3840 tokens of context, per split size, tile and
  whether V's tile is loaded beside K's;
- decode attention over f16 and int8 caches with each kind of products (tensor-core f16, int8 integers, f32
  multiply-adds on the CUDA cores) and launch shapes.

Writes --out/sweep_<part>.json for each part run (gemv, attention, attention_products, gemm), rewritten after every shape in case
the run is cut short, and prints the best shape per kernel. Figures are CUDA-event medians (graph replays for the
GEMVs and attention). Usage:
python benchmarks/kernel_sweep.py --out DIR [--quick] [--only gemv|attention|products|gemm] [--form 16bit|int8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from gguf import GGMLQuantizationType

from replayllm.bench.kernel_bench import time_graph_replay
from replayllm.kernels import pack_weight, quant_matvec
from replayllm.kernels.quant_matmul import MatmulConfig, quant_matmul
from replayllm.kernels.quant_matvec_q8 import (DEFAULT_BLOCK_N, DEFAULT_CHUNKS, DEFAULT_NUM_WARPS, DEFAULT_ROWS,
                                               ROW_TILE_TYPES)
from replayllm.runner.prefill_tuning import time_ms
from replayllm.synth.random_rows import random_gguf_rows

T = GGMLQuantizationType
GEMM_SHAPES = [(T.Q4_K, 12288, 4096), (T.Q4_K, 22016, 4096), (T.Q4_K, 4096, 11008), (T.Q6_K, 4096, 11008),
               (T.Q6_K, 4096, 4096), (T.Q8_0, 4096, 4096), (T.F16, 4096, 4096)]
GEMM_ROWS = (128, 512, 2048)
GEMM_CONFIGS = [MatmulConfig(*c) for c in [
    (128, 64, 2, 8, 2), (128, 128, 2, 8, 2), (128, 128, 1, 8, 3), (64, 128, 2, 4, 2), (128, 64, 1, 4, 3),
    (64, 64, 2, 4, 2), (256, 64, 1, 8, 2), (128, 128, 4, 8, 1), (128, 64, 2, 8, 3), (64, 128, 1, 4, 3)]]
GEMV_SHAPES = [(T.Q4_K, 22016, 4096), (T.Q4_K, 4096, 11008), (T.Q6_K, 4096, 11008), (T.Q8_0, 4096, 4096)]
GEMV_CONFIGS = [  # block_n, chunks, num_warps, num_stages, rows (row tiles: ROW_TILE_TYPES); the first: the default
    (DEFAULT_BLOCK_N, DEFAULT_CHUNKS, DEFAULT_NUM_WARPS, 1, DEFAULT_ROWS), (2, 32, 2, 1, 2), (2, 32, 2, 1, 4),
    (1, 32, 1, 1, 2), (1, 32, 1, 1, 4), (2, 64, 4, 1, 2), (1, 64, 2, 1, 2), (4, 32, 4, 1, 2), (1, 64, 2, 1, 4),
    (4, 32, 4, 1, 1), (4, 64, 4, 1, 1), (2, 64, 4, 1, 1), (4, 32, 8, 1, 1), (4, 16, 4, 1, 1), (8, 32, 4, 1, 1),
    (4, 32, 4, 2, 1), (2, 32, 4, 1, 1), (8, 16, 4, 1, 1), (1, 32, 1, 1, 1), (1, 64, 2, 1, 1), (2, 16, 2, 1, 1),
    (2, 32, 2, 2, 1), (4, 32, 2, 1, 1)]
GEMV_FORMS = ("16bit", "int8")  # the activation forms: QuantizedActivations.wide or not
COPIES = 24


def weight(ggml_type, n_rows, n_cols, seed):
    return pack_weight(ggml_type, random_gguf_rows(ggml_type, n_rows, n_cols, seed), n_cols).to("cuda")


def _save(out_dir: Path, part: str, rows: list[dict]) -> None:
    """out_dir/sweep_<part>.json, rewritten after every shape so that a run cut short keeps what it measured."""
    (out_dir / f"sweep_{part}.json").write_text(json.dumps({"device": torch.cuda.get_device_name(0), part: rows},
                                                           indent=1))


def sweep_gemm(quick: bool, out_dir: Path) -> list[dict]:
    from replayllm.runner.prefill import SCRATCH_BYTES, dequant_gemm

    rows_out = []
    scratch = torch.empty(SCRATCH_BYTES // 2, dtype=torch.float16, device="cuda")  # the prefiller's size
    for ggml_type, n_rows, n_cols in GEMM_SHAPES[:2] if quick else GEMM_SHAPES:
        w = weight(ggml_type, n_rows, n_cols, 0)
        for m in GEMM_ROWS:
            x = torch.randn(m, n_cols, device="cuda")
            out = torch.empty(m, n_rows, device="cuda")
            flop = 2.0 * m * n_rows * n_cols

            entry = {"type": ggml_type.name, "n_rows": n_rows, "n_cols": n_cols, "rows": m, "fused": [],
                     "dequant_gemm_ms": time_ms(lambda: dequant_gemm(x, w, out, scratch), reps=5)}
            for cfg in GEMM_CONFIGS[:3] if quick else GEMM_CONFIGS:
                try:
                    ms = time_ms(lambda: quant_matmul(x, w, out, config=cfg), reps=5)
                    entry["fused"].append({"config": cfg.__dict__, "ms": ms, "tflops": flop / ms / 1e9})
                except Exception as exc:  # a shape that does not compile (shared memory, registers): recorded
                    entry["fused"].append({"config": cfg.__dict__, "error": repr(exc)[:300]})
            ok = [f for f in entry["fused"] if "ms" in f]
            best = min(ok, key=lambda f: f["ms"]) if ok else None
            entry["best_fused"] = best
            print(f"gemm {ggml_type.name:5s} {n_rows:5d}x{n_cols:5d} rows {m:4d}: dequant+gemm "
                  f"{entry['dequant_gemm_ms']:.3f} ms ({flop / entry['dequant_gemm_ms'] / 1e9:.0f} TFLOP/s); "
                  f"best fused {best['ms'] if best else float('nan'):.3f} ms "
                  f"({best['tflops'] if best else 0:.0f} TFLOP/s) {best['config'] if best else ''}", flush=True)
            rows_out.append(entry)
            _save(out_dir, "gemm", rows_out)
    return rows_out


def sweep_gemv(quick: bool, out_dir: Path, forms: tuple[str, ...] = GEMV_FORMS) -> list[dict]:
    results = []
    for ggml_type, n_rows, n_cols in GEMV_SHAPES:
        weights = [weight(ggml_type, n_rows, n_cols, s) for s in range(COPIES)]
        for form in forms:
            results.append(_sweep_gemv_form(weights, form, quick))
            _save(out_dir, "gemv", results)
        del weights
    return results


def _sweep_gemv_form(weights: list, form: str, quick: bool) -> dict:
    """Every GEMV_CONFIGS shape of quant_matvec_q8 on `weights` (copies of one type and shape) with activations of
    `form`, beside the f32-activation GEMV on the same weights."""
    from replayllm.kernels.int8_activations import QuantizedActivations, quantize_activations
    from replayllm.kernels.quant_matvec_q8 import quant_matvec_q8

    ggml_type, n_rows, n_cols = weights[0].ggml_type, weights[0].n_rows, weights[0].n_cols
    nbytes = sum(w.nbytes for w in weights)
    x = torch.randn(1, n_cols, device="cuda")
    y = torch.empty(1, n_rows, device="cuda")
    # Quantized once, outside the timing: the step's own kernels write this copy.
    xq = quantize_activations(x, QuantizedActivations.allocate(1, n_cols, "cuda", wide=form == "16bit"))

    def f32_body():
        for w in weights:
            quant_matvec(x, w, y)
    entry = {"type": ggml_type.name, "n_rows": n_rows, "n_cols": n_cols, "form": form,
             "f32_gbps": nbytes / (time_graph_replay(f32_body) * 1e-3) / 1e9, "q8": []}
    for block_n, chunks, warps, stages, rows in GEMV_CONFIGS[:4] if quick else GEMV_CONFIGS:
        if ggml_type not in ROW_TILE_TYPES:
            if rows != 1:
                continue
            rows = None  # the kernel's only value
        def body():
            for w in weights:
                quant_matvec_q8(xq, w, y, block_n=block_n, chunks=chunks, num_warps=warps, num_stages=stages,
                                rows=rows)
        shape = {"block_n": block_n, "chunks": chunks, "num_warps": warps, "num_stages": stages, "rows": rows or 1}
        try:
            entry["q8"].append({**shape, "gbps": nbytes / (time_graph_replay(body) * 1e-3) / 1e9})
        except Exception as exc:  # an unsupported type or shape: recorded, the sweep goes on
            entry["q8"].append({**shape, "error": repr(exc)[:300]})
            if "supports" in repr(exc):
                break
    ok = sorted((q for q in entry["q8"] if "gbps" in q), key=lambda q: -q["gbps"])
    entry["best_q8"] = ok[0] if ok else None
    default = entry["q8"][0].get("gbps", float("nan"))
    print(f"gemv {ggml_type.name:5s} {n_rows:5d}x{n_cols:5d} {form:5s}: f32 {entry['f32_gbps']:.0f} GB/s; default "
          f"shape {default:.0f}; best {ok[0]['gbps'] if ok else float('nan'):.0f} GB/s {ok[0] if ok else ''}",
          flush=True)
    for q in ok[1:4]:
        print(f"     next {q}", flush=True)
    return entry


def _time_attention(entry: dict, body, kv_bytes: int) -> None:
    """Adds body's graph-replay time (us_per_step) and the cache's read rate (gbps) to entry, or the error of a
    shape that does not compile or fit."""
    try:
        ms = time_graph_replay(body)
        entry |= {"us_per_step": 1e3 * ms, "gbps": kv_bytes / (ms * 1e-3) / 1e9}
    except Exception as exc:
        entry["error"] = repr(exc)[:300]


ATTENTION_CONTEXTS = (64, 512, 3840)  # tg128's own range, then deep
ATTENTION_SHAPES = [  # split_tokens (None: the engine's choice), block_n (None: largest), num_warps, early_v,
    # fused_merge, rope_in_attention (the new token rotated and cached in the launch: NewToken)
    (None, None, 4, False, False, False), (None, None, 4, True, False, False), (None, None, 4, False, True, False),
    (None, None, 4, False, True, True), (None, None, 4, False, False, True), (None, None, 4, True, True, False),
    (64, None, 4, False, False, False), (64, None, 4, False, True, False), (256, None, 4, False, False, False),
    (None, 32, 4, False, False, False), (None, None, 8, False, False, False), (64, 32, 4, False, False, False),
    (32, 32, 2, False, False, False)]


def sweep_attention(out_dir: Path) -> list[dict]:
    """Decode attention at llama2-7b's shape (32 q = kv heads, head_dim 128, 32 layers' caches) with 512 and
    3840 tokens of context: GB/s of K and V read, per launch shape."""
    from replayllm.kernels import DecodeAttentionWorkspace, paged_decode_attention
    from replayllm.kernels.decode_attention import NewToken

    layers, heads, head_dim, page, capacity = 32, 32, 128, 16, 4096 + 16
    pages = capacity // page
    caches = [(torch.randn(pages, heads, page, head_dim, device="cuda").half(),
               torch.randn(pages, heads, page, head_dim, device="cuda").half()) for _ in range(layers)]
    table = torch.arange(pages, dtype=torch.int32, device="cuda")[None, :]
    q = torch.randn(1, heads, head_dim, device="cuda")
    out = torch.empty_like(q)
    angles = torch.arange(capacity, device="cuda")[:, None] * 1e-3 * torch.arange(head_dim // 2, device="cuda")
    new_token = NewToken(torch.randn(1, heads, head_dim, device="cuda"), torch.randn(1, heads, head_dim, device="cuda"),
                         angles.cos(), angles.sin(), neox=False)
    results = []
    for context in ATTENTION_CONTEXTS:
        positions = torch.full((1,), context, dtype=torch.int32, device="cuda")
        kv_bytes = 2 * layers * heads * head_dim * 2 * (context + 1)
        for split, block_n, warps, early_v, fused, rope in ATTENTION_SHAPES:
            ws = DecodeAttentionWorkspace.create(1, heads, head_dim, capacity, "cuda", split_tokens=split)

            def body():
                for k, v in caches:
                    paged_decode_attention(q, k, v, table, positions, head_dim ** -0.5, out, ws, block_n=block_n,
                                           num_warps=warps, early_v=early_v, fused_merge=fused,
                                           new_token=new_token if rope else None)
            entry = {"context": context, "split_tokens": ws.split_tokens, "block_n": block_n, "num_warps": warps,
                     "early_v": early_v, "fused_merge": fused, "rope_in_attention": rope}
            _time_attention(entry, body, kv_bytes)
            results.append(entry)
            _save(out_dir, "attention", results)
        ok = sorted((r for r in results if r["context"] == context and "gbps" in r), key=lambda r: -r["gbps"])
        default, early, fused, all_in_one, rope_only = results[-len(ATTENTION_SHAPES):][:5]  # the first five shapes

        def us(entry):
            return entry.get("us_per_step", float("nan"))
        print(f"attention @{context}: default {us(default):.1f} us a step ({default.get('gbps', float('nan')):.0f} "
              f"GB/s), V beside K {us(early):.1f} us, merge fused {us(fused):.1f} us, rope in it {us(rope_only):.1f} "
              f"us, rope and merge in it {us(all_in_one):.1f} us (no rope launch counted); best {ok[0] if ok else None}",
              flush=True)
    return results


PRODUCT_CONTEXTS = (64, 512, 3840)
PRODUCT_SHAPES = [  # cache, products ("tensor": f16 tensor cores, the default; "int8": int8_products; "fma"),
    # split_tokens (None: the engine's choice), block_n (None: largest), num_warps, early_v
    ("f16", "tensor", None, None, 4, False), ("int8", "tensor", None, None, 4, False),
    ("int8", "int8", None, None, 4, False),
    ("f16", "fma", None, None, 4, False), ("f16", "fma", None, None, 4, True), ("f16", "fma", None, 32, 4, False),
    ("f16", "fma", None, None, 8, False), ("f16", "fma", 256, None, 8, True),
    ("int8", "fma", None, None, 4, False), ("int8", "fma", None, None, 4, True), ("int8", "fma", None, None, 8, False),
    ("int8", "fma", None, None, 8, True), ("int8", "fma", None, 64, 4, False), ("int8", "fma", 256, None, 8, True),
    ("int8", "fma", 64, None, 4, True),
    ("q4", "fma", None, None, 4, False), ("q4", "fma", None, None, 8, False), ("q4", "fma", None, 64, 4, False),
    ("q4", "fma", 256, None, 8, False), ("q4", "fma", 64, None, 4, False), ("q4", "fma", None, None, 2, False)]


def sweep_attention_products(out_dir: Path) -> list[dict]:
    """Decode attention at llama2-7b's shape (32 layers' caches) over an f16, an int8 and a q4 cache, with each
    kind of products (tensor-core f16, int8 integers, f32 multiply-adds on the CUDA cores: fma_products, the q4
    cache's only kind) and launch shapes: GB/s of the cache's bytes read (quants and scales)."""
    from replayllm.kernels import DecodeAttentionWorkspace, paged_decode_attention
    from replayllm.kernels.kv_cache import quantize_kv_q4_reference, quantize_kv_reference

    layers, heads, head_dim, page, capacity = 32, 32, 128, 16, 4096 + 16
    pages = capacity // page
    f16 = [(torch.randn(pages, heads, page, head_dim, device="cuda").half(),
            torch.randn(pages, heads, page, head_dim, device="cuda").half()) for _ in range(layers)]
    int8 = []
    for k, v in f16:
        (kq, ks), (vq, vs) = quantize_kv_reference(k), quantize_kv_reference(v)
        int8.append((kq, vq, dict(k_scale=ks, v_scale=vs)))
    q4 = []
    for k, v in f16:
        (kq, ks), (vq, vs) = quantize_kv_q4_reference(k), quantize_kv_q4_reference(v)
        q4.append((kq, vq, dict(k_scale=ks, v_scale=vs)))
    f16 = [(k, v, {}) for k, v in f16]
    caches_of = {"f16": f16, "int8": int8, "q4": q4}
    row_bytes_of = {"f16": 2 * head_dim, "int8": head_dim + 4, "q4": head_dim // 2 + 4 * (head_dim // 32)}
    table = torch.arange(pages, dtype=torch.int32, device="cuda")[None, :]
    q = torch.randn(1, heads, head_dim, device="cuda")
    out = torch.empty_like(q)
    results = []
    for context in PRODUCT_CONTEXTS:
        positions = torch.full((1,), context, dtype=torch.int32, device="cuda")
        for cache, products, split, block_n, warps, early_v in PRODUCT_SHAPES:
            caches, row_bytes = caches_of[cache], row_bytes_of[cache]
            kv_bytes = 2 * layers * heads * row_bytes * (context + 1)
            ws = DecodeAttentionWorkspace.create(1, heads, head_dim, capacity, "cuda", split_tokens=split)
            options = dict(block_n=block_n, num_warps=warps, early_v=early_v, int8_products=products == "int8",
                           fma_products=products == "fma")

            def body():
                for k, v, scales in caches:
                    paged_decode_attention(q, k, v, table, positions, head_dim ** -0.5, out, ws, **scales, **options)
            entry = {"context": context, "cache": cache, "products": products, "split_tokens": ws.split_tokens,
                     "block_n": block_n, "num_warps": warps, "early_v": early_v}
            _time_attention(entry, body, kv_bytes)
            results.append(entry)
            _save(out_dir, "attention_products", results)
        rows = results[-len(PRODUCT_SHAPES):]
        best = {}
        for r in rows:
            key = (r["cache"], r["products"])
            if "us_per_step" in r and (key not in best or r["us_per_step"] < best[key]["us_per_step"]):
                best[key] = r
        parts = [f"{c} {p} {r['us_per_step']:.1f} us ({r['gbps']:.0f} GB/s; split {r['split_tokens']} block "
                 f"{r['block_n']} warps {r['num_warps']} early_v {r['early_v']})" for (c, p), r in best.items()]
        print(f"attention products @{context}, best of each: " + "; ".join(parts), flush=True)
        for r in rows:
            if "error" in r:
                print(f"  failed: {r}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="a few shapes and configs only")
    parser.add_argument("--only", choices=["gemm", "gemv", "attention", "products"], default=None)
    parser.add_argument("--form", choices=GEMV_FORMS, default=None, help="the GEMVs' activation form (default: both)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.only in (None, "gemv"):
        sweep_gemv(args.quick, out, (args.form,) if args.form else GEMV_FORMS)
    if args.only in (None, "attention"):
        sweep_attention(out)
    if args.only in (None, "products"):
        sweep_attention_products(out)
    if args.only in (None, "gemm"):
        sweep_gemm(args.quick, out)
    print(f"sweep done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
