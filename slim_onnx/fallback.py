"""Model-local ONNX functions that compute our ops with standard ops (opset 18) and onnxruntime's own.

Stock onnxruntime has no kernel for ``slim_onnx::SlimMatMul``, so it inlines the function whose
domain, name and overload match the node. Everything that unpacks the weights depends only on
initializers and attributes, so onnxruntime constant-folds it at session start: the model then runs
as a plain float MatMul (dense, slower, same result). With the slim_onnx library registered, its
kernel runs instead and the function is ignored.

One overload per variant (schema.SlimMatMulVariant): sparse or dense W, adapters none / float16 /
int4, with or without bias, and with or without the gated activation (``activation="swiglu"``).
Sizes come from the node's attributes through attribute references.

``slim_onnx::GroupQueryAttention`` (slim_onnx/passes/attention.py, kernel in csrc/attention_op.cc)
falls back to onnxruntime's ``com.microsoft::GroupQueryAttention``, which computes the same thing:
one overload with and one without ``attention_bias``, and the same two for the packed form
(schema.AttentionVariant; passes/packed_attention.py), whose function first splits q/k/v and
applies the rotary with ``com.microsoft::RotaryEmbedding``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from slim_onnx.layout import BLOCK_K, TILE_N
from slim_onnx.schema import (
    DOMAIN,
    GROUP_QUERY_ATTENTION,
    GROUP_QUERY_ATTENTION_INPUTS,
    OPSET,
    SLIM_MATMUL,
    SLIM_MATMUL_INPUTS,
    AttentionVariant,
    SlimMatMulVariant,
)

# The attributes each function body reads by reference (the others do not change what it computes).
SLIM_MATMUL_FUNCTION_ATTRIBUTES = ("K", "N", "group_size", "rank", "adapter_group_size")
ATTENTION_FUNCTION_ATTRIBUTES = ("num_heads", "kv_num_heads", "scale")


class _Body:
    """Collects the nodes of a function body with unique value names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self._count += 1
        out = f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, array: np.ndarray) -> str:
        return self.op("Constant", value=numpy_helper.from_array(np.asarray(array)))

    def attr_scalar(self, attribute: str) -> str:
        """An int64 scalar taken from the calling node's attribute."""
        self._count += 1
        out = f"{attribute}_{self._count}"
        ref = onnx.AttributeProto(name="value_int", ref_attr_name=attribute, type=onnx.AttributeProto.INT)
        node = helper.make_node("Constant", [], [out])
        node.attribute.append(ref)
        self.nodes.append(node)
        return out

    def attr_vector(self, attribute: str) -> str:
        return self.op("Unsqueeze", self.attr_scalar(attribute), self.const(np.array([0], dtype=np.int64)))


def _padded_columns(body: _Body, packed: str) -> str:
    """[Np] = 8 * (number of column tiles), as a 1-D int64 tensor."""
    tiles = body.op("Shape", packed, start=0, end=1)
    return body.op("Mul", tiles, body.const(np.array([TILE_N], dtype=np.int64)))


def _nibble_values(body: _Body, record: str) -> str:
    """uint8 [..., 16] nibble records -> float [..., 32] values (entry e<16 low nibble, else high)."""
    lo = body.op("BitwiseAnd", record, body.const(np.array(0x0F, dtype=np.uint8)))
    hi = body.op("BitShift", record, body.const(np.array(4, dtype=np.uint8)), direction="RIGHT")
    entries = body.op("Concat", lo, hi, axis=-1)
    return body.op("Sub", body.op("Cast", entries, to=TensorProto.FLOAT), body.const(np.array(8.0, dtype=np.float32)))


def _tiles_to_matrix(body: _Body, blocks: str, packed: str, perm: list[int]) -> str:
    """Transpose a tile-block tensor to [Kb, 8k, Nt, 8c] order and flatten to [Kp, Np]."""
    ordered = body.op("Transpose", blocks, perm=perm)
    shape = body.op("Concat", body.const(np.array([-1], dtype=np.int64)), _padded_columns(body, packed), axis=0)
    return body.op("Reshape", ordered, shape)


def _unpack_sparse(body: _Body, packed: str) -> str:
    """uint8 [Nt, Kb, 24] -> float q [Kp, Np]."""
    axis2 = body.const(np.array([2], dtype=np.int64))
    record = body.op("Slice", packed, body.const(np.array([0], dtype=np.int64)), body.const(np.array([16], dtype=np.int64)), axis2)
    pos_bytes = body.op("Slice", packed, body.const(np.array([16], dtype=np.int64)), body.const(np.array([24], dtype=np.int64)), axis2)
    values = _nibble_values(body, record)  # [Nt, Kb, 32]
    # entry e: bits 2*(e//8) of position byte e%8
    spread = body.op("Unsqueeze", pos_bytes, axis2)  # [Nt, Kb, 1, 8]
    shifted = body.op("BitShift", spread, body.const(np.array([[0], [2], [4], [6]], dtype=np.uint8)), direction="RIGHT")
    pos = body.op("BitwiseAnd", shifted, body.const(np.array(3, dtype=np.uint8)))
    pos = body.op("Reshape", pos, body.const(np.array([0, 0, 32], dtype=np.int64)))
    slot_base = (4 * ((np.arange(32) % 4) >= 2)).astype(np.int64)
    k_in_block = body.op("Add", body.op("Cast", pos, to=TensorProto.INT64), body.const(slot_base))
    last = body.const(np.array([-1], dtype=np.int64))
    onehot = body.op("Equal", body.op("Unsqueeze", k_in_block, last), body.const(np.arange(BLOCK_K, dtype=np.int64)))
    placed = body.op("Mul", body.op("Cast", onehot, to=TensorProto.FLOAT), body.op("Unsqueeze", values, last))
    placed = body.op("Reshape", placed, body.const(np.array([0, 0, TILE_N, 4, BLOCK_K], dtype=np.int64)))
    blocks = body.op("ReduceSum", placed, body.const(np.array([3], dtype=np.int64)), keepdims=0)  # [Nt, Kb, 8c, 8k]
    return _tiles_to_matrix(body, blocks, packed, perm=[1, 3, 0, 2])


def _unpack_dense(body: _Body, packed: str) -> str:
    """uint8 [Nt, Kb, 32] -> float q [Kp, Np]."""
    record = body.op("Reshape", packed, body.const(np.array([0, 0, 2, 16], dtype=np.int64)))
    values = _nibble_values(body, record)  # [Nt, Kb, h, 32]
    values = body.op("Reshape", values, body.const(np.array([0, 0, 2, TILE_N, 4], dtype=np.int64)))  # [Nt, Kb, h, c, j]
    return _tiles_to_matrix(body, values, packed, perm=[1, 2, 4, 0, 3])


def _dequantized(body: _Body, packed: str, scales: str, rows: str, cols: str, group: str, sparse: bool) -> str:
    """Float [rows, cols] = q * scales[k // group] for a packed 4-bit matrix."""
    q = _unpack_sparse(body, packed) if sparse else _unpack_dense(body, packed)
    zero = body.const(np.array([0, 0], dtype=np.int64))
    ends = body.op("Concat", body.op("Unsqueeze", rows, body.const(np.array([0], dtype=np.int64))), cols, axis=0)
    q = body.op("Slice", q, zero, ends)
    k = body.op("Range", body.const(np.array(0, dtype=np.int64)), rows, body.const(np.array(1, dtype=np.int64)))
    per_row = body.op("Gather", body.op("Cast", scales, to=TensorProto.FLOAT), body.op("Div", k, group), axis=0)
    return body.op("Mul", q, per_row)


def fallback_function(variant: SlimMatMulVariant) -> onnx.FunctionProto:
    """The FunctionProto (overload = variant.overload) that computes one SlimMatMul variant with standard ops."""
    body = _Body()
    k = body.attr_scalar("K")
    n_vec = body.attr_vector("N")
    w = _dequantized(body, "W", "W_scales", k, n_vec, body.attr_scalar("group_size"), variant.sparse)
    a = body.op("Cast", "A", to=TensorProto.FLOAT)
    y = body.op("MatMul", a, w)
    inputs = [name if name != "bias" or variant.bias else "" for name in SLIM_MATMUL_INPUTS]
    if variant.adapter_format == "float16":
        l = body.op("Cast", "L", to=TensorProto.FLOAT)
        r = body.op("Cast", "R", to=TensorProto.FLOAT)
        inputs[5] = inputs[7] = ""
    elif variant.adapter_format == "int4":
        rank = body.attr_scalar("rank")
        group = body.attr_scalar("adapter_group_size")
        r_vec = body.op("Unsqueeze", rank, body.const(np.array([0], dtype=np.int64)))
        l = _dequantized(body, "L", "L_scales", k, r_vec, group, sparse=False)
        r = _dequantized(body, "R", "R_scales", rank, n_vec, group, sparse=False)
    else:
        inputs[4:] = ["", "", "", ""]
    if variant.adapter_format != "none":
        y = body.op("Add", y, body.op("MatMul", body.op("MatMul", a, l), r))
    if variant.bias:
        y = body.op("Add", y, "bias")
    if variant.swiglu:  # the export's own SiLU: gate * Sigmoid(gate), times up
        body.nodes.append(helper.make_node("Split", [y], ["gate", "up"], axis=-1, num_outputs=2))
        y = body.op("Mul", body.op("Mul", "gate", body.op("Sigmoid", "gate")), "up")
    body.nodes.append(helper.make_node("CastLike", [y, "A"], ["Y"]))
    # Function inputs are positional: absent optional inputs keep their slot under a placeholder name.
    formal = [name if name else f"unused_{i}" for i, name in enumerate(inputs)]
    while formal and formal[-1].startswith("unused_"):
        formal.pop()
    fn = helper.make_function(
        DOMAIN, SLIM_MATMUL, formal, ["Y"], body.nodes, [helper.make_opsetid("", OPSET)],
        attributes=list(SLIM_MATMUL_FUNCTION_ATTRIBUTES),
    )
    fn.overload = variant.overload
    return fn


def _rotated(body: _Body, x: str, positions: str, heads_attribute: str) -> str:
    """com.microsoft::RotaryEmbedding of x [B, S, heads*D] (rotate_half) with the caches' row per position."""
    out = body.op("RotaryEmbedding", x, positions, "cos_cache", "sin_cache", domain="com.microsoft", interleaved=0)
    body.nodes[-1].attribute.append(
        onnx.AttributeProto(name="num_heads", ref_attr_name=heads_attribute, type=onnx.AttributeProto.INT)
    )
    return out


def _unpacked_rotated(body: _Body) -> tuple[str, str, str]:
    """(q, k, v) for com.microsoft's op from a packed query: split [H*D, Hkv*D, Hkv*D], q and k rotated at
    position ids b*S + s (the caches' rows)."""
    d = body.op("Shape", "past_key", start=3)
    q_size, kv_size = (body.op("Mul", body.attr_vector(a), d) for a in ("num_heads", "kv_num_heads"))
    sizes = body.op("Concat", q_size, kv_size, kv_size, axis=0)
    body.nodes.append(helper.make_node("Split", ["query", sizes], ["q", "k", "v"], axis=-1))
    batch_seq = body.op("Shape", "query", start=0, end=2)
    count = body.op("ReduceProd", batch_seq, keepdims=0)
    flat = body.op("Range", body.const(np.array(0, np.int64)), count, body.const(np.array(1, np.int64)))
    positions = body.op("Reshape", flat, batch_seq)
    return _rotated(body, "q", positions, "num_heads"), _rotated(body, "k", positions, "kv_num_heads"), "v"


def attention_fallback_function(variant: AttentionVariant) -> onnx.FunctionProto:
    """slim_onnx::GroupQueryAttention (overload = variant.overload) as com.microsoft's op, after the
    split and rotary the packed variants leave to the kernel."""
    inputs, bias = GROUP_QUERY_ATTENTION_INPUTS, variant.bias
    body = _Body()
    if variant.packed:
        formal = ["query", "unused_1", "unused_2", *inputs[3:7], "attention_bias" if bias else "unused_7",
                  "cos_cache", "sin_cache"]
        q, k, v = _unpacked_rotated(body)
    else:
        formal = list(inputs[:8] if bias else inputs[:7])
        q, k, v = formal[:3]
    # com.microsoft's inputs 7..9 (its own rotary caches, position ids) stay absent; attention_bias is input 10.
    actual = [q, k, v, *inputs[3:7]] + (["", "", "", "attention_bias"] if bias else [])
    outputs = ["output", "present_key", "present_value"]
    node = helper.make_node(GROUP_QUERY_ATTENTION, actual, outputs, domain="com.microsoft")
    for name in ATTENTION_FUNCTION_ATTRIBUTES:
        kind = onnx.AttributeProto.FLOAT if name == "scale" else onnx.AttributeProto.INT
        node.attribute.append(onnx.AttributeProto(name=name, ref_attr_name=name, type=kind))
    fn = helper.make_function(
        DOMAIN, GROUP_QUERY_ATTENTION, formal, outputs, body.nodes + [node],
        [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
        attributes=list(ATTENTION_FUNCTION_ATTRIBUTES),
    )
    fn.overload = variant.overload
    return fn
