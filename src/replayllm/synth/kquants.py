"""Vectorised numpy quantizers for the K-quant block types Q4_K, Q5_K and Q6_K.

A K-quant super-block holds 256 values. Q4_K and Q5_K split it into 8 sub-blocks of 32 and store
x ~= d * sc[j] * q - dmin * m[j] with q unsigned (4 or 5 bits) and 6-bit sub-block scales sc, m;
Q6_K splits it into 16 sub-blocks of 16 and stores x ~= d * sc[j] * (q - 32) with signed 8-bit sc.
The byte layouts below are exactly what `gguf.quants.dequantize` (and ggml) reads.

Each quantizer works on a 2-D float32 array of whole blocks, `blocks: [n_blocks, 256]`, and returns
`[n_blocks, type_size]` uint8. Rounding uses `np.rint`; ties are irrelevant for real data.
"""

from __future__ import annotations

import numpy as np

QK_K = 256  # values per super-block
Q4_K_BLOCK_BYTES = 144  # d, dmin (f16 each), 12 bytes of packed 6-bit scales, 128 bytes of nibbles
Q5_K_BLOCK_BYTES = 176  # as Q4_K plus 32 bytes holding the fifth bit of every value
Q6_K_BLOCK_BYTES = 210  # 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, d (f16)

# Alternating least-squares rounds when fitting each sub-block; each round re-rounds q for the
# current (scale, min) and then solves the 2x2 least-squares problem for the rounded q. The error
# never grows from one round to the next; beyond ~3 rounds the gain on Gaussian data is < 1%.
_REFINE_ROUNDS = 3


def quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """blocks: [n, 256] float32 -> [n, 144] uint8 in Q4_K layout."""
    q, d, dmin, sc, mn = _quantize_affine(blocks, nmax=15)  # q: [n, 8, 32] in 0..15
    out = np.empty((blocks.shape[0], Q4_K_BLOCK_BYTES), dtype=np.uint8)
    out[:, 0:2] = d.reshape(-1, 1).view(np.uint8)
    out[:, 2:4] = dmin.reshape(-1, 1).view(np.uint8)
    out[:, 4:16] = _pack_6bit_scales(sc, mn)
    out[:, 16:144] = _pack_nibble_pairs(q)
    return out


def quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    """blocks: [n, 256] float32 -> [n, 176] uint8 in Q5_K layout."""
    q, d, dmin, sc, mn = _quantize_affine(blocks, nmax=31)  # q: [n, 8, 32] in 0..31
    out = np.empty((blocks.shape[0], Q5_K_BLOCK_BYTES), dtype=np.uint8)
    out[:, 0:2] = d.reshape(-1, 1).view(np.uint8)
    out[:, 2:4] = dmin.reshape(-1, 1).view(np.uint8)
    out[:, 4:16] = _pack_6bit_scales(sc, mn)
    # qh byte e, bit j = fifth bit of element e of sub-block j
    high = (q >> 4).astype(np.uint8)  # [n, 8, 32]
    qh = np.zeros((blocks.shape[0], 32), dtype=np.uint8)
    for j in range(8):
        qh |= high[:, j, :] << np.uint8(j)
    out[:, 16:48] = qh
    out[:, 48:176] = _pack_nibble_pairs(q & np.uint8(0x0F))
    return out


def quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """blocks: [n, 256] float32 -> [n, 210] uint8 in Q6_K layout."""
    n = blocks.shape[0]
    x = blocks.reshape(n, 16, 16)
    scale = _fit_symmetric(x, nmax=32)  # [n, 16], signed

    # Sub-block scales as int8 against one f16 d per super-block: the scale of largest magnitude
    # maps to -128 (the int8 end with the larger magnitude), as the reference quantizer does.
    extreme = np.take_along_axis(scale, np.abs(scale).argmax(axis=1)[:, None], axis=1)  # [n, 1]
    d = (-extreme / 128.0).astype(np.float16)  # [n, 1]
    d32 = d.astype(np.float32)
    safe_d = np.where(d32 == 0, 1.0, d32)
    sc = np.clip(np.rint(scale / safe_d), -128, 127)
    sc = np.where(d32 == 0, 0, sc).astype(np.int8)  # [n, 16]

    eff = d32 * sc.astype(np.float32)  # [n, 16]
    safe_eff = np.where(eff == 0, 1.0, eff)[:, :, None]
    q = np.clip(np.rint(x / safe_eff), -32, 31)
    q = np.where(eff[:, :, None] == 0, 0, q)
    q = (q + 32).astype(np.uint8).reshape(n, 2, 4, 32)  # [n, half, quarter, 32]

    out = np.empty((n, Q6_K_BLOCK_BYTES), dtype=np.uint8)
    # Element 128*h + 32*r + e: low nibble in ql[64*h + 32*(r % 2) + e] at bit 4*(r // 2),
    # high two bits in qh[32*h + e] at bit 2*r.
    low = q & np.uint8(0x0F)
    out[:, 0:128] = (low[:, :, 0:2, :] | (low[:, :, 2:4, :] << np.uint8(4))).reshape(n, 128)
    high = q >> np.uint8(4)
    qh = (high[:, :, 0] | (high[:, :, 1] << np.uint8(2)) | (high[:, :, 2] << np.uint8(4))
          | (high[:, :, 3] << np.uint8(6)))
    out[:, 128:192] = qh.reshape(n, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d.view(np.uint8)
    return out


def _quantize_affine(blocks: np.ndarray, nmax: int):
    """Shared Q4_K/Q5_K fit. Returns q [n,8,32] uint8, d [n] f16, dmin [n] f16, sc [n,8], mn [n,8] (0..63)."""
    n = blocks.shape[0]
    x = blocks.reshape(n, 8, 32)
    scale, offset = _fit_affine(x, nmax)  # x ~= scale * q - offset, both >= 0: [n, 8]

    # 6-bit sub-block scales against f16 super-block factors; the largest maps to 63.
    d = (scale.max(axis=1) / 63.0).astype(np.float16)  # [n]
    dmin = (offset.max(axis=1) / 63.0).astype(np.float16)
    sc = _to_6bit(scale, d)
    mn = _to_6bit(offset, dmin)

    # Re-round every value against the scale and offset the file will actually hold.
    eff_scale = d.astype(np.float32)[:, None] * sc  # [n, 8]
    eff_offset = dmin.astype(np.float32)[:, None] * mn
    safe = np.where(eff_scale == 0, 1.0, eff_scale)[:, :, None]
    q = np.clip(np.rint((x + eff_offset[:, :, None]) / safe), 0, nmax)
    q = np.where(eff_scale[:, :, None] == 0, 0, q).astype(np.uint8)
    return q, d, dmin, sc.astype(np.uint8), mn.astype(np.uint8)


def _to_6bit(values: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """values [n, 8] >= 0, factor [n] f16 -> round(values / factor) in 0..63 as float32."""
    f = factor.astype(np.float32)[:, None]
    safe = np.where(f == 0, 1.0, f)
    return np.where(f == 0, 0.0, np.clip(np.rint(values / safe), 0, 63)).astype(np.float32)


def _fit_affine(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block (last axis) fit x ~= s * q - m, q in 0..nmax, s >= 0, m >= 0.

    x: [n, S, L] -> (s, m) each [n, S]. Starts from the min/max range (with the minimum clamped
    to <= 0, since the format can only subtract a non-negative offset), then refines.
    """
    length = x.shape[-1]
    lo = np.minimum(x.min(axis=-1), 0.0)
    hi = x.max(axis=-1)
    s = (hi - lo) / nmax
    m = -lo
    sum_x = x.sum(axis=-1)
    for _ in range(_REFINE_ROUNDS):
        safe = np.where(s > 0, s, 1.0)[..., None]
        q = np.clip(np.rint((x + m[..., None]) / safe), 0, nmax)
        sum_q = q.sum(axis=-1)
        sum_qq = np.einsum("...i,...i->...", q, q)
        sum_qx = np.einsum("...i,...i->...", q, x)
        det = length * sum_qq - sum_q * sum_q
        ok = det > 0
        safe_det = np.where(ok, det, 1.0)
        new_s = (length * sum_qx - sum_q * sum_x) / safe_det
        new_m = (new_s * sum_q - sum_x) / length
        # A negative offset is not representable: the best fit on the boundary m = 0.
        neg = new_m < 0
        boundary_s = sum_qx / np.where(sum_qq > 0, sum_qq, 1.0)
        new_s = np.where(neg, boundary_s, new_s)
        new_m = np.where(neg, 0.0, new_m)
        ok &= new_s > 0
        s = np.where(ok, new_s, s).astype(np.float32)
        m = np.where(ok, new_m, m).astype(np.float32)
    return s, m


def _fit_symmetric(x: np.ndarray, nmax: int) -> np.ndarray:
    """Per sub-block (last axis) fit x ~= s * q, q in -nmax..nmax-1; s signed. x: [n, S, L] -> s [n, S].

    The value of largest magnitude maps to -nmax (the end of the signed range with more room),
    so s takes the opposite sign of that value.
    """
    extreme = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    s = -extreme / nmax
    for _ in range(_REFINE_ROUNDS):
        safe = np.where(s != 0, s, 1.0)[..., None]
        q = np.clip(np.rint(x / safe), -nmax, nmax - 1)
        sum_qq = np.einsum("...i,...i->...", q, q)
        sum_qx = np.einsum("...i,...i->...", q, x)
        ok = (sum_qq > 0) & (s != 0)
        s = np.where(ok, sum_qx / np.where(sum_qq > 0, sum_qq, 1.0), s).astype(np.float32)
    return s


def _pack_6bit_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """sc, mn: [n, 8] uint8 in 0..63 -> [n, 12] uint8.

    Bytes 0-3 hold sc[0..3] in their low 6 bits, 4-7 hold mn[0..3]; the top 2 bits of those eight
    bytes carry the top 2 bits of sc[4..7] and mn[4..7], and bytes 8-11 hold their low nibbles
    (sc low, mn high).
    """
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    return out


def _pack_nibble_pairs(q: np.ndarray) -> np.ndarray:
    """q: [n, 8, 32] values 0..15 -> [n, 128]: byte 32*c + e = q[2c][e] | q[2c+1][e] << 4."""
    pairs = q.reshape(q.shape[0], 4, 2, 32)
    return (pairs[:, :, 0, :] | (pairs[:, :, 1, :] << np.uint8(4))).reshape(q.shape[0], 128)
