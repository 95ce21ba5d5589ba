import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def random_2of4(rng: np.random.Generator, k: int, n: int, keep: int = 2) -> np.ndarray:
    """Random int4 [K, N] with at most `keep` nonzeros in each group of 4 consecutive k (K padded to 4)."""
    kp = -(-k // 4) * 4
    q = rng.integers(-8, 8, size=(kp, n))
    groups = q.reshape(kp // 4, 4, n)
    drop = np.argsort(rng.random(groups.shape), axis=1)[:, keep:, :]
    np.put_along_axis(groups, drop, 0, axis=1)
    return groups.reshape(kp, n)[:k].astype(np.int8)


def random_weights(
    rng: np.random.Generator,
    k: int,
    n: int,
    *,
    sparse: bool = True,
    group_size: int = 32,
    adapter_format: str = "none",
    rank: int = 0,
    bias: bool = False,
):
    from slim_onnx.format import num_groups
    from slim_onnx.packing import pack_quantized

    q = random_2of4(rng, k, n) if sparse else rng.integers(-8, 8, size=(k, n)).astype(np.int8)
    scales = (rng.random((num_groups(k, group_size), n)) * 0.1 + 0.01).astype(np.float16)
    adapters = None
    if adapter_format != "none":
        adapters = (
            (rng.standard_normal((k, rank)) * 0.2).astype(np.float32),
            (rng.standard_normal((rank, n)) * 0.2).astype(np.float32),
        )
    return pack_quantized(
        q,
        scales,
        group_size,
        sparse,
        adapters,
        adapter_format if adapters is not None else "int4",
        adapter_group_size=32,
        bias=rng.standard_normal(n).astype(np.float32) if bias else None,
    )


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
