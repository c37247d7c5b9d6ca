"""out = x @ W^T for a prompt's many activation rows against a GGUF-quantized W: prefill's projections.

At prefill the product is compute-bound (hundreds of rows share every weight), so the weights go through the
tensor cores: this is quant_matvec's kernel on its tensor-core path, with BLOCK_M activation rows a program and
f16 products. A program owns BLOCK_N weight rows and BLOCK_M activation rows and walks K in steps of S groups
(quant_dequant's group decoding). Each step's weights are decoded to f32 in registers, rounded once to f16 --
the same values `dequantize_into` writes for the vendor GEMM -- and meet the activations, also rounded to f16,
in `tl.dot` with f32 accumulation. So the weights are read in their quantized form (4.5-6.6 bits each) instead
of being expanded to an f16 copy in memory and read back.

The M tiles of one weight tile are adjacent in launch order: they run side by side, so each weight tile comes
from DRAM about once and from L2 for the other activation tiles.

Precision: both operands are rounded to f16 (relative error ~5e-4 a product), the sum is f32: the accuracy of an
f16 GEMM with f32 accumulation, which is what prefill has used all along.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._tensor_checks import check_powers_of_two, check_same_device, check_tensor
from .quant_matvec import launch_rows_kernel
from .quant_weight import QuantWeight


@dataclass(frozen=True)
class MatmulConfig:
    """Launch shape of quant_matmul: BLOCK_N weight rows x BLOCK_M activation rows a program, K steps of
    `max_groups` groups at most (see quant_dequant), Triton's warps and software-pipelining stages."""

    block_n: int = 128
    block_m: int = 64
    max_groups: int = 2
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self):
        check_powers_of_two("MatmulConfig", block_n=self.block_n, block_m=self.block_m,
                            max_groups=self.max_groups, num_warps=self.num_warps)
        if self.block_n < 16 or self.block_m < 16:
            raise ValueError(f"MatmulConfig: tl.dot needs block_n and block_m >= 16, got {self.block_n}, "
                             f"{self.block_m}")
        if self.num_stages < 1:
            raise ValueError(f"MatmulConfig.num_stages must be >= 1, got {self.num_stages}")


def quant_matmul(x: torch.Tensor, w: QuantWeight, out: torch.Tensor, bias: torch.Tensor | None = None,
                 accumulate: bool = False, config: MatmulConfig | None = None) -> torch.Tensor:
    """out = x @ W^T (+ bias); with accumulate=True, out += x @ W^T (+ bias) (a fused residual add).

    x [M, n_cols] f32/f16, out [M, n_rows] f32 (both with unit column stride, any row stride; out may be a
    column slice of a wider buffer and must not overlap x), bias [n_rows] f32. One launch, no host sync.
    Returns out.
    """
    if not isinstance(w, QuantWeight):
        raise ValueError(f"quant_matmul: w must be a QuantWeight, got {type(w).__name__}")
    if x.dtype not in (torch.float32, torch.float16):
        raise ValueError(f"quant_matmul: x must be f32 or f16, got {x.dtype}")
    check_tensor("x", x, x.dtype, (None, w.n_cols), layout="rows")
    n_m = x.shape[0]
    check_tensor("out", out, torch.float32, (n_m, w.n_rows), layout="rows")
    if bias is not None:
        check_tensor("bias", bias, torch.float32, (w.n_rows,))
    check_same_device(x=x, out=out, weight=w.qs, **({} if bias is None else {"bias": bias}))
    if n_m == 0:
        return out
    cfg = config or MatmulConfig()
    # The decode GEMV's kernel on its tensor-core path, with block_m activation rows a program and f16 products.
    launch_rows_kernel(x, w, out, bias, accumulate, cfg.block_n, cfg.block_m, cfg.max_groups, cfg.num_warps,
                       cfg.num_stages, f16_product=True, pdl=False)
    return out


def quant_matmul_reference(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """What quant_matmul computes, in float64 on the CPU: f16-rounded activations times the f16-rounded
    dequantized weights. [M, n_rows]."""
    from .quant_weight import dequantize_reference

    weight = dequantize_reference(w.to("cpu")).to(torch.float16).double()
    return x.cpu().to(torch.float16).double() @ weight.T
