"""The packed format against independent, element-by-element readings of docs/op-spec.md."""

import numpy as np
import pytest
from helpers import random_2of4, random_weights

from slim_onnx.algorithms.groups import dequantize
from slim_onnx.layout import (
    FormatError,
    SlimWeights,
    pack_2of4_int4,
    pack_dense_int4,
    unpack_2of4_int4,
    unpack_dense_int4,
)


def spec_decode_sparse(packed, k, n):
    """Brute force from the spec text: entry e of tile t, block b -> (column, k, value)."""
    out = np.zeros((k, n), dtype=np.int64)
    nt, kb, _ = packed.shape
    for t in range(nt):
        for b in range(kb):
            blk = packed[t, b]
            for e in range(32):
                u = (blk[e] & 0xF) if e < 16 else (blk[e - 16] >> 4)
                pos = (int(blk[16 + e % 8]) >> (2 * (e // 8))) & 3
                col, slot = t * 8 + e // 4, e % 4
                kk = 8 * b + 4 * (slot >= 2) + pos
                if int(u) - 8 != 0:
                    assert kk < k and col < n, "padding must hold zeros"
                    out[kk, col] += int(u) - 8
    return out


def spec_decode_dense(packed, k, n):
    out = np.zeros((k, n), dtype=np.int64)
    nt, kb, _ = packed.shape
    for t in range(nt):
        for b in range(kb):
            for h in range(2):
                rec = packed[t, b, 16 * h : 16 * h + 16]
                for e in range(32):
                    u = (rec[e] & 0xF) if e < 16 else (rec[e - 16] >> 4)
                    col, kk = t * 8 + e // 4, 8 * b + 4 * h + e % 4
                    if int(u) - 8 != 0:
                        assert kk < k and col < n
                        out[kk, col] = int(u) - 8
    return out


@pytest.mark.parametrize("k,n", [(8, 8), (4, 1), (12, 13), (36, 20), (100, 9), (576, 24)])
def test_sparse_pack_matches_spec(rng, k, n):
    q = random_2of4(rng, k, n)
    packed = pack_2of4_int4(q)
    assert packed.shape == (-(-n // 8), -(-k // 8), 24) and packed.dtype == np.uint8
    np.testing.assert_array_equal(spec_decode_sparse(packed, k, n), q)
    np.testing.assert_array_equal(unpack_2of4_int4(packed, k, n), q)


@pytest.mark.parametrize("k,n", [(8, 8), (3, 5), (13, 11), (100, 9), (130, 17)])
def test_dense_pack_matches_spec(rng, k, n):
    q = rng.integers(-8, 8, size=(k, n)).astype(np.int8)
    packed = pack_dense_int4(q)
    assert packed.shape == (-(-n // 8), -(-k // 8), 32)
    np.testing.assert_array_equal(spec_decode_dense(packed, k, n), q)
    np.testing.assert_array_equal(unpack_dense_int4(packed, k, n), q)


def test_sparse_groups_with_fewer_nonzeros(rng):
    q = random_2of4(rng, 16, 8, keep=1)
    q[:4] = 0  # an all-zero group
    np.testing.assert_array_equal(unpack_2of4_int4(pack_2of4_int4(q), 16, 8), q)


def test_not_2of4_is_rejected():
    q = np.zeros((8, 8), dtype=np.int8)
    q[4:7, 3] = 1
    with pytest.raises(FormatError, match="column 3, k 4..7"):
        pack_2of4_int4(q)


def test_out_of_range_values_are_rejected():
    with pytest.raises(FormatError, match=r"\[-8, 7\]"):
        pack_dense_int4(np.full((8, 8), 8))


def test_dequantize_groups(rng):
    """numpy arrays and torch tensors alike (the reference and the algorithms share it); a short last group."""
    import torch

    q = rng.integers(-8, 8, size=(20, 3)).astype(np.int8)
    scales = rng.random((3, 3)).astype(np.float16)
    w = dequantize(q, scales, 8)
    for k in range(20):
        np.testing.assert_array_equal(w[k], q[k] * scales[k // 8].astype(np.float32))
    np.testing.assert_array_equal(dequantize(torch.from_numpy(q), torch.from_numpy(scales), 8).numpy(), w)


def test_weights_validation_names_the_problem(rng):
    q = random_2of4(rng, 16, 8)
    packed = pack_2of4_int4(q)
    with pytest.raises(FormatError, match="W_scales: expected float16"):
        SlimWeights(k=16, n=8, w=packed, w_scales=np.ones((2, 8), np.float32), group_size=8)
    with pytest.raises(FormatError, match="group_size=12"):
        SlimWeights(k=16, n=8, w=packed, w_scales=np.ones((2, 8), np.float16), group_size=12)
    with pytest.raises(FormatError, match="rank must be 0"):
        SlimWeights(k=16, n=8, w=packed, w_scales=np.ones((2, 8), np.float16), group_size=8, rank=4)


@pytest.mark.parametrize("adapter_format,ranks", [("none", (0, 0, 0)), ("float16", (8, 8, 8)), ("int4", (8, 8, 8)),
                                                  ("int4", (40, 8, 16)), ("int4", (32, 64, 8))])
def test_concatenate_columns_matches_the_parts(rng, adapter_format, ranks):
    """The merged weights compute the parts' outputs side by side: to float rounding in float32, and
    within the int8 activations' rounding at accuracy_level 4 (the adapter input is quantized over
    the joint rank there). With int4 adapters in groups of 32 the joint rank may span several
    groups where each part keeps its own (ranks 40, 8, 16: offsets 0, 40, 48 -> groups [0, 32),
    [32, 64); ranks 32, 64, 8: offsets 0, 32, 96, each on a group boundary)."""
    from slim_onnx.layout import concatenate_columns, reference_slim_matmul

    parts = [random_weights(rng, 64, n, group_size=32, adapter_format=adapter_format, rank=r, bias=b)
             for n, b, r in zip((24, 13, 40), (True, False, True), ranks)]
    merged = concatenate_columns(parts)
    assert (merged.n, merged.rank) == (77, sum(ranks))
    a = rng.standard_normal((5, 64)).astype(np.float32)
    for level, tol in ((0, 1e-6), (4, 5e-3)):
        want = np.concatenate([reference_slim_matmul(a, p, level) for p in parts], axis=1)
        got = reference_slim_matmul(a, merged, level)
        assert np.abs(got - want).max() / np.abs(want).max() < tol, level


def test_concatenate_columns_refuses_what_it_cannot_merge(rng):
    from slim_onnx.layout import concatenate_columns

    sparse, dense = random_weights(rng, 64, 16, sparse=True), random_weights(rng, 64, 16, sparse=False)
    assert concatenate_columns([sparse, dense]) is None  # different formats
    wide = [random_weights(rng, 64, 16, adapter_format="int4", rank=24) for _ in range(2)]
    assert concatenate_columns(wide) is None  # the second part's rows 24..47 straddle the groups of 32 at 32
