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
    """W[k, n] = q[k, n] * scales[k // group_size, n] in float32, for numpy arrays or torch tensors.
    Scaled in place, group by group: the result is the only [K, N] buffer made."""
    k = q.shape[0]
    if isinstance(q, np.ndarray):
        w, scales = q.astype(np.float32), scales.astype(np.float32)
    else:
        w, scales = q.float(), scales.float()
    whole = k // group_size  # groups of full size: a [groups, group_size, N] view
    w[: whole * group_size].reshape(whole, group_size, *w.shape[1:])[...] *= scales[:whole, None]
    if whole * group_size < k:
        w[whole * group_size :] *= scales[whole]
    return w
