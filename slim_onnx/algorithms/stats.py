"""Calibration statistics of one linear layer's input, accumulated batch by batch.

For inputs x in R^K (every token of every calibration sequence, n tokens in all):
  s_k = (1/n) sum x_k^2          per-channel mean square: the Wanda score and SLiM saliency (sqrt)
  H   = (1/n) sum x x^T          the Hessian of ||XW - XW'||^2 up to a factor 2 (GPTQ, SparseGPT,
                                  and the exact layer-output error: ||X E||^2 = n tr(E^T H E))
Sums are kept in float64 so that long calibration runs do not lose small contributions.
"""

from __future__ import annotations

import torch


class StatisticsError(ValueError):
    """Calibration statistics that cannot be used (wrong width, NaN/Inf, no data)."""


class LayerStatistics:
    def __init__(self, k: int, hessian: bool = True, device: str | torch.device = "cpu", name: str = "layer"):
        self.k = k
        self.name = name
        self.count = 0
        self.sq_sum = torch.zeros(k, dtype=torch.float64, device=device)
        self.xtx = torch.zeros(k, k, dtype=torch.float64, device=device) if hessian else None

    def update(self, x) -> None:
        """Add a batch of inputs [..., K] (numpy or torch)."""
        x = torch.as_tensor(x)
        if x.shape[-1] != self.k:
            raise StatisticsError(f"layer {self.name}: calibration input has width {x.shape[-1]}, expected K={self.k}")
        x = x.reshape(-1, self.k).to(device=self.sq_sum.device, dtype=torch.float64)
        if not torch.isfinite(x).all():
            raise StatisticsError(f"layer {self.name}: calibration input holds NaN or Inf")
        self.count += x.shape[0]
        self.sq_sum += (x * x).sum(dim=0)
        if self.xtx is not None:
            self.xtx += x.T @ x

    def _check(self) -> None:
        if self.count == 0:
            raise StatisticsError(f"layer {self.name}: no calibration data was accumulated")

    @property
    def channel_sq_mean(self) -> torch.Tensor:
        """s [K] (float64)."""
        self._check()
        return self.sq_sum / self.count

    @property
    def hessian(self) -> torch.Tensor:
        """H = X^T X / n [K, K] (float64)."""
        self._check()
        if self.xtx is None:
            raise StatisticsError(f"layer {self.name}: the Hessian was not accumulated (hessian=False)")
        return self.xtx / self.count

    def output_error(self, w: torch.Tensor, w_approx: torch.Tensor) -> float:
        """||X W - X W'|| / ||X W|| over the calibration inputs, exactly, from H."""
        h = self.hessian
        e = (w - w_approx).to(h)
        w = w.to(h)
        num = torch.einsum("kn,kj,jn->", e, h, e).clamp_min(0)
        den = torch.einsum("kn,kj,jn->", w, h, w)
        return float((num / den).sqrt()) if den > 0 else float("nan")
