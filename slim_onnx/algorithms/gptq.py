"""GPTQ (OPTQ) with K-group scales, optionally with SparseGPT's 2:4 pruning in the same pass.

Both minimise the layer-output error ||X W - X W'||^2 = tr(E^T H E) (H = X^T X / n, E = W - W')
one input channel k at a time (W is [K, N], rows = input channels), in the order k = 0..K-1:

  Hinv = upper Cholesky factor U of (H + damp I)^-1       (so the remaining rows' inverse Hessian
                                                           is read off U without re-inverting)
  for each row k:
      at the first row of a scale group: s[g, n] = max|W[g rows, n]| / qmax, from the updated W
      2:4 (SparseGPT): at k % 4 == 0, in every column prune the 2 of rows k..k+3 with the smallest
                       OBS saliency W[k', n]^2 / U[k', k']^2
      W'[k] = Q(W[k]) (0 where pruned);  err = (W[k] - W'[k]) / U[k, k]
      W[k+1:] -= U[k, k+1:]^T err     (the OBS update: later rows absorb row k's error)
Updates inside a block of `block` rows are applied row by row, and to the rest of W once per block.
Every step acts on each column n alone, so W is processed COLUMN_CHUNK columns at a time.
"""

from __future__ import annotations

import torch

from slim_onnx.algorithms.groups import num_groups
from slim_onnx.algorithms.quantizers import qrange, scales_from_clip
from slim_onnx.algorithms import COLUMN_CHUNK
from slim_onnx.algorithms.stats import DampedHessian


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor | DampedHessian,
    group_size: int,
    bits: int = 4,
    sparse_2of4: bool = False,
    damp: float = 0.01,
    block: int = 128,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int8 [K, N], scales float16 [G, N], kept-mask bool [K, N]).

    mask: a fixed kept-mask (e.g. Wanda's) instead of choosing one; pruned weights are zeroed and
    their error is fed forward like any quantization error.
    """
    if mask is not None and sparse_2of4:
        raise ValueError("give either a fixed mask or sparse_2of4=True, not both")
    k, n = w.shape
    if sparse_2of4 and k % 4:
        raise ValueError(f"2:4 sparsity needs K divisible by 4, got K={k}")
    damped = hessian if isinstance(hessian, DampedHessian) else DampedHessian(hessian, damp, w.device)
    u = damped.inverse_upper_factor()
    q = torch.zeros(k, n, dtype=torch.int8, device=w.device)
    scales = torch.zeros(num_groups(k, group_size), n, dtype=torch.float16, device=w.device)
    keep = torch.ones(k, n, dtype=torch.bool, device=w.device) if mask is None else mask.to(w.device).clone()
    for c0 in range(0, n, COLUMN_CHUNK):
        cols = slice(c0, min(n, c0 + COLUMN_CHUNK))
        chunk = w[:, cols].detach().to(torch.float32).clone()
        chunk[damped.dead, :] = 0
        q[:, cols], scales[:, cols] = _quantize_columns(chunk, u, keep[:, cols], group_size, bits, sparse_2of4, block)
    return q, scales, keep


def _quantize_columns(w: torch.Tensor, u: torch.Tensor, keep: torch.Tensor, group_size: int, bits: int,
                      sparse_2of4: bool, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales) of the columns `w` (overwritten), updating their kept-mask `keep` in place."""
    k, n = w.shape
    lo, hi = qrange(bits)
    q = torch.zeros(k, n, dtype=torch.int8, device=w.device)
    scales = torch.zeros(num_groups(k, group_size), n, dtype=torch.float16, device=w.device)
    block = max(4, block - block % 4)
    step = None
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        w_blk = w[b0:b1].clone()
        u_blk = u[b0:b1, b0:b1]
        err_blk = torch.zeros_like(w_blk)
        for i in range(b1 - b0):
            row = b0 + i
            if row % group_size == 0:
                ahead = group_size - (b1 - row)  # rows of the group beyond this block
                group_rows = torch.cat([w_blk[i:], w[b1 : b1 + max(ahead, 0)]])[:group_size]
                scales[row // group_size] = scales_from_clip(group_rows.abs().amax(dim=0), bits)
                step = scales[row // group_size].float()
            if sparse_2of4 and row % 4 == 0:
                saliency = w_blk[i : i + 4] ** 2 / torch.diag(u_blk)[i : i + 4, None] ** 2
                drop = torch.topk(saliency, 2, dim=0, largest=False).indices
                keep[row : row + 4].scatter_(0, drop, False)
            safe = torch.where(step > 0, step, torch.ones_like(step))
            q_row = torch.clamp(torch.round(w_blk[i] / safe), lo, hi) * (step > 0) * keep[row]
            q[row] = q_row.to(torch.int8)
            err = (w_blk[i] - q_row * step) / u_blk[i, i]
            w_blk[i:] -= u_blk[i, i:, None] * err[None, :]
            err_blk[i] = err
        w[b1:] -= u[b0:b1, b1:].T @ err_blk
    return q, scales
