"""Quantized layers into the packed SlimMatMul layout: pack_layer(QuantizedLayer) -> SlimWeights.

pack_layer is the only place the algorithms' integers meet the layout (layout.py); pack_quantized
and pack_weight are its entry points for given integers or a float weight (round to nearest).
"""

from __future__ import annotations

import numpy as np
import torch

from slim_onnx.algorithms.layer import QuantizedLayer
from slim_onnx.algorithms.masks import magnitude_2of4_mask
from slim_onnx.algorithms.quantizers import quantize_absmax
from slim_onnx.layout import SlimWeights, pack_2of4_int4, pack_dense_int4


def pack_layer(layer: QuantizedLayer) -> SlimWeights:
    """The SlimMatMul weight inputs and attributes of a quantized layer."""
    k, n = layer.q.shape
    packed = pack_2of4_int4(layer.q) if layer.sparse else pack_dense_int4(layer.q)
    fields = dict(k=k, n=n, w=packed, w_scales=layer.scales.astype(np.float16), group_size=layer.group_size,
                  sparse=layer.sparse, bias=layer.bias)
    if layer.adapters is not None:
        fields.update(adapter_format=layer.adapter_format, adapter_group_size=layer.adapter_group_size)
        if layer.adapter_format == "float16":
            l, r = layer.adapters
            fields.update(rank=l.shape[1], adapter_l=l.astype(np.float16), adapter_r=r.astype(np.float16))
        else:
            (lq, ls), (rq, rs) = layer.adapters
            fields.update(rank=lq.shape[1], adapter_l=pack_dense_int4(lq), adapter_l_scales=ls,
                          adapter_r=pack_dense_int4(rq), adapter_r_scales=rs)
    return SlimWeights(**fields)


def absmax_int4(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy front of quantizers.quantize_absmax at 4 bits: (q int8 [K, N], scales float16 [G, N])."""
    q, scales = quantize_absmax(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)), group_size, 4)
    return q.numpy(), scales.numpy()


def pack_quantized(
    q: np.ndarray,
    scales: np.ndarray,
    group_size: int,
    sparse: bool,
    adapters: tuple[np.ndarray, np.ndarray] | None = None,
    adapter_format: str = "int4",
    adapter_group_size: int = 128,
    bias: np.ndarray | None = None,
) -> SlimWeights:
    """Pack quantized main weights q [K, N] (scales [G, N]) plus float adapters L [K, r], R [r, N]
    (rounded to float16, or AbsMax 4-bit with adapter_group_size)."""
    if adapters is not None and adapter_format not in ("float16", "int4"):
        raise ValueError(f"adapter_format must be 'float16' or 'int4' when adapters are given, got {adapter_format!r}")
    if adapters is not None and adapter_format == "int4":
        adapters = tuple(absmax_int4(a, adapter_group_size) for a in adapters)
    mask = q != 0 if sparse else None  # the packer reads the kept positions off q
    layer = QuantizedLayer(q, scales, group_size, mask, None if bias is None else np.asarray(bias, dtype=np.float32),
                           adapter_format if adapters is not None else "none", adapters, adapter_group_size, report={})
    return pack_layer(layer)


def pack_weight(
    w: np.ndarray,
    group_size: int = 128,
    sparse: bool = True,
    adapters: tuple[np.ndarray, np.ndarray] | None = None,
    adapter_format: str = "int4",
    bias: np.ndarray | None = None,
) -> SlimWeights:
    """Round-to-nearest AbsMax 4-bit (after a magnitude 2:4 mask if `sparse`) of a float [K, N] weight."""
    w = np.asarray(w, dtype=np.float32)
    if sparse:
        w = w * magnitude_2of4_mask(torch.from_numpy(w)).numpy()
    q, scales = absmax_int4(w, group_size)
    return pack_quantized(q, scales, group_size, sparse, adapters, adapter_format, bias=bias)
