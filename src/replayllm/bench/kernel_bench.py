"""Per-kernel achieved bandwidth at a loaded model's real shapes, and each kernel's share of the decode step.

Each kernel kind (the QKV projection, the attention output projection, gate|up, down, the LM head, decode
attention) is captured in a CUDA graph exactly as the step runs it: once per layer, over every layer's own
weights, so nothing is served from L2 that a real step would read from DRAM. The graph is replayed and timed
with CUDA events; bytes are what the kernels must read (weights; for attention the K and V cache of the
context), so GB/s compares directly with the copy bandwidth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..kernels import MatvecConfig, paged_decode_attention, quant_matvec


@dataclass
class KernelRow:
    kernel: str
    launches_per_step: int
    us_per_step: float
    bytes_per_step: int
    gbps: float

    def to_json(self) -> dict:
        return asdict(self)


def time_graph_replay(body, replays: int = 20) -> float:
    """Median milliseconds of one replay of `body` captured as a CUDA graph (runner/gemv_tuning's timer: the
    engine's warm-up stream, so the benchmarks and the load-time tuning time alike)."""
    from ..runner.gemv_tuning import replay_ms

    return replay_ms(body, replays)


def kernel_rows(backend, context_tokens: int, config: MatvecConfig | None = None,
                attention: bool = True, activations: str = "f32") -> list[KernelRow]:
    """Rows for a GPUBackend's loaded model; attention is timed with `context_tokens` in the cache. `config`
    replaces the f32-activation matvec's launch shape (None: the engine's default), for tuning sweeps.
    `activations` (runner.decode_step.ACTIVATION_FORMS): "f32" times the f32-activation GEMVs (rows named
    "<kind>"); "16bit" or "int8" the decode step's routing with those quantized activations
    (runner.decode_step.project), rows named "<kind> 16bit" / "<kind> int8"."""
    from ..runner.decode_step import check_activation_form, project

    check_activation_form(activations)
    weights, bufs = backend.weights, backend.bufs
    h_q, attn_q, act_q = bufs.quantized_inputs(activations)
    kinds = {
        "qkv": ([w for layer in weights.layers for w in layer.qkv], bufs.h, h_q, bufs.qkv),
        "attn_output": ([layer.attn_output for layer in weights.layers], bufs.attn.view(1, -1), attn_q, bufs.x),
        "gate_up": ([w for layer in weights.layers for w in layer.gate_up], bufs.h, h_q, bufs.gate_up),
        "ffn_down": ([layer.ffn_down for layer in weights.layers], bufs.act, act_q, bufs.x),
        "lm_head": ([weights.output], bufs.h, h_q, bufs.logits),
    }
    if activations != "f32" and not bufs.can_quantize_activations:
        raise ValueError("this model's widths have no quantized activation buffers")
    rows = []
    for name, (matrices, x, xq, out) in kinds.items():
        def body(matrices=matrices, x=x, xq=xq, out=out):
            for w in matrices:
                if activations != "f32":
                    project(x, [w], out[:, : w.n_rows], None, xq, shapes=bufs.gemv_shapes)  # the step's shapes
                else:
                    quant_matvec(x, w, out[:, : w.n_rows], config=config)
        ms = time_graph_replay(body)
        name = name if activations == "f32" else f"{name} {activations}"
        nbytes = sum(w.nbytes for w in matrices)
        rows.append(KernelRow(name, len(matrices), 1e3 * ms, nbytes, nbytes / (ms * 1e-3) / 1e9))
    if attention:
        rows.append(_attention_row(backend, context_tokens))
    return rows


def _attention_row(backend, context_tokens: int) -> KernelRow:
    cache, bufs, config = backend.cache, backend.bufs, backend.config
    with backend.sequence(context_tokens + 1):
        bufs.positions.fill_(context_tokens)
        bufs.q.normal_()

        def body():
            for i in range(config.num_layers):
                paged_decode_attention(bufs.q, cache.k[i], cache.v[i], bufs.page_table, bufs.positions,
                                       config.head_dim ** -0.5, bufs.attn, bufs.attention_workspace,
                                       **cache.scales(i))
        ms = time_graph_replay(body)
    # a token's keys and values, each head's row and (int8) its f32 scale
    row_bytes = config.head_dim * cache.k.element_size() + (4 if cache.k_scale is not None else 0)
    kv_bytes = 2 * config.num_layers * config.num_kv_heads * row_bytes * (context_tokens + 1)
    return KernelRow(f"attention@{context_tokens}", config.num_layers, 1e3 * ms, kv_bytes,
                     kv_bytes / (ms * 1e-3) / 1e9)


def kernel_table(rows: list[KernelRow], step_us: float | None, copy_gbps: float | None) -> str:
    lines = ["| kernel | launches/step | us/step | MB/step | GB/s | % of copy BW | % of step |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        bw = f"{100 * r.gbps / copy_gbps:.0f}" if copy_gbps else "-"
        share = f"{100 * r.us_per_step / step_us:.0f}" if step_us else "-"
        lines.append(f"| {r.kernel} | {r.launches_per_step} | {r.us_per_step:.1f} | {r.bytes_per_step / 1e6:.1f} | "
                     f"{r.gbps:.0f} | {bw} | {share} |")
    return "\n".join(lines)
