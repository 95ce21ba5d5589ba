"""Feeding the merged q/k/v SlimMatMul straight into slim_onnx::GroupQueryAttention, rotary included.

Why: after the attention fusion (passes/attention.py) and the sibling merge (passes/siblings.py) a
decoder layer at one token per step still runs a Split, three Reshape views and two RotaryEmbedding
nodes between its q/k/v product and its attention: six small nodes whose work (a copy, 2 x 64
rotations) is next to nothing beside their per-node cost. Our attention kernel reads q, k and v from
the packed product and rotates q and the new keys itself (the "packed_rotary_*" overloads, contract
in docs/op-spec.md); its fallback function does the split and the rotary with the same standard and
com.microsoft ops as before.

Matched (what the two passes leave; the rotary positions must be the fusion's own b*S + s rows):

  q, k, v = Split(P, [H*D, Hkv*D, Hkv*D], axis=-1)          P = SlimMatMul(x), nothing else reads q, k, v
  GroupQueryAttention(RotaryEmbedding(Reshape(q, [0, 0, -1]), pos, cos, sin),
                      RotaryEmbedding(Reshape(k, [0, 0, -1]), pos, cos, sin), Reshape(v, [0, 0, -1]), ...)
becomes
  GroupQueryAttention(P, -, -, ..., cos_cache=cos, sin_cache=sin)     overload "packed_rotary_" + old
"""

from __future__ import annotations

import onnx_ir as ir

from slim_onnx.passes.graph import const_ints, const_scalar, producer, remove_dead_producers, take_over_values
from slim_onnx.schema import DOMAIN, GROUP_QUERY_ATTENTION, SLIM_MATMUL, AttentionVariant


def _flat_view_source(value: ir.Value) -> ir.Value | None:
    """x when value = Reshape(x, [0, 0, -1])."""
    reshape = producer(value, "Reshape")
    return reshape.inputs[0] if reshape is not None and const_ints(reshape.inputs[1]) == [0, 0, -1] else None


def _rotary(value: ir.Value) -> ir.Node | None:
    node = value.producer()
    ok = (node is not None and node.op_type == "RotaryEmbedding" and node.domain == "com.microsoft"
          and node.attributes.get_int("interleaved", 0) == 0 and node.attributes.get_int("rotary_embedding_dim", 0) == 0)
    return node if ok else None


def _row_positions(positions: ir.Value) -> bool:
    """positions = Reshape(Range(0, ReduceProd(Shape(t, 0, 2)), 1), Shape(t, 0, 2)): row b*S + s."""
    reshape = producer(positions, "Reshape")
    rng = producer(reshape.inputs[0], "Range") if reshape is not None else None
    if rng is None or const_scalar(rng.inputs[0]) != 0 or const_scalar(rng.inputs[2]) != 1:
        return False
    count = producer(rng.inputs[1], "ReduceProd")
    shape = producer(reshape.inputs[1], "Shape")
    return (count is not None and count.inputs[0] is reshape.inputs[1] and shape is not None
            and shape.attributes.get_int("start", 0) == 0 and shape.attributes.get_int("end", -1) == 2)


def _packed_source(node: ir.Node) -> tuple[ir.Value, ir.Node, list[ir.Value]] | None:
    """(P, the q rotary, the values the attention read from it) when the module doc's pattern feeds `node`."""
    q_rot, k_rot = _rotary(node.inputs[0]), _rotary(node.inputs[1])
    if q_rot is None or k_rot is None or q_rot.inputs[1:] != k_rot.inputs[1:] or not _row_positions(q_rot.inputs[1]):
        return None
    parts = [_flat_view_source(q_rot.inputs[0]), _flat_view_source(k_rot.inputs[0]), _flat_view_source(node.inputs[2])]
    split = parts[0].producer() if parts[0] is not None else None
    if split is None or split.op_type != "Split" or list(split.outputs) != parts:
        return None
    p = split.inputs[0]
    product = p.producer()
    if product is None or product.domain != DOMAIN or product.op_type != SLIM_MATMUL:
        return None
    heads, kv_heads = node.attributes["num_heads"].as_int(), node.attributes["kv_num_heads"].as_int()
    d = node.inputs[3].shape[3] if node.inputs[3].shape is not None else None
    if not isinstance(d, int) or const_ints(split.inputs[1]) != [heads * d, kv_heads * d, kv_heads * d]:
        return None
    if any(len(list(v.uses())) != 1 or v.is_graph_output() for v in parts):
        return None
    return p, q_rot, list(node.inputs[:3])


def _shape_reads_to_product(fed: list[ir.Value], p: ir.Value) -> None:
    """Shape(v, start, end <= 2) of a value the attention read becomes Shape(P, ...): B and S are P's
    own first dims (the fusion reads the new-token count from the first layer's key)."""
    for value in fed:
        for use in list(value.uses()):
            reader = use.node
            end = reader.attributes.get_int("end", None)
            if reader.op_type == "Shape" and reader.domain == "" and end is not None and 0 < end <= 2:
                reader.replace_input_with(0, p)


class PackAttentionInputsPass(ir.passes.InPlacePass):
    """Feed each matching slim_onnx::GroupQueryAttention of the main graph its packed q/k/v product and
    rotary caches (see module doc), removing the nodes in between; `packed` counts them after a call.
    The new overloads need AddFallbackFunctionsPass afterwards."""

    def __init__(self):
        super().__init__()
        self.packed = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.packed = 0
        for node in [n for n in graph if n.domain == DOMAIN and n.op_type == GROUP_QUERY_ATTENTION]:
            variant = AttentionVariant.parse(node.overload)
            if variant.packed:
                continue
            found = _packed_source(node)
            if found is None:
                continue
            p, q_rot, fed = found
            bias = node.inputs[7] if len(node.inputs) > 7 else None
            inputs = [p, None, None, *node.inputs[3:7], bias, q_rot.inputs[2], q_rot.inputs[3]]
            packed = ir.node(GROUP_QUERY_ATTENTION, inputs, dict(node.attributes), domain=DOMAIN, num_outputs=3,
                             overload=AttentionVariant(packed=True, bias=variant.bias).overload, name=node.name)
            graph.insert_before(node, packed)
            take_over_values(graph, list(zip(node.outputs, packed.outputs)))
            _shape_reads_to_product(fed, p)
            remove_dead_producers(graph, list(node.outputs))
            self.packed += 1
        return ir.passes.PassResult(model, modified=bool(self.packed))


__all__ = ["PackAttentionInputsPass"]
