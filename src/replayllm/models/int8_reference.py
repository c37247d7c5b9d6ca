"""The reference for the int8-activation decode path: the fp32 reference with that path's products swapped in.

The int8 GEMVs (kernels/quant_matvec_q8.py) multiply a weight by its input rounded to int8 in blocks of 32
(kernels/int8_activations.py). That rounding is an error of its own, far above the kernels' arithmetic error, and
on a random-weight model, whose top logits are close, it changes greedy tokens. To tell it from a kernel bug, run
the reference inside `Int8Products`: each product of an activation with one of the given weights is then
computed by the int8 kernels' own plain-torch reference (`quantize_activations_reference`, then
`quant_matvec_q8_reference`: the same rounding, and the min term of Q4_1 / Q4_K / Q5_K on the exact block sums),
so the int8 path must agree with this reference about as closely as the default path agrees with the plain one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..kernels.int8_activations import quantize_activations_reference
from ..kernels.quant_matvec_q8 import quant_matvec_q8_reference
from ..kernels.quant_weight import QuantWeight


def storage_key(t: torch.Tensor) -> int:
    """The identity of a weight buffer that its views (`w.t()`) share."""
    return t.untyped_storage().data_ptr()


class Int8Products(TorchFunctionMode):
    """Inside this mode, `F.linear(x, w)` and `x @ w.t()` with `storage_key(w)` in `weights` (mapped to the same
    matrix in its packed GGUF form) compute rows `first_row`.. of the product as the int8 path does; earlier rows
    stay fp32. `first_row` lets one teacher-forced pass over prompt + generated tokens give the prompt rows to
    the plain product, as the engine's prefill does: only its decode step takes the int8 path."""

    def __init__(self, weights: Mapping[int, QuantWeight], first_row: int = 0):
        super().__init__()
        self.weights = weights
        self.first_row = max(first_row, 0)
        self.int8_products = 0  # products taken by the int8 reference: a caller's proof that the mode took hold

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and not kwargs:
            x, w, bias = args[0], args[1], args[2] if len(args) > 2 else None
            qw = self._packed(w)
            if qw is not None:
                return self._product(x, w, qw, bias)
        elif func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and len(args) == 2 \
                and not kwargs and isinstance(args[1], torch.Tensor) and args[1].dim() == 2:
            w_t = args[1]
            qw = self._packed(w_t)
            if qw is not None and w_t.shape == (qw.n_cols, qw.n_rows):  # x @ w.t()
                return self._product(args[0], w_t.t(), qw, None)
        return func(*args, **kwargs)

    def _packed(self, w) -> QuantWeight | None:
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            return None
        return self.weights.get(storage_key(w))

    def _product(self, x: torch.Tensor, w: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # [T, K]
        plain = F.linear(rows[:self.first_row], w)
        if self.first_row < rows.shape[0]:
            self.int8_products += 1
            xq = quantize_activations_reference(rows[self.first_row:].contiguous())
            plain = torch.cat([plain, quant_matvec_q8_reference(xq, qw).to(plain.dtype)])
        if bias is not None:
            plain = plain + bias
        return plain.reshape(*x.shape[:-1], w.shape[0])
