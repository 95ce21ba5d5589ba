"""The CUDA kernels are compiled whenever the build had nvcc: CI has nvcc but no GPU, so this is what
keeps the CUDA sources compiling there. (Every CPU test runs on that same CUDA-enabled library.)"""

import os
import shutil

import numpy as np
import pytest

from slim_onnx.cuda_kernels import built_with_cuda


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH, so the build skips the CUDA kernels")
@pytest.mark.skipif(os.environ.get("SLIM_ONNX_CUDA", "").upper() == "OFF", reason="SLIM_ONNX_CUDA=OFF")
def test_library_contains_the_cuda_kernels():
    assert built_with_cuda()



def decode_fragments(frag, meta, k, n, sparse):
    """Q [K, N] back from the fragment order, read as docs/cuda.md describes it (independent of the
    C++ that writes it): per lane q = lane // 4, j = lane % 4, 8 nibbles (value + 8) at bit offsets
    0, 16, 4, 20, 8, 24, 12, 28 holding a0..a7 = rows (q, q+8) x column pairs; for 2:4 the columns
    are the kept pair of group j (a0..a3) and group j + 4 (a4..a7) of the 32-k chunk, their
    positions in the metadata word of lane 4q + 2 (c % 2) + h (h: half of the row's 8 groups),
    rows q / q + 8 in its low / high 16 bits, 4 bits per group (p0 | p1 << 2)."""
    nt, ks = frag.shape[:2]
    chunk = 32 if sparse else 16
    q_out = np.zeros((nt * 16, ks * 4 * chunk), dtype=np.int64)
    shifts = [0, 16, 4, 20, 8, 24, 12, 28]
    for t in range(nt):
        for s in range(ks):
            for c in range(4):
                k0 = (4 * s + c) * chunk
                for lane in range(32):
                    q, j = lane // 4, lane % 4
                    a = [int((int(frag[t, s, lane, c]) >> sh) & 15) - 8 for sh in shifts]
                    rows = [16 * t + q, 16 * t + q + 8]
                    if not sparse:
                        for i, (r, dk) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1), (0, 8), (0, 9), (1, 8), (1, 9)]):
                            q_out[rows[r], k0 + 2 * j + dk] = a[i]
                        continue
                    for i, (r, group) in enumerate([(0, j), (1, j), (0, j + 4), (1, j + 4)]):
                        h, slot = group // 4, group % 4
                        source = 4 * q + 2 * (c % 2) + h
                        word = int(meta[t, s, source, c // 2]) >> (16 * r)
                        p0, p1 = (word >> (4 * slot)) & 3, (word >> (4 * slot + 2)) & 3
                        assert p0 < p1  # ordered metadata
                        q_out[rows[r], k0 + 4 * group + p0] += a[2 * i]
                        q_out[rows[r], k0 + 4 * group + p1] += a[2 * i + 1]
    return q_out[:n, :k].T


@pytest.mark.skipif(not built_with_cuda(), reason="the library was built without nvcc")
@pytest.mark.parametrize("k,n,group,sparse", [(64, 32, 32, True), (100, 24, 1000, True), (48, 40, 16, False)])
def test_fragment_layout_holds_the_packed_weight(rng, k, n, group, sparse):
    """The host re-layout the CUDA kernels read, checked without a GPU: values, 2:4 positions, scales."""
    from helpers import random_weights

    from slim_onnx.cuda_kernels import fragment_layout

    w = random_weights(rng, k, n, sparse=sparse, group_size=group)
    frag, meta, pairs = fragment_layout(w)
    np.testing.assert_array_equal(decode_fragments(frag, meta, k, n, sparse), w.quantized_weight())
    scales = pairs.view(np.float16).reshape(pairs.shape[0], pairs.shape[1], 8, 2)  # (s[q], s[q + 8]) per uint32
    by_row = np.concatenate([scales[..., 0], scales[..., 1]], axis=2)  # [NT, groups, 16] rows q then q + 8
    np.testing.assert_array_equal(by_row.transpose(1, 0, 2).reshape(pairs.shape[1], -1)[:, :n], w.w_scales)
