"""2:4 masks along K (W is [K, N]): in every column, keep the 2 highest scores of each 4 consecutive k.

  magnitude: score = |W[k, n]|
  Wanda:     score = |W[k, n]| * sqrt(s_k), s_k = mean of x_k^2 over the calibration tokens
             (the input-channel norm; Sun et al. 2023, and the SLiM mask)
SparseGPT chooses its mask inside the OBS update (gptq.py), not from a fixed score.
"""

from __future__ import annotations

import torch


def mask_2of4(scores: torch.Tensor) -> torch.Tensor:
    """Boolean [K, N] mask keeping the 2 largest scores in each group of 4 consecutive k (K % 4 == 0).

    Ties keep the lower k (a stable order), so the result is deterministic.
    """
    k, n = scores.shape
    if k % 4:
        raise ValueError(f"2:4 sparsity needs K divisible by 4, got K={k}")
    groups = scores.reshape(k // 4, 4, n)
    order = torch.argsort(-groups, dim=1, stable=True)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, order[:, :2, :], True)
    return mask.reshape(k, n)


def magnitude_2of4_mask(w: torch.Tensor) -> torch.Tensor:
    return mask_2of4(w.abs())


def wanda_2of4_mask(w: torch.Tensor, channel_sq_mean: torch.Tensor) -> torch.Tensor:
    """channel_sq_mean: [K] mean squared activation of each input channel."""
    return mask_2of4(w.abs() * channel_sq_mean.to(w.dtype).sqrt()[:, None])
