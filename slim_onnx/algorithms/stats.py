"""Calibration statistics of one linear layer's input, accumulated batch by batch.

For inputs x in R^K (every token of every calibration sequence, n tokens in all):
  s_k = (1/n) sum x_k^2          per-channel mean square: the Wanda score and SLiM saliency (sqrt)
  a_k = (1/n) sum |x_k|          per-channel mean magnitude: the saliency as the paper writes it
  H   = (1/n) sum x x^T          the Hessian of ||XW - XW'||^2 up to a factor 2 (GPTQ, SparseGPT,
                                  and the exact layer-output error: ||X E||^2 = n tr(E^T H E))
The per-channel sums are kept in float64 (K numbers), each batch's part summed in float32; with H,
sum x^2 is read off its diagonal. H is summed in float32: each batch's
X^T X is a float32 product, and the running sum's rounding (about 1e-7 relative per batch) is far
below the dampening every user of H adds (1% of its mean diagonal) and below the float32 the
Cholesky factorisation works in; float64 would double the memory of the largest statistic (1.6 GB
for a 14336-wide MLP input) and the time of the product that dominates calibration.
"""

from __future__ import annotations

import math

import torch


class StatisticsError(ValueError):
    """Calibration statistics that cannot be used (wrong width, NaN/Inf, no data)."""


class LayerStatistics:
    def __init__(self, k: int, hessian: bool = True, device: str | torch.device = "cpu", name: str = "layer"):
        self.k = k
        self.name = name
        self.count = 0
        self.abs_sum = torch.zeros(k, dtype=torch.float64, device=device)
        self.xtx = torch.zeros(k, k, dtype=torch.float32, device=device) if hessian else None
        # sum x^2 is H's diagonal when H is summed; else it is summed on its own
        self.sq_sum = None if hessian else torch.zeros(k, dtype=torch.float64, device=device)

    def update(self, x) -> None:
        """Add a batch of inputs [..., K] (numpy or torch)."""
        x = torch.as_tensor(x)
        if x.shape[-1] != self.k:
            raise StatisticsError(f"layer {self.name}: calibration input has width {x.shape[-1]}, expected K={self.k}")
        x = x.reshape(-1, self.k).to(device=self.abs_sum.device, dtype=torch.float32)
        abs_sum = x.abs().sum(dim=0)
        if not torch.isfinite(abs_sum).all():  # NaN or Inf in x (or magnitudes summing past 3e38)
            raise StatisticsError(f"layer {self.name}: calibration input holds NaN or Inf")
        self.count += x.shape[0]
        self.abs_sum += abs_sum
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)
        else:
            self.sq_sum += (x * x).sum(dim=0)

    def _check(self) -> None:
        if self.count == 0:
            raise StatisticsError(f"layer {self.name}: no calibration data was accumulated")

    @property
    def channel_sq_mean(self) -> torch.Tensor:
        """s [K] (float64)."""
        self._check()
        sq_sum = torch.diagonal(self.xtx).double() if self.xtx is not None else self.sq_sum
        return sq_sum / self.count

    @property
    def channel_abs_mean(self) -> torch.Tensor:
        """a [K] (float64)."""
        self._check()
        return self.abs_sum / self.count

    @property
    def hessian(self) -> torch.Tensor:
        """H = X^T X / n [K, K] (float32)."""
        self._check()
        if self.xtx is None:
            raise StatisticsError(f"layer {self.name}: the Hessian was not accumulated (hessian=False)")
        return self.xtx / self.count

    def output_error(self, w: torch.Tensor, w_approx: torch.Tensor) -> float:
        """||X W - X W'|| / ||X W|| over the calibration inputs, from H (for the columns given)."""
        # tr(E^T H E) = sum((H E) * E): one float32 product of H with [E, W]
        h = self.hessian.to(device=w.device, dtype=torch.float32)
        e, w = (w - w_approx).float(), w.float()
        he, hw = (h @ torch.cat([e, w], dim=1)).split(e.shape[1], dim=1)
        num, den = float((he * e).sum().clamp_min(0)), float((hw * w).sum())
        return math.sqrt(num / den) if den > 0 else float("nan")


class DampedHessian:
    """H + damp * mean(diag H) * I, with never-active channels (diag 0) set to 1, and its Cholesky
    factor H = C C^T (float32). GPTQ and the Hessian adapters share one factorisation."""

    def __init__(self, hessian: torch.Tensor, damp: float, device: str | torch.device = "cpu"):
        h = hessian.to(device=device, dtype=torch.float32).clone()
        self.dead = torch.diag(h) == 0  # channels that never fire: their weights cannot matter
        h[self.dead, self.dead] = 1
        h += max(damp, 1e-6) * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        self.cholesky = torch.linalg.cholesky(h)

    def inverse_upper_factor(self) -> torch.Tensor:
        """Upper Cholesky factor U of H^-1 (H^-1 = U^T U): GPTQ's view of the remaining rows."""
        return torch.linalg.cholesky(torch.cholesky_inverse(self.cholesky), upper=True)
