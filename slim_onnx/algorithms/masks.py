"""2:4 masks along K (the reduction dimension): keep the 2 highest scores of every 4 consecutive k."""

from __future__ import annotations

import numpy as np


def mask_2of4(scores: np.ndarray) -> np.ndarray:
    """Boolean [K, N] mask keeping the 2 largest scores in each group of 4 consecutive rows (K % 4 == 0)."""
    k, n = scores.shape
    if k % 4:
        raise ValueError(f"2:4 sparsity needs K divisible by 4, got K={k}")
    groups = scores.reshape(k // 4, 4, n)
    order = np.argsort(-groups, axis=1, kind="stable")
    mask = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(mask, order[:, :2, :], True, axis=1)
    return mask.reshape(k, n)


def magnitude_2of4_mask(w: np.ndarray) -> np.ndarray:
    """Magnitude pruning: score = |W|."""
    return mask_2of4(np.abs(w))
