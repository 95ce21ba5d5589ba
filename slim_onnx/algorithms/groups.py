"""The arithmetic of K-group scales, one copy for the quantizers, GPTQ, the packed layout and its
numpy reference. A [K, N] weight has one scale per column and group of `group_size` consecutive k
(the last group may be short): W[k, n] ~ q[k, n] * scales[k // group_size, n].

Plain numpy, no torch: `dequantize` takes numpy arrays or torch tensors alike.
"""

from __future__ import annotations

import numpy as np


def num_groups(k: int, group_size: int) -> int:
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be positive")
    return -(-k // group_size)


def group_of_rows(k: int, group_size: int) -> np.ndarray:
    """The scale row of each of the K weight rows: k // group_size."""
    return np.arange(k) // group_size


def dequantize(q, scales, group_size: int):
    """W[k, n] = q[k, n] * scales[k // group_size, n] in float32, for numpy arrays or torch tensors."""
    rows = group_of_rows(q.shape[0], group_size)
    if isinstance(q, np.ndarray):
        return q.astype(np.float32) * scales.astype(np.float32)[rows]
    return q.float() * scales.float()[rows]
