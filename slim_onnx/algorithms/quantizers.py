"""Symmetric b-bit weight quantizers with K-group scales (W is [K, N]: K inputs, N outputs).

The quantizer the kernels apply, for a group g of consecutive k in one column n:

    s = alpha / (2^(b-1) - 1)        (stored as float16)
    q = clamp(round(W / s), -2^(b-1), 2^(b-1) - 1)
    W ~ q * s

Quantizers differ only in how they choose the clip alpha:
  - AbsMax (round to nearest): alpha = max |W| over the group.
  - SLiM-Quant (paper section 3.1): alpha minimises the expected squared error, rounding plus
    clipping, of that very quantizer under the empirical distribution of W. Per tensor (the paper)
    from a histogram of W; per group (an extension) from the group's own values.
The scale is rounded to float16 before q is computed, so q is optimal for the scale the kernel uses.
"""

from __future__ import annotations

import math

import torch

from slim_onnx.algorithms.groups import group_of_rows, num_groups


def qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[K, N] -> [G, group_size, N], zero-padded."""
    k, n = w.shape
    g = num_groups(k, group_size)
    return torch.nn.functional.pad(w, (0, 0, 0, g * group_size - k)).reshape(g, group_size, n)


def quantize_with_scales(w: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int = 4) -> torch.Tensor:
    """q [K, N] (int8) for given scales [G, N] (float16-representable)."""
    lo, hi = qrange(bits)
    k = w.shape[0]
    s = scales.float()[group_of_rows(k, group_size)]
    q = torch.where(s > 0, w / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(w))
    return torch.clamp(torch.round(q), lo, hi).to(torch.int8)


def scales_from_clip(alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """float16 scales s = alpha / qmax (then used as float32)."""
    return (alpha / qrange(bits)[1]).to(torch.float16)


def quantize_absmax(w: torch.Tensor, group_size: int, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest with alpha = max|W| per group: (q int8 [K, N], scales float16 [G, N])."""
    alpha = _grouped(w.float(), group_size).abs().amax(dim=1)
    scales = scales_from_clip(alpha, bits)
    return quantize_with_scales(w.float(), scales, group_size, bits), scales


def quantization_mse(values: torch.Tensor, weights: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """sum_i weights_i * (v_i - Q_alpha(v_i))^2 for each alpha (alpha: [A] -> result [A]).

    Q is the real quantizer: step alpha / qmax, levels qmin..qmax (so the negative side reaches
    qmin/qmax * alpha). Clipping error is the part beyond the extreme levels.
    """
    lo, hi = qrange(bits)
    step = (alpha / hi)[:, None]
    q = torch.clamp(torch.round(values[None, :] / step), lo, hi) * step
    return ((values[None, :] - q) ** 2 * weights[None, :]).sum(dim=1)


def histogram(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bin centres, counts) of W over [-max|W|, max|W|] with B = max(512, min(numel/1000, 20000)) bins."""
    flat = w.reshape(-1).float()
    bins = int(max(512, min(flat.numel() // 1000, 20000)))
    amax = float(flat.abs().max())
    counts = torch.histc(flat.cpu(), bins=bins, min=-amax, max=amax).to(flat.device)
    edges = torch.linspace(-amax, amax, bins + 1, device=flat.device)
    return (edges[:-1] + edges[1:]) / 2, counts


def slim_quant_clip(w: torch.Tensor, bits: int = 4, candidates: int = 200, rounds: int = 3) -> float:
    """SLiM-Quant per tensor: the alpha minimising the histogram-weighted squared error of Q_alpha.

    Grid search over (0, max|W|], refined `rounds` times around the best point; the objective is
    smooth between grid points at this resolution, so the refinement converges to the grid optimum.
    """
    centres, counts = histogram(w)
    keep = counts > 0
    centres, counts = centres[keep], counts[keep]
    hi = float(centres.abs().max())
    lo_a, hi_a = hi * 1e-3, hi
    best = hi
    for _ in range(rounds):
        alphas = torch.linspace(lo_a, hi_a, candidates, device=centres.device)
        err = quantization_mse(centres, counts, alphas, bits)
        i = int(torch.argmin(err))
        best = float(alphas[i])
        width = (hi_a - lo_a) / (candidates - 1)
        lo_a, hi_a = max(best - width, hi * 1e-4), min(best + width, hi)
    return best


def quantize_slim(
    w: torch.Tensor, group_size: int, bits: int = 4, per_group: bool = False, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SLiM-Quant: (q int8 [K, N], scales float16 [G, N]).

    per_group=False: one alpha for the tensor (the paper), expanded to every group's scale.
    per_group=True: for each (group, column), the alpha among {r * max|W| : r in 0.30..1.00} with
    the smallest squared error of its own values (an exact search, no histogram).
    mask: only the kept weights (True) count in the error: pruned ones are dropped anyway.
    """
    k, n = w.shape
    w = w.float()
    values = w if mask is None else w[mask]
    if not per_group:
        alpha = slim_quant_clip(values if values.numel() else w, bits)
        scales = scales_from_clip(torch.full((num_groups(k, group_size), n), alpha, device=w.device), bits)
        return quantize_with_scales(w, scales, group_size, bits), scales
    grouped = _grouped(w if mask is None else w * mask, group_size)  # [G, gs, N]
    amax = grouped.abs().amax(dim=1)  # [G, N]
    lo, hi = qrange(bits)
    best_err = torch.full_like(amax, math.inf)
    best_alpha = amax.clone()
    for ratio in torch.linspace(0.30, 1.0, 36).tolist():
        alpha = amax * ratio
        step = (scales_from_clip(alpha, bits).float())[:, None, :]
        q = torch.clamp(torch.round(grouped / torch.where(step > 0, step, torch.ones_like(step))), lo, hi) * step
        err = ((grouped - q) ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_alpha = torch.where(better, alpha, best_alpha)
    scales = scales_from_clip(best_alpha, bits)
    return quantize_with_scales(w, scales, group_size, bits), scales
