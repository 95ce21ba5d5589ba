"""Symmetric round-to-nearest 4-bit quantization with AbsMax group scales.

For a group g of consecutive k in one column: s = max|W[g]| / 7 (stored as float16),
q = clamp(round(W / s), -8, 7), so W ~ q * s. The scale is rounded to float16 before q is
computed, so q is optimal for the scale the kernel really multiplies by.
"""

from __future__ import annotations

import numpy as np

from slim_onnx.format import check_group_size, num_groups

QMAX = 7
QMIN = -8


def quantize_absmax_int4(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] float -> (q int8 [K, N], scales float16 [ceil(K/group_size), N])."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D [K, N] weight, got shape {w.shape}")
    k, n = w.shape
    check_group_size(k, group_size)
    g = num_groups(k, group_size)
    pad = g * group_size - k
    wp = np.pad(w.astype(np.float32), ((0, pad), (0, 0))).reshape(g, group_size, n)
    scales = (np.abs(wp).max(axis=1) / QMAX).astype(np.float16)
    s32 = scales.astype(np.float32)[:, None, :]
    q = np.divide(wp, s32, out=np.zeros_like(wp), where=s32 > 0)
    q = np.clip(np.rint(q), QMIN, QMAX).astype(np.int8).reshape(g * group_size, n)[:k]
    return q, scales
