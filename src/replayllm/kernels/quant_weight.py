"""GGUF weight matrices kept quantized on the device, repacked once at load for the matvec kernels.

A GGUF row is a run of interleaved blocks (scale fields, then quant bits). The kernels want each kind of
field as its own contiguous `[n_rows, ...]` tensor instead: the quant bits of a row then start 16-byte
aligned and are read with wide coalesced loads, the few scale bytes come from a separate small tensor, and
the packed 6-bit K-quant scales are decoded here once rather than on every token. The quant bits keep
their GGUF order inside each block, so decoding stays the same bit arithmetic as the format's. Bytes per
weight stay at the quantized size (the K-quant scales grow by 4 bytes per 256 weights).

Packed tensors per type (K = n_cols; all `[n_rows, width]`, contiguous):

    type   qs                 qh             scales               mins                d, dmin
    Q4_0   u8  K/2 (nibbles)  -              f16 K/32 (d)         -                   -
    Q4_1   u8  K/2            -              f16 K/32 (d)         f16 K/32 (m)        -
    Q8_0   i8  K              -              f16 K/32 (d)         -                   -
    Q4_K   u8  K/2            -              u8 K/32 (low bits)   -                   f16 K/256 each
    Q5_K   u8  K/2            u8 K/8         u8 K/32 (low bits)   -                   f16 K/256 each
    Q6_K   u8  K/2 (low 4)    u8 K/4 (hi 2)  i8 K/16              -                   f16 K/256 (d only)
    F16 / BF16 / F32: qs holds the plain values, [n_rows, K] in that dtype.

The K-quants' 6-bit scale sc and min m of each 32-weight sub-block j stay packed at 12 bits, as in GGUF, but
in a layout that decodes with a shift and a mask instead of GGUF's scattered bits: `scales` byte j holds the
low 4 bits of sc (bits 0-3) and of m (bits 4-7); `scales_hi` u8 [n_rows, K/64] byte i holds the top 2 bits of
sub-blocks 2i and 2i + 1: sc_2i (bits 0-1), m_2i (2-3), sc_2i+1 (4-5), m_2i+1 (6-7). Unpacked to a byte each
they would take 0.11 GiB more on a 7B model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import InvalidParameterError, UnsupportedError

T = GGMLQuantizationType

MATVEC_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    {T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.F16, T.BF16, T.F32})

FLOAT_TYPES: frozenset[GGMLQuantizationType] = frozenset({T.F16, T.BF16, T.F32})

_FLOAT_DTYPES = {T.F16: torch.float16, T.BF16: torch.bfloat16, T.F32: torch.float32}

# field -> (dtype, weights per entry): the field's width is n_cols // weights_per_entry.
_LAYOUTS: dict[GGMLQuantizationType, dict[str, tuple[torch.dtype, int]]] = {
    T.Q4_0: {"qs": (torch.uint8, 2), "scales": (torch.float16, 32)},
    T.Q4_1: {"qs": (torch.uint8, 2), "scales": (torch.float16, 32), "mins": (torch.float16, 32)},
    T.Q8_0: {"qs": (torch.int8, 1), "scales": (torch.float16, 32)},
    T.Q4_K: {"qs": (torch.uint8, 2), "scales": (torch.uint8, 32), "scales_hi": (torch.uint8, 64),
             "d": (torch.float16, 256), "dmin": (torch.float16, 256)},
    T.Q5_K: {"qs": (torch.uint8, 2), "qh": (torch.uint8, 8), "scales": (torch.uint8, 32),
             "scales_hi": (torch.uint8, 64), "d": (torch.float16, 256), "dmin": (torch.float16, 256)},
    T.Q6_K: {"qs": (torch.uint8, 2), "qh": (torch.uint8, 4), "scales": (torch.int8, 16),
             "d": (torch.float16, 256)},
    **{t: {"qs": (dtype, 1)} for t, dtype in _FLOAT_DTYPES.items()},
}

_FIELDS = ("qs", "qh", "scales", "scales_hi", "mins", "d", "dmin")


def _check_type(ggml_type) -> None:
    if ggml_type not in MATVEC_TYPES:
        supported = ", ".join(sorted(t.name for t in MATVEC_TYPES))
        raise UnsupportedError(f"no matrix-vector kernel for type {getattr(ggml_type, 'name', ggml_type)}; "
                               f"supported: {supported}")


@dataclass(frozen=True)
class QuantWeight:
    """A [n_rows, n_cols] weight matrix (out_features x in_features) in its packed GGUF form.

    Fields absent from the type's layout (see the module docstring) are None.
    """

    ggml_type: GGMLQuantizationType
    n_rows: int
    n_cols: int
    qs: torch.Tensor
    qh: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    scales_hi: torch.Tensor | None = None
    mins: torch.Tensor | None = None
    d: torch.Tensor | None = None
    dmin: torch.Tensor | None = None

    def __post_init__(self):
        _check_type(self.ggml_type)
        block = GGML_QUANT_SIZES[self.ggml_type][0]
        if self.n_rows < 1 or self.n_cols < 1 or self.n_cols % block:
            raise InvalidParameterError(
                f"{self.ggml_type.name} matrix of {self.n_rows}x{self.n_cols}: needs n_rows >= 1 and n_cols a "
                f"positive multiple of the block size {block}")
        layout = _LAYOUTS[self.ggml_type]
        device = self.qs.device
        for name in _FIELDS:
            t = getattr(self, name)
            if name not in layout:
                if t is not None:
                    raise InvalidParameterError(f"{self.ggml_type.name} weight has no field {name!r}; pass None")
                continue
            dtype, per_entry = layout[name]
            shape = (self.n_rows, self.n_cols // per_entry)
            if t is None or t.dtype != dtype or tuple(t.shape) != shape:
                got = "None" if t is None else f"{t.dtype} {tuple(t.shape)}"
                raise InvalidParameterError(f"{self.ggml_type.name} weight field {name!r}: expected {dtype} {shape}, "
                                            f"got {got}; build it with pack_weight()")
            if not t.is_contiguous() or t.device != device:
                raise InvalidParameterError(f"{self.ggml_type.name} weight field {name!r} must be contiguous and on "
                                            f"{device} like 'qs'")

    @property
    def device(self) -> torch.device:
        return self.qs.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The packed fields present for this type, by name."""
        return {name: getattr(self, name) for name in _FIELDS if getattr(self, name) is not None}

    @property
    def nbytes(self) -> int:
        """Bytes a matrix-vector product reads from this weight."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> QuantWeight:
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.tensors().items()})


def pack_weight(ggml_type: GGMLQuantizationType, raw: np.ndarray | torch.Tensor, n_cols: int) -> QuantWeight:
    """Repack `raw` (uint8 [n_rows, row_bytes], GGUF block layout) into a CPU QuantWeight.

    Rows of several matrices of one type and width may be concatenated first to make one fused matrix.
    """
    _check_type(ggml_type)
    rows = _as_uint8_rows(raw)
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    if n_cols < 1 or n_cols % block:
        raise InvalidParameterError(f"{ggml_type.name}: n_cols={n_cols} must be a positive multiple of {block}")
    n_rows, row_bytes = rows.shape
    if row_bytes != n_cols // block * type_size:
        raise InvalidParameterError(
            f"{ggml_type.name}: a row of {n_cols} weights takes {n_cols // block * type_size} bytes, got {row_bytes}")
    if ggml_type in FLOAT_TYPES:
        values = np.ascontiguousarray(rows).view(_numpy_dtype(ggml_type))
        return QuantWeight(ggml_type, n_rows, n_cols, qs=_torch(values, _FLOAT_DTYPES[ggml_type]))
    blocks = rows.reshape(n_rows, n_cols // block, type_size)
    fields = _UNPACKERS[ggml_type](blocks)
    return QuantWeight(ggml_type, n_rows, n_cols,
                       **{name: _torch(arr.reshape(n_rows, -1), _LAYOUTS[ggml_type][name][0])
                          for name, arr in fields.items()})


def _as_uint8_rows(raw: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(raw, torch.Tensor):
        if raw.dtype != torch.uint8:
            raise InvalidParameterError(f"raw weight bytes must be uint8, got {raw.dtype}")
        raw = raw.detach().cpu().numpy()
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 2:
        desc = f"{raw.dtype} array of {raw.ndim} dims" if isinstance(raw, np.ndarray) else type(raw).__name__
        raise InvalidParameterError(f"raw weight bytes must be a 2-D uint8 array [n_rows, row_bytes], got {desc}")
    if raw.shape[0] < 1:
        raise InvalidParameterError("raw weight bytes have no rows")
    return raw


def _numpy_dtype(ggml_type: GGMLQuantizationType):
    # numpy has no bfloat16: carry its bits as uint16 and reinterpret them on the torch side.
    return {T.F16: np.float16, T.BF16: np.uint16, T.F32: np.float32}[ggml_type]


def _torch(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    # A fresh copy: `raw` is often a read-only view of a memory-mapped file.
    t = torch.from_numpy(np.array(arr, copy=True, order="C"))
    return t.view(dtype) if t.dtype != dtype else t


def _field(blocks: np.ndarray, start: int, stop: int, dtype=np.uint8) -> np.ndarray:
    """Bytes [start, stop) of every block, as a contiguous [n_rows, n_blocks * width] array of `dtype`."""
    n_rows = blocks.shape[0]
    return np.ascontiguousarray(blocks[:, :, start:stop]).view(dtype).reshape(n_rows, -1)


def _unpack_q4_0(b):
    return {"scales": _field(b, 0, 2, np.float16), "qs": _field(b, 2, 18)}


def _unpack_q4_1(b):
    return {"scales": _field(b, 0, 2, np.float16), "mins": _field(b, 2, 4, np.float16), "qs": _field(b, 4, 20)}


def _unpack_q8_0(b):
    return {"scales": _field(b, 0, 2, np.float16), "qs": _field(b, 2, 34, np.int8)}


def decode_kquant_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes of a Q4_K/Q5_K super-block -> (scales, mins), uint8 [..., 8] of 6 bits each.

    Bytes 0-3 hold the low 6 bits of scales 0-3 (top 2 bits: high bits of scales 4-7), bytes 4-7 the same for
    mins, bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble).
    """
    sc_lo, m_lo, both = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([sc_lo & 0x3F, (both & 0x0F) | ((sc_lo >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m_lo & 0x3F, (both >> 4) | ((m_lo >> 2) & 0x30)], axis=-1)
    return scales, mins


def pack_kquant_scales(scales: np.ndarray, mins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """6-bit (scales, mins) uint8 [n_rows, K/32] -> the kernels' (scales, scales_hi) [n_rows, K/32], [n_rows, K/64]
    (the layout in the module docstring)."""
    low = (scales & 0x0F) | ((mins & 0x0F) << 4)
    top = (scales >> 4) | ((mins >> 4) << 2)  # per sub-block: sc's top 2 bits, then m's
    high = top[:, 0::2] | (top[:, 1::2] << 4)
    return np.ascontiguousarray(low, dtype=np.uint8), np.ascontiguousarray(high, dtype=np.uint8)


def kquant_scales_mins(w: QuantWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """The 6-bit (scales, mins) of a Q4_K / Q5_K weight, uint8 [n_rows, K/32] each, on w's device."""
    top = torch.stack([w.scales_hi & 0x0F, w.scales_hi >> 4], dim=-1).reshape(w.n_rows, -1)  # [N, K/32]
    return (w.scales & 0x0F) | ((top & 0x03) << 4), (w.scales >> 4) | ((top >> 2) << 4)


def _unpack_kquant_scales(b):
    scales, mins = decode_kquant_scales(b[:, :, 4:16])
    n_rows = b.shape[0]
    low, high = pack_kquant_scales(scales.reshape(n_rows, -1), mins.reshape(n_rows, -1))
    return {"scales": low, "scales_hi": high}


def _unpack_q4_k(b):
    return {"d": _field(b, 0, 2, np.float16), "dmin": _field(b, 2, 4, np.float16), **_unpack_kquant_scales(b),
            "qs": _field(b, 16, 144)}


def _unpack_q5_k(b):
    return {"d": _field(b, 0, 2, np.float16), "dmin": _field(b, 2, 4, np.float16), **_unpack_kquant_scales(b),
            "qh": _field(b, 16, 48), "qs": _field(b, 48, 176)}


def _unpack_q6_k(b):
    return {"qs": _field(b, 0, 128), "qh": _field(b, 128, 192), "scales": _field(b, 192, 208, np.int8),
            "d": _field(b, 208, 210, np.float16)}


_UNPACKERS = {T.Q4_0: _unpack_q4_0, T.Q4_1: _unpack_q4_1, T.Q8_0: _unpack_q8_0,
              T.Q4_K: _unpack_q4_k, T.Q5_K: _unpack_q5_k, T.Q6_K: _unpack_q6_k}


def dequantize_reference(w: QuantWeight) -> torch.Tensor:
    """float32 [n_rows, n_cols] from the packed form with plain torch ops, on w's device.

    Each value is computed with the same operations, in the same order, as the GGUF reference
    dequantizers, so the result is bitwise equal to them.
    """
    if w.ggml_type in FLOAT_TYPES:
        return w.qs.float()
    return _REFERENCE[w.ggml_type](w).reshape(w.n_rows, w.n_cols)


def _nibbles(qs: torch.Tensor, run: int) -> torch.Tensor:
    """u8 [N, n*run] -> int32 [N, n, 2*run]: each run of `run` bytes gives its low nibbles then its high ones."""
    b = qs.view(qs.shape[0], -1, run).int()
    return torch.cat([b & 0xF, b >> 4], dim=-1)


def _ref_q4_0(w):
    q = _nibbles(w.qs, 16) - 8  # [N, K/32, 32]
    return w.scales.float()[..., None] * q.float()


def _ref_q4_1(w):
    q = _nibbles(w.qs, 16)
    return w.scales.float()[..., None] * q.float() + w.mins.float()[..., None]


def _ref_q8_0(w):
    q = w.qs.view(w.n_rows, -1, 32).float()
    return q * w.scales.float()[..., None]


def _kquant_scale_min(w) -> tuple[torch.Tensor, torch.Tensor]:
    """(d * sc, dmin * m) per 32-weight sub-block: f32 [N, K/32, 1] each."""
    d = w.d.float().repeat_interleave(8, dim=1)
    dmin = w.dmin.float().repeat_interleave(8, dim=1)
    scales, mins = kquant_scales_mins(w)
    return (d * scales.float())[..., None], (dmin * mins.float())[..., None]


def _ref_q4_k(w):
    scale, minv = _kquant_scale_min(w)
    q = _nibbles(w.qs, 32).view(w.n_rows, -1, 32)  # chunk of 32 bytes -> sub-blocks 2c (low), 2c+1 (high)
    return scale * q.float() - minv


def _ref_q5_k(w):
    scale, minv = _kquant_scale_min(w)
    low = _nibbles(w.qs, 32).view(w.n_rows, -1, 8, 32)
    qh = w.qh.view(w.n_rows, -1, 1, 32).int()  # bit i of byte l: high bit of weight l of sub-block i
    high = (qh >> torch.arange(8, device=qh.device).view(1, 1, 8, 1)) & 1
    q = (low | (high << 4)).view(w.n_rows, -1, 32)
    return scale * q.float() - minv


def _ref_q6_k(w):
    n = w.n_rows
    # Per half of 128 weights: 64 bytes of ql give weights 0-63 (low nibbles) and 64-127 (high nibbles);
    # 32 bytes of qh give the 2 high bits of weights l, l+32, l+64, l+96 at shifts 0, 2, 4, 6 of byte l.
    low = _nibbles(w.qs, 64)  # [N, halves, 128]
    qh = w.qh.view(n, -1, 1, 32).int()
    high = (qh >> torch.tensor([0, 2, 4, 6], device=qh.device).view(1, 1, 4, 1)) & 3
    q = (low | (high.reshape(n, -1, 128) << 4)) - 32
    scale = w.d.float().repeat_interleave(16, dim=1) * w.scales.float()  # [N, K/16]
    return scale[..., None] * q.view(n, -1, 16).float()


_REFERENCE = {T.Q4_0: _ref_q4_0, T.Q4_1: _ref_q4_1, T.Q8_0: _ref_q8_0,
              T.Q4_K: _ref_q4_k, T.Q5_K: _ref_q5_k, T.Q6_K: _ref_q6_k}
