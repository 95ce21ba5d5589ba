"""Low-rank compensation of the compression error (SLiM-LoRA, paper section 3.2).

With E = W - W_c ([K, N]) and a positive saliency x_k per input channel, the adapters solve

    min_{L, R} || diag(x) (E - L R) ||_F^2,   rank(L R) <= r

whose solution (Eckart-Young, because diag(x) is invertible) is the rank-r SVD of diag(x) E:

    diag(x) E ~ U_r S_r V_r^T   =>   L = diag(1/x) U_r S_r^(1/2),   R = S_r^(1/2) V_r^T

S is split evenly between L and R so that both have the same dynamic range when quantized.

"hessian" (an extension, measured in tools/eval_layers.py) uses the whole input covariance instead
of its diagonal: with H = X^T X / n = C C^T (Cholesky, dampened), ||X (E - L R)||_F^2 = n ||C^T (E - L R)||_F^2,
so the output-error-optimal adapters are L = C^-T U_r S_r^(1/2), R = S_r^(1/2) V_r^T from the SVD
of C^T E: exactly the layer-output error that GPTQ and the reports measure.
SLiM's saliency is x_k = sqrt(s_k), s_k the mean squared input of channel k, shifted by the smallest
positive s so that silent channels keep x > 0 (the reference code; the paper writes the mean |x_k|,
also available); naive LoRA is x = 1. When r is far below min(K, N),
a randomized SVD (Halko et al.: two power iterations on an (r + p)-dimensional sketch) replaces
the full one; tests compare both.
"""

from __future__ import annotations

import torch

from slim_onnx.algorithms import COLUMN_CHUNK
from slim_onnx.algorithms.stats import DampedHessian


def saliency(statistic: torch.Tensor, kind: str = "rms") -> torch.Tensor:
    """Per-channel saliency x, positive for every channel (ones if the statistic is all 0).

    kind="rms": statistic = mean x^2, x = sqrt(s + min positive s) (the reference code).
    kind="mean_abs": statistic = mean |x|, x = a + min positive a (the paper's wording).
    """
    s = statistic.to(torch.float64)
    positive = s[s > 0]
    if positive.numel() == 0:
        return torch.ones_like(s)
    shifted = s + positive.min()
    return shifted.sqrt() if kind == "rms" else shifted


def truncated_svd(m: torch.Tensor, rank: int, method: str = "auto", seed: int = 0):
    """(U [K, r], S [r], V [N, r]) of the best rank-r approximation of m."""
    if method == "auto":
        method = "randomized" if rank * 4 <= min(m.shape) else "full"
    if method == "full":
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank].T
    if method != "randomized":
        raise ValueError(f"unknown SVD method {method!r}: use 'auto', 'full' or 'randomized'")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        u, s, v = torch.svd_lowrank(m, q=min(rank + max(10, rank // 10), min(m.shape)), niter=2)
    finally:
        torch.random.set_rng_state(generator_state)
    return u[:, :rank], s[:rank], v[:, :rank]


def _working_copy(error: torch.Tensor, overwrite: bool) -> torch.Tensor:
    """The float32 error to transform: `error` itself when the caller gives it up (overwrite)."""
    if overwrite and error.dtype == torch.float32:
        return error
    return error.to(torch.float32, copy=True)


def hessian_low_rank_factors(
    error: torch.Tensor, rank: int, hessian: torch.Tensor | DampedHessian, damp: float = 0.01, method: str = "auto",
    seed: int = 0, overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L [K, r], R [r, N]) minimising tr((E - L R)^T H (E - L R)), H dampened (stats.DampedHessian).
    overwrite: `error` may be overwritten (by C^T E), which saves a [K, N] float32 copy."""
    k, n = error.shape
    if not 0 < rank <= min(k, n):
        raise ValueError(f"rank must be in 1..min(K, N)={min(k, n)}, got {rank}")
    damped = hessian if isinstance(hessian, DampedHessian) else DampedHessian(hessian, damp, error.device)
    c = damped.cholesky  # H = C C^T
    whitened = _working_copy(error, overwrite)
    for c0 in range(0, n, COLUMN_CHUNK):  # C^T E in place, a chunk of columns at a time
        whitened[:, c0 : c0 + COLUMN_CHUNK] = c.T @ whitened[:, c0 : c0 + COLUMN_CHUNK]
    u, s, v = truncated_svd(whitened, rank, method, seed)
    root = s.clamp_min(0).sqrt()
    l = torch.linalg.solve_triangular(c.T, u * root, upper=True)  # C^-T U S^(1/2)
    return l, root[:, None] * v.T


def low_rank_factors(
    error: torch.Tensor, rank: int, channel_saliency: torch.Tensor | None = None, method: str = "auto", seed: int = 0,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L [K, r], R [r, N]) minimising ||diag(x)(error - L R)||_F (x = 1 when channel_saliency is None).
    overwrite: `error` may be overwritten (by diag(x) E), which saves a [K, N] float32 copy."""
    k, n = error.shape
    if not 0 < rank <= min(k, n):
        raise ValueError(f"rank must be in 1..min(K, N)={min(k, n)}, got {rank}")
    x = torch.ones(k, dtype=torch.float32, device=error.device) if channel_saliency is None \
        else channel_saliency.to(device=error.device, dtype=torch.float32)
    weighted = _working_copy(error, overwrite)
    weighted *= x[:, None]
    u, s, v = truncated_svd(weighted, rank, method, seed)
    root = s.clamp_min(0).sqrt()
    return (u * root) / x[:, None], root[:, None] * v.T
