"""The packed SlimMatMul weight layout (SlimWeights) and its numpy reference (docs/op-spec.md).

Everything here is plain numpy and is the ground truth the C++/CUDA kernels and the ONNX fallback
functions are tested against: ``pack_*`` turns quantized integers into the op's uint8 tensors,
``unpack_*`` turns them back, and ``reference_slim_matmul`` computes the op's output.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from slim_onnx.algorithms.groups import dequantize, num_groups
from slim_onnx.schema import ADAPTER_FORMATS, SLIM_MATMUL_INPUTS, SlimMatMulVariant

TILE_N = 8  # output columns per tile
BLOCK_K = 8  # reduction rows per block (two groups of 4 for 2:4)
SPARSE_BLOCK_BYTES = 24
DENSE_BLOCK_BYTES = 32


class FormatError(ValueError):
    """A tensor does not fit the SlimMatMul packed format."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_group_size(k: int, group_size: int, what: str = "group_size") -> None:
    if group_size < 1 or (group_size % BLOCK_K != 0 and group_size < k):
        raise FormatError(
            f"{what}={group_size} must be a multiple of {BLOCK_K}, or >= K={k} (one group per column)"
        )


def _tiles(q: np.ndarray) -> np.ndarray:
    """[K, N] ints -> [Nt, Kb, 8 (column), 8 (k in block)] zero-padded, as int8."""
    q = np.asarray(q)
    if q.ndim != 2:
        raise FormatError(f"expected a 2-D [K, N] matrix, got shape {q.shape}")
    if q.size and (q.min() < -8 or q.max() > 7):
        raise FormatError("4-bit values must lie in [-8, 7]")
    k, n = q.shape
    kp, np_ = _ceil_div(k, BLOCK_K) * BLOCK_K, _ceil_div(n, TILE_N) * TILE_N
    padded = np.zeros((kp, np_), dtype=np.int8)
    padded[:k, :n] = q
    # [Kb, 8k, Nt, 8c] -> [Nt, Kb, 8c, 8k]
    return padded.reshape(kp // BLOCK_K, BLOCK_K, np_ // TILE_N, TILE_N).transpose(2, 0, 3, 1)


def _untile(blocks: np.ndarray, k: int, n: int) -> np.ndarray:
    """Inverse of _tiles: [Nt, Kb, 8c, 8k] -> [K, N]."""
    nt, kb = blocks.shape[:2]
    dense = blocks.transpose(1, 3, 0, 2).reshape(kb * BLOCK_K, nt * TILE_N)
    return dense[:k, :n]


def _nibble_record(entries: np.ndarray) -> np.ndarray:
    """[..., 32] values in [-8, 7] -> [..., 16] bytes (entry e<16: low nibble of byte e, else high of e-16)."""
    u = (entries.astype(np.int16) + 8).astype(np.uint8)
    return (u[..., :16] | (u[..., 16:] << 4)).astype(np.uint8)


def _nibble_entries(record: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] values in [-8, 7]."""
    lo = (record & 0x0F).astype(np.int8) - 8
    hi = (record >> 4).astype(np.int8) - 8
    return np.concatenate([lo, hi], axis=-1)


def _check_packed(packed: np.ndarray, k: int, n: int, block_bytes: int, what: str) -> None:
    want = (_ceil_div(n, TILE_N), _ceil_div(k, BLOCK_K), block_bytes)
    if packed.dtype != np.uint8 or packed.shape != want:
        raise FormatError(f"{what}: expected uint8 {want} for K={k}, N={n}, got {packed.dtype} {packed.shape}")


def _kept_positions() -> np.ndarray:
    """For each 4-bit nonzero pattern with <= 2 bits set: the two positions a sparse block stores."""
    table = np.zeros((16, 2), dtype=np.uint8)
    for pattern in range(16):
        bits = [p for p in range(4) if pattern >> p & 1]
        if len(bits) <= 2:
            table[pattern] = (bits + [p for p in range(4) if p not in bits])[:2]
    return table


_KEPT_POSITIONS = _kept_positions()


def pack_2of4_int4(q: np.ndarray) -> np.ndarray:
    """Pack a [K, N] int matrix in [-8, 7] with at most 2 nonzeros per 4 consecutive k (per column)."""
    blocks = _tiles(q)  # [Nt, Kb, 8c, 8k]
    groups = blocks.reshape(*blocks.shape[:3], 2, 4)  # [Nt, Kb, 8c, 2 groups, 4 positions]
    nonzero = groups != 0
    if (nonzero.sum(-1) > 2).any():
        t, b, c, g = np.argwhere(nonzero.sum(-1) > 2)[0]
        raise FormatError(
            f"not 2:4 sparse: column {t * TILE_N + c}, k {b * BLOCK_K + 4 * g}..{b * BLOCK_K + 4 * g + 3} "
            "holds more than 2 nonzeros"
        )
    # Two kept positions per group: the nonzeros in k order, then zeros to fill, looked up by the
    # group's 4-bit nonzero pattern.
    pattern = (nonzero * np.array([1, 2, 4, 8], dtype=np.uint8)).sum(-1)  # [Nt, Kb, 8c, 2g]
    order = _KEPT_POSITIONS[pattern]  # [Nt, Kb, 8c, 2g, 2 slots]
    values = np.take_along_axis(groups, order.astype(np.intp), axis=-1)
    slots_val = values.reshape(*blocks.shape[:3], 4)  # slot s = 2g + j
    slots_pos = order.reshape(*blocks.shape[:3], 4)
    entries_val = slots_val.reshape(*blocks.shape[:2], 32)  # e = c*4 + s
    entries_pos = slots_pos.reshape(*blocks.shape[:2], 32)
    # entry e in byte e % 8 at bits 2 * (e // 8)
    pos = entries_pos.reshape(*blocks.shape[:2], 4, 8)
    pos_bytes = pos[..., 0, :] | (pos[..., 1, :] << 2) | (pos[..., 2, :] << 4) | (pos[..., 3, :] << 6)
    return np.concatenate([_nibble_record(entries_val), pos_bytes.astype(np.uint8)], axis=-1)


def unpack_2of4_int4(packed: np.ndarray, k: int, n: int) -> np.ndarray:
    """Inverse of pack_2of4_int4: [Nt, Kb, 24] uint8 -> [K, N] int8."""
    _check_packed(packed, k, n, SPARSE_BLOCK_BYTES, "sparse W")
    values = _nibble_entries(packed[..., :16])  # [Nt, Kb, 32]
    pos_bytes = packed[..., 16:24]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
    pos = ((pos_bytes[..., None, :] >> shifts) & 3).reshape(*packed.shape[:2], 32)
    slot = np.arange(32) % 4
    k_in_block = pos + 4 * (slot >= 2)
    blocks = np.zeros((*packed.shape[:2], TILE_N, BLOCK_K), dtype=np.int8)
    nt, kb = packed.shape[:2]
    ti, bi, ei = np.meshgrid(np.arange(nt), np.arange(kb), np.arange(32), indexing="ij")
    np.add.at(blocks, (ti, bi, ei // 4, k_in_block), values)
    return _untile(blocks, k, n)


def pack_dense_int4(q: np.ndarray) -> np.ndarray:
    """Pack a [K, N] int matrix in [-8, 7] into [Nt, Kb, 32] uint8."""
    blocks = _tiles(q)  # [Nt, Kb, 8c, 8k]
    halves = blocks.reshape(*blocks.shape[:3], 2, 4).transpose(0, 1, 3, 2, 4)  # [Nt, Kb, h, 8c, 4]
    records = _nibble_record(halves.reshape(*blocks.shape[:2], 2, 32))
    return records.reshape(*blocks.shape[:2], DENSE_BLOCK_BYTES)


def unpack_dense_int4(packed: np.ndarray, k: int, n: int) -> np.ndarray:
    """Inverse of pack_dense_int4: [Nt, Kb, 32] uint8 -> [K, N] int8."""
    _check_packed(packed, k, n, DENSE_BLOCK_BYTES, "dense W")
    entries = _nibble_entries(packed.reshape(*packed.shape[:2], 2, 16))  # [Nt, Kb, h, 32]
    halves = entries.reshape(*packed.shape[:2], 2, TILE_N, 4).transpose(0, 1, 3, 2, 4)
    return _untile(halves.reshape(*packed.shape[:2], TILE_N, BLOCK_K), k, n)


@dataclasses.dataclass
class SlimWeights:
    """The weight-side inputs and attributes of one SlimMatMul node."""

    k: int
    n: int
    w: np.ndarray  # uint8 packed
    w_scales: np.ndarray  # float16 [G, N]
    group_size: int
    sparse: bool = True
    bias: np.ndarray | None = None  # float32 [N]
    adapter_format: str = "none"
    rank: int = 0
    adapter_l: np.ndarray | None = None
    adapter_l_scales: np.ndarray | None = None
    adapter_r: np.ndarray | None = None
    adapter_r_scales: np.ndarray | None = None
    adapter_group_size: int = 128

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_group_size(self.k, self.group_size)
        _check_packed(self.w, self.k, self.n, SPARSE_BLOCK_BYTES if self.sparse else DENSE_BLOCK_BYTES, "W")
        want = (num_groups(self.k, self.group_size), self.n)
        if self.w_scales.dtype != np.float16 or self.w_scales.shape != want:
            raise FormatError(f"W_scales: expected float16 {want}, got {self.w_scales.dtype} {self.w_scales.shape}")
        if self.bias is not None and (self.bias.dtype != np.float32 or self.bias.shape != (self.n,)):
            raise FormatError(f"bias: expected float32 ({self.n},), got {self.bias.dtype} {self.bias.shape}")
        if self.adapter_format not in ADAPTER_FORMATS:
            raise FormatError(f"adapter_format must be one of {ADAPTER_FORMATS}, got {self.adapter_format!r}")
        if (self.adapter_format == "none") != (self.rank == 0):
            raise FormatError("rank must be 0 exactly when adapter_format is 'none'")
        if self.adapter_format == "float16":
            for name, arr, shape in (("L", self.adapter_l, (self.k, self.rank)), ("R", self.adapter_r, (self.rank, self.n))):
                if arr is None or arr.dtype != np.float16 or arr.shape != shape:
                    raise FormatError(f"adapter {name}: expected float16 {shape}")
        elif self.adapter_format == "int4":
            check_group_size(self.k, self.adapter_group_size, "adapter_group_size")
            check_group_size(self.rank, self.adapter_group_size, "adapter_group_size")
            _check_packed(self.adapter_l, self.k, self.rank, DENSE_BLOCK_BYTES, "adapter L")
            _check_packed(self.adapter_r, self.rank, self.n, DENSE_BLOCK_BYTES, "adapter R")
            for name, arr, shape in (
                ("L_scales", self.adapter_l_scales, (num_groups(self.k, self.adapter_group_size), self.rank)),
                ("R_scales", self.adapter_r_scales, (num_groups(self.rank, self.adapter_group_size), self.n)),
            ):
                if arr is None or arr.dtype != np.float16 or arr.shape != shape:
                    raise FormatError(f"adapter {name}: expected float16 {shape}")

    @property
    def variant(self) -> SlimMatMulVariant:
        """The SlimMatMul variant of a node holding these weights (without an activation)."""
        return SlimMatMulVariant(self.sparse, self.adapter_format, self.bias is not None)

    def input_tensors(self) -> dict[str, np.ndarray | None]:
        """The op's weight-side inputs 1..7 by their op-spec names (None where absent)."""
        arrays = (self.w, self.w_scales, self.bias, self.adapter_l, self.adapter_l_scales, self.adapter_r, self.adapter_r_scales)
        return dict(zip(SLIM_MATMUL_INPUTS[1:], arrays, strict=True))

    def attributes(self, accuracy_level: int) -> dict:
        """The SlimMatMul node attributes for these weights."""
        return dict(
            K=self.k, N=self.n, bits=4, group_size=self.group_size, sparse=int(self.sparse), rank=self.rank,
            adapter_format=self.adapter_format, adapter_group_size=self.adapter_group_size,
            accuracy_level=accuracy_level,
        )

    def quantized_weight(self) -> np.ndarray:
        unpack = unpack_2of4_int4 if self.sparse else unpack_dense_int4
        return unpack(self.w, self.k, self.n)

    def dense_weight(self) -> np.ndarray:
        """The float32 [K, N] main weight the packed tensors encode."""
        return dequantize(self.quantized_weight(), self.w_scales, self.group_size)

    def adapter_matrices(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Float32 (L [K, r], R [r, N]), or None without adapters."""
        if self.adapter_format == "none":
            return None
        if self.adapter_format == "float16":
            return self.adapter_l.astype(np.float32), self.adapter_r.astype(np.float32)
        lq = unpack_dense_int4(self.adapter_l, self.k, self.rank)
        rq = unpack_dense_int4(self.adapter_r, self.rank, self.n)
        return (
            dequantize(lq, self.adapter_l_scales, self.adapter_group_size),
            dequantize(rq, self.adapter_r_scales, self.adapter_group_size),
        )

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.input_tensors().values() if a is not None)


def packed_nbytes(k: int, n: int, group_size: int, sparse: bool, rank: int = 0, adapter_format: str = "none",
                  adapter_group_size: int = 128, bias: bool = False) -> int:
    """Bytes of a SlimMatMul node's weight inputs for these attributes (SlimWeights.nbytes() of such
    a node), without packing anything: what a layer costs in each format."""
    def tiles(rows: int, cols: int) -> int:
        return _ceil_div(cols, TILE_N) * _ceil_div(rows, BLOCK_K)

    total = tiles(k, n) * (SPARSE_BLOCK_BYTES if sparse else DENSE_BLOCK_BYTES) + num_groups(k, group_size) * n * 2
    if adapter_format == "float16":
        total += (k * rank + rank * n) * 2
    elif adapter_format == "int4" and rank:
        total += (tiles(k, rank) + tiles(rank, n)) * DENSE_BLOCK_BYTES
        total += (num_groups(k, adapter_group_size) * rank + num_groups(rank, adapter_group_size) * n) * 2
    return total + (4 * n if bias else 0)


def _block_diagonal_scales(parts: list[SlimWeights], offsets, rank: int, group_size: int) -> np.ndarray:
    """R's scales [groups of the joint rank, N] for the block-diagonal joint R: each part's own
    groups at the joint groups holding its rows (concatenate_columns checks they coincide), 1
    where a part's columns have only the zeros off its block."""
    scales = np.ones((num_groups(rank, group_size), sum(p.n for p in parts)), dtype=np.float16)
    col = 0
    for o, p in zip(offsets, parts):
        first = o // group_size
        scales[first:first + p.adapter_r_scales.shape[0], col:col + p.n] = p.adapter_r_scales
        col += p.n
    return scales


def concatenate_columns(parts: list[SlimWeights]) -> SlimWeights | None:
    """One SlimWeights computing [A @ W_1 | A @ W_2 | ...] for layers that read the same A, or None
    when their formats differ (sparsity, groups, adapter kind) or, for int4 adapters, when a part's
    rows of the joint R would not keep its own adapter groups: each part's rows must start on a
    group boundary of the joint rank or lie inside one joint group (so every part keeps its scales
    exactly; q/k/v of ranks 144, 48, 48 with groups of 128 do).

    W, its scales and the biases concatenate along N; adapters as L = [L_1 | L_2 | ...] and R block
    diagonal (zeros off the blocks), so A @ L @ R is each part's own product in its columns. At
    accuracy_level 0 the result equals the parts' to float rounding; at 4 the adapter input T = A @ L
    is quantized to int8 once over the joint rank instead of per part."""
    first = parts[0]
    same = ("k", "group_size", "sparse", "adapter_format", "adapter_group_size")
    if len(parts) < 2 or any(getattr(p, f) != getattr(first, f) for p in parts for f in same):
        return None
    rank, n = sum(p.rank for p in parts), sum(p.n for p in parts)
    int4 = first.adapter_format == "int4"
    g = first.adapter_group_size
    offsets = np.cumsum([0] + [p.rank for p in parts[:-1]])
    if int4 and not all(o % g == 0 or o // g == (o + p.rank - 1) // g for o, p in zip(offsets, parts)):
        return None
    pack = pack_2of4_int4 if first.sparse else pack_dense_int4
    bias = None
    if any(p.bias is not None for p in parts):
        bias = np.concatenate([p.bias if p.bias is not None else np.zeros(p.n, np.float32) for p in parts])
    adapters = {}
    if first.adapter_format != "none":
        ls = [unpack_dense_int4(p.adapter_l, p.k, p.rank) if int4 else p.adapter_l for p in parts]
        rs = [unpack_dense_int4(p.adapter_r, p.rank, p.n) if int4 else p.adapter_r for p in parts]
        r = np.zeros((rank, n), dtype=rs[0].dtype)
        row = col = 0
        for part, block in zip(parts, rs):
            r[row:row + part.rank, col:col + part.n] = block
            row, col = row + part.rank, col + part.n
        l = np.concatenate(ls, axis=1)
        adapters = dict(adapter_l=pack_dense_int4(l) if int4 else l, adapter_r=pack_dense_int4(r) if int4 else r)
        if int4:
            adapters["adapter_l_scales"] = np.concatenate([p.adapter_l_scales for p in parts], axis=1)
            adapters["adapter_r_scales"] = _block_diagonal_scales(parts, offsets, rank, g)
    return SlimWeights(
        first.k, n, pack(np.concatenate([p.quantized_weight() for p in parts], axis=1)),
        np.concatenate([p.w_scales for p in parts], axis=1), first.group_size, first.sparse, bias,
        first.adapter_format, rank, adapter_group_size=first.adapter_group_size, **adapters,
    )


def quantize_activations_int8(a: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row and K-group symmetric int8: returns (q int32 [M, K], scale float32 [M, G]).

    Mirrors the kernels' accuracy_level=4 path: inv = 127 / max|a|, q = rint(a * inv), scale = max|a| / 127.
    """
    m, k = a.shape
    g = num_groups(k, group_size)
    q = np.zeros((m, k), dtype=np.int32)
    scale = np.zeros((m, g), dtype=np.float32)
    for gi in range(g):
        sl = slice(gi * group_size, min((gi + 1) * group_size, k))
        amax = np.abs(a[:, sl]).max(axis=1).astype(np.float32)
        nz = amax > 0
        inv = np.where(nz, np.float32(127.0) / np.where(nz, amax, 1), 0).astype(np.float32)
        q[:, sl] = np.rint(a[:, sl] * inv[:, None]).astype(np.int32)
        scale[:, gi] = amax / np.float32(127.0)
    return q, scale


def _int8_matmul(a: np.ndarray, wq: np.ndarray, w_scales: np.ndarray, group_size: int) -> np.ndarray:
    """accuracy_level=4 product of float a [M, K] with q-weights [K, N] and scales [G, N].

    A row holding a NaN or an infinity is multiplied in float instead, as the kernels do, so that NaN
    and Inf propagate as in the fallback's dense MatMul (zero weights included: inf * 0 is NaN).
    """
    non_finite = ~np.isfinite(a).all(axis=1)
    aq, a_scale = quantize_activations_int8(np.where(non_finite[:, None], 0, a), group_size)
    k = a.shape[1]
    y = np.zeros((a.shape[0], wq.shape[1]), dtype=np.float64)
    for gi in range(w_scales.shape[0]):
        sl = slice(gi * group_size, min((gi + 1) * group_size, k))
        dots = aq[:, sl].astype(np.int64) @ wq[sl].astype(np.int64)
        y += dots * (a_scale[:, gi : gi + 1].astype(np.float64) * w_scales[gi].astype(np.float64))
    if non_finite.any():
        dense = wq.astype(np.float64) * np.repeat(w_scales.astype(np.float64), group_size, axis=0)[:k]
        y[non_finite] = a[non_finite].astype(np.float64) @ dense
    return y


@np.errstate(invalid="ignore")  # NaN and Inf in `a` propagate, as in the kernels
def reference_slim_matmul(a: np.ndarray, weights: SlimWeights, accuracy_level: int = 0) -> np.ndarray:
    """The op's output for activations a [..., K], computed from the unpacked tensors (float64 sums)."""
    lead = a.shape[:-1]
    a2 = a.reshape(-1, weights.k).astype(np.float32)
    int8 = accuracy_level == 4
    if int8:
        y = _int8_matmul(a2, weights.quantized_weight(), weights.w_scales, weights.group_size)
    else:
        y = a2.astype(np.float64) @ weights.dense_weight().astype(np.float64)
    adapters = weights.adapter_matrices()
    if adapters is not None:
        if int8 and weights.adapter_format == "int4":
            t = _int8_matmul(
                a2,
                unpack_dense_int4(weights.adapter_l, weights.k, weights.rank),
                weights.adapter_l_scales,
                weights.adapter_group_size,
            ).astype(np.float32)
            y += _int8_matmul(
                t,
                unpack_dense_int4(weights.adapter_r, weights.rank, weights.n),
                weights.adapter_r_scales,
                weights.adapter_group_size,
            )
        else:
            l, r = adapters
            y += (a2.astype(np.float64) @ l.astype(np.float64)) @ r.astype(np.float64)
    if weights.bias is not None:
        y += weights.bias.astype(np.float64)
    return y.astype(np.float32).reshape(*lead, weights.n).astype(a.dtype)
