"""SwiGLU activation of the fused gate/up projection: out = silu(gate) * up.

The gate and up projections run as one matrix-vector product whose output row is [gate | up]
(gate_up [B, 2F]), so the activation reads both halves of a row and writes [B, F].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tensor_checks import check_same_device, check_tensor

BLOCK_F = 512


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, ffn_size, gate_up_row_stride, out_row_stride, BLOCK: tl.constexpr):
    # gate_up: [B, 2 * ffn_size] f32 (gate = first half); out: [B, ffn_size] f32; grid (B, cdiv(ffn_size, BLOCK))
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < ffn_size
    gate = tl.load(gate_up_ptr + row * gate_up_row_stride + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * gate_up_row_stride + ffn_size + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * out_row_stride + cols, gate * tl.sigmoid(gate) * up, mask=mask)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [B, F] f32 = silu(gate_up[:, :F]) * gate_up[:, F:] for gate_up [B, 2F] f32. Returns `out`."""
    check_tensor("gate_up", gate_up, torch.float32, (None, None), layout="rows")
    batch, width = gate_up.shape
    if width % 2:
        raise ValueError(f"gate_up: width must be even (gate | up), got {width}")
    ffn_size = width // 2
    check_tensor("out", out, torch.float32, (batch, ffn_size), layout="rows")
    check_same_device(gate_up=gate_up, out=out)
    if batch == 0 or ffn_size == 0:
        return out
    _silu_mul_kernel[(batch, triton.cdiv(ffn_size, BLOCK_F))](
        gate_up, out, ffn_size, gate_up.stride(0), out.stride(0), BLOCK=BLOCK_F, num_warps=4)
    return out


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in float64 for gate_up [B, 2F]; returns f32 [B, F]."""
    gate, up = gate_up.double().chunk(2, dim=-1)
    return (gate * torch.sigmoid(gate) * up).float()
