"""One weight matrix through the whole SLiM method: mask, quantize, fit adapters.

  1. 2:4 mask M along K (magnitude / Wanda on the original W; SparseGPT chooses it inside GPTQ)
  2. W_c = M * Q(W): SLiM-Quant, AbsMax, or GPTQ (error feedback through the Hessian)
  3. adapters L, R: rank-r SVD of the (saliency-weighted) error W - W_c, then quantized
  4. optionally W_c = M * Q(W - L R) again (the reference code's second pass)
  5. measure the errors.
The result is the quantized layer (integers, scales, mask, adapters): packing it into the op's layout
is packing.pack_layer's job.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from slim_onnx.algorithms import COLUMN_CHUNK
from slim_onnx.algorithms.gptq import gptq_quantize
from slim_onnx.algorithms.groups import dequantize
from slim_onnx.algorithms.lowrank import hessian_low_rank_factors, low_rank_factors, saliency
from slim_onnx.algorithms.masks import magnitude_2of4_mask, wanda_2of4_mask
from slim_onnx.algorithms.quantizers import quantize_absmax, quantize_slim
from slim_onnx.algorithms.stats import DampedHessian, LayerStatistics
from slim_onnx.config import SlimConfig


class CompressionError(ValueError):
    """A weight or its statistics cannot be compressed as configured; the message names the layer."""


@dataclasses.dataclass
class QuantizedLayer:
    """One compressed weight W [K, N] as integers: W ~ q * scales (+ L R), the report of its errors.

    q: int8 [K, N], zero where pruned; scales: float16 [groups, N], group_size rows of K each;
    mask: bool [K, N] kept weights of the 2:4 pattern (None when dense); adapters: None, or for
    "float16" (L [K, r], R [r, N]) float16, for "int4" ((L_q, L_scales), (R_q, R_scales)) with groups
    of adapter_group_size along each factor's reduction dimension.
    """

    q: np.ndarray
    scales: np.ndarray
    group_size: int
    mask: np.ndarray | None
    bias: np.ndarray | None
    adapter_format: str
    adapters: tuple | None
    adapter_group_size: int
    report: dict

    @property
    def sparse(self) -> bool:
        return self.mask is not None

    def adapter_matrices(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Float32 (L [K, r], R [r, N]) as the kernel multiplies them, or None."""
        if self.adapters is None:
            return None
        if self.adapter_format == "float16":
            return tuple(a.astype(np.float32) for a in self.adapters)
        return tuple(dequantize(q, s, self.adapter_group_size) for q, s in self.adapters)

    def effective_weight(self) -> np.ndarray:
        """The float32 [K, N] matrix the layer multiplies by: W_c + L R."""
        w = dequantize(self.q, self.scales, self.group_size)
        adapters = self.adapter_matrices()
        return w if adapters is None else w + adapters[0] @ adapters[1]


def _check_inputs(name: str, w: torch.Tensor, stats: LayerStatistics | None, config: SlimConfig) -> None:
    if w.ndim != 2:
        raise CompressionError(f"layer {name}: expected a 2-D [K, N] weight, got shape {tuple(w.shape)}")
    k, n = w.shape
    if not torch.isfinite(w).all():
        raise CompressionError(f"layer {name}: the weight holds NaN or Inf")
    if config.sparsity == "2:4" and k % 4:
        raise CompressionError(f"layer {name}: 2:4 sparsity needs K divisible by 4, got K={k}; keep this layer dense")
    if stats is not None:
        if stats.k != k:
            raise CompressionError(f"layer {name}: statistics are for K={stats.k}, the weight has K={k}")
        summed = [t for t in (stats.sq_sum, stats.abs_sum, stats.xtx) if t is not None]
        if not all(torch.isfinite(t).all() for t in summed):
            raise CompressionError(f"layer {name}: calibration statistics hold NaN or Inf")
    if config.needs_statistics and (stats is None or stats.count == 0):
        raise CompressionError(f"layer {name}: this configuration needs calibration statistics")
    if config.needs_hessian and stats.xtx is None:
        raise CompressionError(f"layer {name}: GPTQ/SparseGPT and Hessian adapters need LayerStatistics(hessian=True)")


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy()


def _score_mask(w, channel_sq_mean, config: SlimConfig):
    return magnitude_2of4_mask(w) if config.pruning == "magnitude" else wanda_2of4_mask(w, channel_sq_mean)


def _quantize(w, mask, hessian, config: SlimConfig):
    """(q, scales, mask) for the masked weight with the configured quantizer."""
    sparse = config.sparsity == "2:4"
    if config.quantizer == "gptq":
        chosen_by_gptq = sparse and config.pruning == "sparsegpt"
        return gptq_quantize(
            w, hessian, config.group_size, config.bits, sparse_2of4=chosen_by_gptq, damp=config.damp,
            mask=None if chosen_by_gptq or not sparse else mask,
        )
    masked = w * mask if mask is not None else w
    if config.quantizer == "absmax":
        q, scales = quantize_absmax(masked, config.group_size, config.bits)
    else:
        q, scales = quantize_slim(masked, config.group_size, config.bits, per_group=config.quantizer == "slim-group", mask=mask)
    return q, scales, mask


def _quantize_weight(w: torch.Tensor, s, hessian, config: SlimConfig):
    """Steps 1-2: (q, scales, mask) of W with the configured mask and quantizer."""
    scored_mask = config.sparsity == "2:4" and config.pruning in ("magnitude", "wanda")
    if scored_mask and config.mask_on == "quantized" and config.quantizer != "gptq":
        # the paper's order: quantize the dense W, then prune the quantized weights
        q, scales, _ = _quantize(w, None, hessian, config)
        mask = _score_mask(dequantize(q, scales, config.group_size), s, config)
        return q * mask, scales, mask
    mask = _score_mask(w, s, config) if scored_mask else None
    return _quantize(w, mask, hessian, config)


def _fit_adapters(w: torch.Tensor, q, scales, rank: int, s, stats, hessian, config: SlimConfig):
    """Step 3: (adapters as stored, (L, R) float32 as the kernel multiplies them) for W - W_c."""
    error = dequantize(q, scales, config.group_size)
    torch.sub(w, error, out=error)  # E = W - W_c in W_c's buffer, which the fit then overwrites
    if config.lowrank == "hessian":
        l, r = hessian_low_rank_factors(error, rank, hessian, config.damp, config.svd, config.seed, overwrite=True)
    else:
        stat = s if config.saliency == "rms" else stats.channel_abs_mean.to(w.device)
        x = saliency(stat, config.saliency) if config.lowrank == "saliency" else None
        l, r = low_rank_factors(error, rank, x, config.svd, config.seed, overwrite=True)
    del error
    if config.adapter_format == "float16":
        adapters = (l.half(), r.half())
        return adapters, tuple(a.float() for a in adapters)
    # continue with the adapters the kernel will really use
    adapters = (quantize_absmax(l, config.adapter_group_size), quantize_absmax(r, config.adapter_group_size))
    return adapters, tuple(dequantize(qa, sa, config.adapter_group_size) for qa, sa in adapters)


def _start(w, stats: LayerStatistics | None, config: SlimConfig, name: str):
    """W as float32 on the configured device, checked, with the statistics the algorithms read:
    (w, per-channel mean x^2 or None, DampedHessian or None)."""
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CompressionError(f"layer {name}: device='cuda' was asked for, but torch sees no CUDA device")
    w = torch.as_tensor(np.asarray(w) if not isinstance(w, torch.Tensor) else w).to(device=device, dtype=torch.float32)
    _check_inputs(name, w, stats, config)
    if config.bits != 4:
        raise CompressionError(f"layer {name}: the SlimMatMul format packs bits=4, got bits={config.bits}")
    s = stats.channel_sq_mean.to(device) if stats is not None and stats.count else None
    hessian = DampedHessian(stats.hessian, config.damp, device) if config.needs_hessian else None
    return w, s, hessian


def compress_layer(
    w, stats: LayerStatistics | None, config: SlimConfig = SlimConfig(), name: str = "layer", bias=None
) -> QuantizedLayer:
    """Compress W [K, N] (numpy or torch) with `config`: the quantized layer, with a report of its errors."""
    start = time.perf_counter()
    w, s, hessian = _start(w, stats, config, name)
    k, n = w.shape
    rank = config.resolve_rank(k, n)
    sparse = config.sparsity == "2:4"
    q, scales, mask = _quantize_weight(w, s, hessian, config)
    adapters = matrices = None
    if rank > 0:
        adapters, matrices = _fit_adapters(w, q, scales, rank, s, stats, hessian, config)
        if config.requantize:
            q, scales, mask = _quantize(w - matrices[0] @ matrices[1], mask, hessian, config)

    def effective(cols) -> torch.Tensor:
        """Columns `cols` of the matrix the layer multiplies by: W_c + L R."""
        return _effective(q, scales, matrices, cols, config.group_size)

    if adapters is not None:  # to numpy: float16 (L, R), or int4 ((L_q, L_scales), (R_q, R_scales))
        adapters = tuple(_numpy(a) if config.adapter_format == "float16" else tuple(map(_numpy, a)) for a in adapters)
    layer = QuantizedLayer(
        _numpy(q), _numpy(scales), config.group_size, _numpy(mask.bool()) if sparse else None,
        None if bias is None else np.asarray(bias, dtype=np.float32), config.adapter_format if rank else "none",
        adapters, config.adapter_group_size, report={},
    )
    layer.report = layer_report(name, w, effective, layer, rank, stats, config, time.perf_counter() - start)
    return layer


def _effective(q, scales, matrices, cols, group_size: int) -> torch.Tensor:
    """Columns `cols` of W_c + L R (matrices = (L, R) or None)."""
    w_eff = dequantize(q[:, cols], scales[:, cols], group_size)
    if matrices is not None:
        w_eff += matrices[0].float() @ matrices[1][:, cols].float()
    return w_eff


def candidate_errors(w, stats: LayerStatistics, configs: list[SlimConfig], name: str = "layer",
                     weight_of: int | None = None) -> tuple[list[float], np.ndarray | None]:
    """The relative squared layer-output error tr(E^T H E) / tr(W^T H W) (the calibration tokens'
    ||x E||^2 over ||x W||^2, E = W minus what the layer would multiply by: the square of the
    reports' output_error) of W [K, N] compressed with each of `configs`, which may differ in
    sparsity and adapter rank only: the weights are quantized once per sparsity and the adapters
    fitted per rank on that. On at most 1024 evenly spaced columns, as the reports. Also the float32
    [K, N] matrix configs[weight_of] multiplies by (W_c + L R, as compress_layer's
    effective_weight), or None."""
    if stats is None or stats.xtx is None:
        raise CompressionError(f"layer {name}: predicting output errors needs LayerStatistics(hessian=True)")
    # one conversion of W and one factorisation of H for all: the configs share everything else
    w_t, s, hessian = _start(w, stats, max(configs, key=lambda c: c.needs_hessian), name)
    k, n = w_t.shape
    cols = torch.linspace(0, n - 1, min(n, 1024), device=w_t.device).round().long().unique()
    h = stats.hessian.to(device=w_t.device, dtype=torch.float32)
    energy = float(((h @ w_t[:, cols]) * w_t[:, cols]).sum())
    quantized, errors, weight = {}, [], None
    for index, config in enumerate(configs):
        _check_inputs(name, w_t, stats, config)
        if config.sparsity not in quantized:
            quantized[config.sparsity] = _quantize_weight(w_t, s, hessian, config)
        q, scales, mask = quantized[config.sparsity]
        rank = config.resolve_rank(k, n)
        matrices = _fit_adapters(w_t, q, scales, rank, s, stats, hessian, config)[1] if rank else None
        if matrices is not None and config.requantize:  # as compress_layer does
            q, scales, _ = _quantize(w_t - matrices[0] @ matrices[1], mask, hessian, config)
        e = w_t[:, cols] - _effective(q, scales, matrices, cols, config.group_size)
        errors.append(float(((h @ e) * e).sum().clamp_min(0)) / energy if energy > 0 else 0.0)
        if index == weight_of:
            weight = _numpy(_effective(q, scales, matrices, slice(None), config.group_size))
    return errors, weight


def layer_report(name, w: torch.Tensor, effective, layer: QuantizedLayer, rank: int, stats,
                 config: SlimConfig, seconds: float) -> dict:
    """Errors of one compressed layer; effective(cols) gives those columns of the matrix it encodes
    (summed COLUMN_CHUNK columns at a time). Its packed bytes are added where it is packed."""
    k, n = layer.q.shape
    s = stats.channel_sq_mean.to(w) if stats is not None and stats.count else None
    sums = torch.zeros(4, dtype=torch.float64)  # ||E||^2, ||W||^2, and both weighted by s
    for c0 in range(0, n, COLUMN_CHUNK):
        cols = slice(c0, c0 + COLUMN_CHUNK)
        part = w[:, cols]
        e2, w2 = (part - effective(cols)) ** 2, part**2
        sums[:2] += torch.stack([e2.sum(), w2.sum()]).double().cpu()
        if s is not None:
            sums[2:] += torch.stack([(s[:, None] * e2).sum(), (s[:, None] * w2).sum()]).double().cpu()
    report = {
        "layer": name,
        "shape": [k, n],
        "method": {
            "sparsity": config.sparsity, "pruning": config.pruning if config.sparsity == "2:4" else None,
            "quantizer": config.quantizer, "group_size": config.group_size, "rank": rank,
            "lowrank": config.lowrank if rank else None, "adapter_format": layer.adapter_format,
        },
        "bytes_float16": k * n * 2,
        "weight_error": float(torch.sqrt(sums[0] / sums[1])),
        "seconds": round(seconds, 3),
    }
    if s is not None:
        if stats.xtx is not None:  # on at most 1024 evenly spaced output columns: exact for most layers, cheap for all
            cols = torch.linspace(0, n - 1, min(n, 1024), device=w.device).round().long().unique()
            report["output_error"] = stats.output_error(w[:, cols], effective(cols))
        report["activation_weighted_error"] = float(torch.sqrt(sums[2] / sums[3]))
    return report
