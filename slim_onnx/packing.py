"""Building SlimWeights from float matrices (quantize, optionally 2:4-prune, pack)."""

from __future__ import annotations

import numpy as np
import torch

from slim_onnx.algorithms.masks import magnitude_2of4_mask
from slim_onnx.algorithms.quantizers import quantize_absmax
from slim_onnx.format import SlimWeights, pack_2of4_int4, pack_dense_int4


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
    """Pack already-quantized main weights q [K, N] (scales [G, N]) plus float adapters L [K, r], R [r, N]."""
    k, n = q.shape
    packed = pack_2of4_int4(q) if sparse else pack_dense_int4(q)
    fields = dict(k=k, n=n, w=packed, w_scales=scales.astype(np.float16), group_size=group_size, sparse=sparse)
    if bias is not None:
        fields["bias"] = np.asarray(bias, dtype=np.float32)
    if adapters is not None:
        l, r = adapters
        fields.update(rank=l.shape[1], adapter_format=adapter_format, adapter_group_size=adapter_group_size)
        if adapter_format == "float16":
            fields.update(adapter_l=l.astype(np.float16), adapter_r=r.astype(np.float16))
        elif adapter_format == "int4":
            lq, ls = absmax_int4(l, adapter_group_size)
            rq, rs = absmax_int4(r, adapter_group_size)
            fields.update(adapter_l=pack_dense_int4(lq), adapter_l_scales=ls, adapter_r=pack_dense_int4(rq), adapter_r_scales=rs)
        else:
            raise ValueError(f"adapter_format must be 'float16' or 'int4' when adapters are given, got {adapter_format!r}")
    return SlimWeights(**fields)


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
