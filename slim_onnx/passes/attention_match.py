"""Matching the cached attention of a decoder export, layer by layer (the rewrite: attention.py).

Matched per layer, anchored on the cache (names as Optimum writes them):

  present.i.key   = Concat(past_key_values.i.key,   K, axis=2)      K: [B, Hkv, S, D], rotary applied
  present.i.value = Concat(past_key_values.i.value, V, axis=2)
  scores = MatMul(Q [* cq], Transpose(repeat_kv(present.i.key), 0,1,3,2) [* ck])   Q: [B, H, S, D]
  probs  = Softmax(scores [+ bias])  [NaN -> 0]                      bias: [B|1, 1, S, P+S]
  out    = Reshape(Transpose(MatMul(probs, repeat_kv(present.i.value)), 0,2,1,3))   -> [B, S, H*D]
  (repeat_kv = Unsqueeze(axis 2) -> Expand -> Reshape, absent when H == Hkv)

A matched layer (AttentionLayer) holds what GroupQueryAttention needs and the values it replaces;
`rotary_source` and `split_heads_source` read the rotary embedding and the head split the rewrite
folds into the fused op's inputs.
"""

from __future__ import annotations

import dataclasses
import re

import onnx_ir as ir

from slim_onnx.passes.graph import const_ints, const_scalar, constant_source, perm, producer, weight_source

PAST_KEY = re.compile(r"^past_key_values\.(\d+)\.key$")


def _scaled(value: ir.Value) -> tuple[ir.Value, float]:
    """(x, c) for value = x * c or x / (1/c) with a constant scalar c; (value, 1) otherwise."""
    for op in ("Mul", "Div"):
        node = producer(value, op)
        if node is None:
            continue
        for i in (1, 0) if op == "Mul" else (1,):
            c = const_scalar(node.inputs[i])
            if c is not None and c != 0:
                return node.inputs[1 - i], c if op == "Mul" else 1.0 / c
    return value, 1.0


def cache_copies(present: ir.Value) -> list[ir.Value]:
    """The values that hold `present` for the attention MatMuls: itself and its repeat_kv copies."""
    found = [present]
    for use in present.uses():
        unsqueeze = use.node
        if unsqueeze.op_type != "Unsqueeze" or const_ints(unsqueeze.inputs[1] if len(unsqueeze.inputs) > 1 else None) != [2]:
            continue
        for expand_use in unsqueeze.outputs[0].uses():
            if expand_use.node.op_type != "Expand":
                continue
            for reshape_use in expand_use.node.outputs[0].uses():
                if reshape_use.node.op_type == "Reshape" and reshape_use.idx == 0:
                    found.append(reshape_use.node.outputs[0])
    return found


def _consumers(values: list[ir.Value], op_type: str, index: int) -> list[ir.Node]:
    return [use.node for v in values for use in v.uses() if use.node.op_type == op_type and use.idx == index]


def _projection_width(value: ir.Value) -> int | None:
    """The last dimension of a projection's output [B, S, N]: from its static shape, or from the
    layer that made it (MatMul with a constant weight, SlimMatMul or MatMulNBits, under a bias Add)."""
    while True:
        if value.shape is not None and len(value.shape) and isinstance(value.shape[-1], int):
            return value.shape[-1]
        node = value.producer()
        if node is None:
            return None
        if node.op_type in ("SlimMatMul", "MatMulNBits"):
            n = node.attributes.get("N")
            return None if n is None else n.as_int()
        if node.op_type == "MatMul":
            weight = weight_source(node.inputs[1])
            if weight is None:
                return None
            source, transposed, _ = weight
            return source.const_value.shape[0 if transposed else 1]
        if node.op_type != "Add":
            return None
        value = node.inputs[1] if constant_source(node.inputs[0]) is not None else node.inputs[0]


def _query_heads(query: ir.Value, head_size: int) -> int | None:
    """H, from the Reshape [B, S, H, D] that made the query before its 0,2,1,3 Transpose (the rotary
    ops in between are walked through, a few nodes up): its constant H, else its input's width / D."""
    frontier, seen = [query], set()
    for _ in range(12):
        next_frontier = []
        for value in frontier:
            node = value.producer() if value is not None else None
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type == "Transpose" and perm(node) == [0, 2, 1, 3]:
                reshape = producer(node.inputs[0], "Reshape")
                if reshape is None:
                    continue
                shape = _reshape_target(reshape.inputs[1])
                if shape is not None and len(shape) == 4 and shape[2] > 0 and shape[3] in (head_size, -1):
                    return shape[2]
                width = _projection_width(reshape.inputs[0])
                return width // head_size if width is not None and width % head_size == 0 else None
            next_frontier.extend(node.inputs)
        frontier = next_frontier
    return None


def _reshape_target(shape: ir.Value) -> list[int] | None:
    """The constant entries of a Reshape target built by Concat (unknown entries as -1)."""
    direct = const_ints(shape)
    if direct is not None:
        return direct
    concat = producer(shape, "Concat")
    if concat is None:
        return None
    entries = []
    for part in concat.inputs:
        ints = const_ints(part)
        entries.extend(ints if ints is not None else [-1])
    return entries


def _linear_input(value: ir.Value) -> ir.Value | None:
    """The activation input of the linear layer (under an optional bias Add) that made `value`."""
    node = value.producer()
    if node is not None and node.op_type == "Add":
        constant = [constant_source(v) is not None for v in node.inputs]
        if constant.count(True) != 1:
            return None
        node = node.inputs[constant.index(False)].producer()
    if node is None:
        return None
    if node.op_type in ("SlimMatMul", "MatMulNBits") or (node.op_type == "MatMul" and weight_source(node.inputs[1])):
        return node.inputs[0]
    return None


def _is_dim(entry: ir.Value, index: int, sources: tuple) -> bool:
    """`entry` (a Reshape target's entry) is dimension `index` of one of `sources`, or 0 (copy)."""
    if const_ints(entry) == [0]:
        return True
    unsqueeze = producer(entry, "Unsqueeze")
    gather = producer(unsqueeze.inputs[0], "Gather") if unsqueeze is not None else None
    shape = producer(gather.inputs[0], "Shape") if gather is not None else None
    return (
        shape is not None and not shape.attributes and const_ints(gather.inputs[1]) == [index]
        and any(shape.inputs[0] is s for s in sources)
    )


def split_heads_source(x: ir.Value, head_size: int) -> ir.Value | None:
    """p, when x [B, heads, S, D] = Transpose(Reshape(p, [B, S, -1|heads, D]), 0,2,1,3) and B, S are
    p's own first dimensions (read from p or from its linear layer's input, or copied by a 0)."""
    transpose = producer(x, "Transpose")
    if transpose is None or perm(transpose) != [0, 2, 1, 3]:
        return None
    reshape = producer(transpose.inputs[0], "Reshape")
    if reshape is None or reshape.attributes.get_int("allowzero", 0):
        return None
    p, target = reshape.inputs[0], reshape.inputs[1]
    entries = producer(target, "Concat")
    entries = list(entries.inputs) if entries is not None else None
    constant = const_ints(target)
    if constant is not None:  # a fully constant target: only 0 (copy) can be a leading dimension
        if len(constant) != 4 or constant[:2] != [0, 0] or constant[3] != head_size:
            return None
        return p
    if entries is None or len(entries) != 4 or const_ints(entries[3]) != [head_size]:
        return None
    sources = (p, _linear_input(p))
    return p if all(_is_dim(entries[i], i, sources) for i in (0, 1)) else None


def _operands(value: ir.Value | None, op_type: str) -> tuple[ir.Value, ir.Value] | None:
    node = producer(value, op_type)
    return None if node is None or len(node.inputs) != 2 else (node.inputs[0], node.inputs[1])


def _last_axis_slice(value: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value] | None:
    """(input, start, end) of a Slice along the last axis with step 1."""
    node = producer(value, "Slice")
    if node is None or len(node.inputs) < 4 or const_ints(node.inputs[3]) not in ([-1], [3]):
        return None
    if len(node.inputs) > 4 and node.inputs[4] is not None and const_ints(node.inputs[4]) != [1]:
        return None
    return node.inputs[0], node.inputs[1], node.inputs[2]


def _is_half_head(value: ir.Value, x: ir.Value, head_size: int) -> bool:
    """value is [D/2] for x [B, H, S, D]: a constant, or Unsqueeze(Cast*(Div(Cast*(Gather(Shape(x), 3|-1)), 2)))."""
    if const_ints(value) == [head_size // 2]:
        return True
    node = producer(value, "Unsqueeze")
    value = node.inputs[0] if node is not None else None
    while producer(value, "Cast") is not None:
        value = value.producer().inputs[0]
    div = producer(value, "Div")
    if div is None or const_scalar(div.inputs[1]) != 2:
        return False
    value = div.inputs[0]
    while producer(value, "Cast") is not None:
        value = value.producer().inputs[0]
    gather = producer(value, "Gather")
    shape = producer(gather.inputs[0], "Shape") if gather is not None else None
    return shape is not None and shape.inputs[0] is x and not shape.attributes and const_ints(gather.inputs[1]) in ([3], [-1])


def _rotate_half_input(value: ir.Value, head_size: int) -> ir.Value | None:
    """x, when value = Concat(Neg(x[..., D/2:]), x[..., :D/2], axis=-1)."""
    concat = producer(value, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.attributes.get_int("axis", 0) not in (-1, 3):
        return None
    neg = producer(concat.inputs[0], "Neg")
    upper = _last_axis_slice(neg.inputs[0]) if neg is not None else None
    lower = _last_axis_slice(concat.inputs[1])
    if upper is None or lower is None or upper[0] is not lower[0]:
        return None
    x = lower[0]
    if const_ints(lower[1]) != [0] or not (_is_half_head(lower[2], x, head_size) and _is_half_head(upper[1], x, head_size)):
        return None
    end = const_ints(upper[2])
    return lower[0] if end is not None and len(end) == 1 and end[0] >= head_size else None


def _cos_sin_source(value: ir.Value, op_type: str) -> ir.Value | None:
    """t [B, S, D], when value = Unsqueeze(t, 1) and t = Cast*(Cos|Sin(Concat(f, f, axis=-1)) [* c])."""
    unsqueeze = producer(value, "Unsqueeze")
    if unsqueeze is None or len(unsqueeze.inputs) != 2 or const_ints(unsqueeze.inputs[1]) != [1]:
        return None
    table = walk = unsqueeze.inputs[0]
    while True:
        node = walk.producer() if walk is not None else None
        if node is None or node.domain != "":
            return None
        if node.op_type == "Cast":
            walk = node.inputs[0]
        elif node.op_type == "Mul" and const_scalar(node.inputs[1]) is not None:
            walk = node.inputs[0]
        elif node.op_type == op_type:
            concat = producer(node.inputs[0], "Concat")
            ok = concat is not None and len(concat.inputs) == 2 and concat.inputs[0] is concat.inputs[1]
            return table if ok and concat.attributes.get_int("axis", 0) in (-1, 2) else None
        else:
            return None


def rotary_source(x: ir.Value, head_size: int) -> tuple[ir.Value, ir.Value, ir.Value] | None:
    """(input, cos [B, S, D], sin [B, S, D]) when x is the export's rotate_half rotary embedding."""
    terms = _operands(x, "Add")
    for plain, rotated in (terms, terms[::-1]) if terms is not None else ():
        a, b = _operands(plain, "Mul") or (None, None), _operands(rotated, "Mul") or (None, None)
        for inner, cos in (a, a[::-1]):
            for half, sin in (b, b[::-1]):
                if inner is None or half is None or _rotate_half_input(half, head_size) is not inner:
                    continue
                cos_table, sin_table = _cos_sin_source(cos, "Cos"), _cos_sin_source(sin, "Sin")
                if cos_table is not None and sin_table is not None:
                    return inner, cos_table, sin_table
    return None


@dataclasses.dataclass
class AttentionLayer:
    """One matched layer: everything GroupQueryAttention needs, and the values it replaces."""

    past_key: ir.Value
    past_value: ir.Value
    present_key: ir.Value  # old Concat outputs (graph outputs)
    present_value: ir.Value
    key: ir.Value  # [B, Hkv, S, D], rotary applied
    value: ir.Value
    query: ir.Value  # [B, H, S, D], rotary applied, unscaled
    bias: ir.Value | None  # added to the scores: [B|1, 1, S, P+S]
    scale: float
    heads: int
    kv_heads: int
    output: ir.Value  # [B, S, H*D]


def _cache_concat(past: ir.Value) -> ir.Node | None:
    for use in past.uses():
        node = use.node
        axis = node.attributes.get("axis")
        if node.op_type == "Concat" and use.idx == 0 and len(node.inputs) == 2 and axis is not None and axis.as_int() in (2, -2):
            if node.outputs[0].is_graph_output():
                return node
    return None


def match_attention(graph: ir.Graph, past_key: ir.Value, past_value: ir.Value) -> AttentionLayer | None:
    key_concat, value_concat = _cache_concat(past_key), _cache_concat(past_value)
    if key_concat is None or value_concat is None or past_key.shape is None or len(past_key.shape) != 4:
        return None
    kv_heads, head_size = past_key.shape[1], past_key.shape[3]
    if not isinstance(kv_heads, int) or not isinstance(head_size, int) or head_size % 8:
        return None  # onnxruntime's GroupQueryAttention (the fallback) needs D % 8 == 0
    present_key, present_value = key_concat.outputs[0], value_concat.outputs[0]

    pv = _consumers(cache_copies(present_value), "MatMul", 1)
    if len(pv) != 1:
        return None
    pv = pv[0]
    probs = pv.inputs[0]
    where = producer(probs, "Where")
    if where is not None:  # Where(IsNaN(p), 0, p): a fully masked row gives 0, not NaN
        is_nan = producer(where.inputs[0], "IsNaN")
        if is_nan is None or is_nan.inputs[0] is not where.inputs[2] or const_scalar(where.inputs[1]) != 0:
            return None
        probs = where.inputs[2]
    softmax = producer(probs, "Softmax")
    if softmax is None or softmax.attributes.get_int("axis", -1) not in (-1, 3):
        return None
    scores, bias = softmax.inputs[0], None
    add = producer(scores, "Add")
    if add is not None:
        scores, bias = add.inputs[0], add.inputs[1]
    scores, post_scale = _scaled(scores)
    qk = producer(scores, "MatMul")
    if qk is None:
        return None
    query, q_scale = _scaled(qk.inputs[0])
    key_t, k_scale = _scaled(qk.inputs[1])
    transpose = producer(key_t, "Transpose")
    if transpose is None or perm(transpose) != [0, 1, 3, 2] or transpose.inputs[0] not in cache_copies(present_key):
        return None

    out_transpose = [u.node for u in pv.outputs[0].uses()]
    if len(out_transpose) != 1 or out_transpose[0].op_type != "Transpose" or perm(out_transpose[0]) != [0, 2, 1, 3]:
        return None
    out_reshape = [u.node for u in out_transpose[0].outputs[0].uses()]
    if len(out_reshape) != 1 or out_reshape[0].op_type != "Reshape":
        return None
    heads = _query_heads(query, head_size)
    if heads is None or heads % kv_heads:
        return None
    return AttentionLayer(
        past_key, past_value, present_key, present_value, key_concat.inputs[1], value_concat.inputs[1], query, bias,
        q_scale * k_scale * post_scale, heads, kv_heads, out_reshape[0].outputs[0],
    )


__all__ = ["PAST_KEY", "AttentionLayer", "cache_copies", "match_attention", "rotary_source", "split_heads_source"]
