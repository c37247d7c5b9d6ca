"""SwiGLU activation of the fused gate/up projection: out = silu(gate) * up.

The gate and up projections run as one matrix-vector product whose output row is [gate | up]
(gate_up [B, 2F]), so the activation reads both halves of a row and writes [B, F]; with `out_q8` the same
launch also writes it quantized in blocks of 32 (int8 or 16-bit: int8_activations), the down projection's input
on the integer-dot path. `out` may be f16: prefill's down projection rounds its input to f16 anyway, and the
kernel's f32 result rounded on the store (to nearest even) is bit for bit what `out_f32.to(torch.float16)` gives.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tensor_checks import check_same_device, check_tensor
from .int8_activations import (QuantizedActivations, _store_quantized_row, check_activation_q8, q8_launch_args,
                               q8_tensors)
from .pdl import _pdl_wait, launch_options

BLOCK_F = 512  # a multiple of ACTIVATION_BLOCK: each program quantizes whole blocks


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, q_ptr, q_scale_ptr, q_sum_ptr, ffn_size, gate_up_row_stride,
                     out_row_stride, q_row_stride, q_scale_row_stride, QUANTIZE: tl.constexpr, BLOCK: tl.constexpr,
                     USE_PDL: tl.constexpr):
    _pdl_wait(USE_PDL)
    # gate_up: [B, 2 * ffn_size] f32 (gate = first half); out: [B, ffn_size] f32 or f16; grid (B, cdiv(ffn_size, BLOCK))
    # q: [B, ffn_size] int8 or int16, q_scale, q_sum: [B, ffn_size / 32] f32 (QUANTIZE only; BLOCK is a multiple of 32)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < ffn_size
    gate = tl.load(gate_up_ptr + row * gate_up_row_stride + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * gate_up_row_stride + ffn_size + cols, mask=mask, other=0.0)
    act = gate * tl.sigmoid(gate) * up  # zero past ffn_size
    tl.store(out_ptr + row * out_row_stride + cols, act.to(out_ptr.dtype.element_ty), mask=mask)
    if QUANTIZE:
        _store_quantized_row(act, tl.program_id(1) * (BLOCK // 32), ffn_size, q_ptr + row * q_row_stride,
                        q_scale_ptr + row * q_scale_row_stride, q_sum_ptr + row * q_scale_row_stride, BLOCK // 32)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor, out_q8: QuantizedActivations | None = None, *,
             pdl: bool = False) -> torch.Tensor:
    """out [B, F] f32 or f16 = silu(gate_up[:, :F]) * gate_up[:, F:] for gate_up [B, 2F] f32, computed in f32 (an
    f16 `out` gets it rounded once); with `out_q8` (F a multiple of 32), also the f32 result quantized in blocks
    of 32 (int8 or 16-bit), as quantize_activations would. Returns `out`."""
    check_tensor("gate_up", gate_up, torch.float32, (None, None), layout="rows")
    batch, width = gate_up.shape
    if width % 2:
        raise ValueError(f"gate_up: width must be even (gate | up), got {width}")
    ffn_size = width // 2
    if out.dtype not in (torch.float32, torch.float16):
        raise ValueError(f"out: expected dtype torch.float32 or torch.float16, got {out.dtype}")
    check_tensor("out", out, out.dtype, (batch, ffn_size), layout="rows")
    if out_q8 is not None:
        check_activation_q8("out_q8", out_q8, batch, ffn_size)
    check_same_device(gate_up=gate_up, out=out, **q8_tensors("out_q8", out_q8))
    if batch == 0 or ffn_size == 0:
        return out
    q, q_scale, q_sum, q_row_stride, q_scale_row_stride = q8_launch_args(out_q8, out)
    _silu_mul_kernel[(batch, triton.cdiv(ffn_size, BLOCK_F))](
        gate_up, out, q, q_scale, q_sum, ffn_size, gate_up.stride(0), out.stride(0), q_row_stride, q_scale_row_stride,
        QUANTIZE=out_q8 is not None, BLOCK=BLOCK_F, num_warps=4, **launch_options(pdl))
    return out


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in float64 for gate_up [B, 2F]; returns f32 [B, F]."""
    gate, up = gate_up.double().chunk(2, dim=-1)
    return (gate * torch.sigmoid(gate) * up).float()
