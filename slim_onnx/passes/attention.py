"""Fusing the attention of a decoder export with a KV cache into one GroupQueryAttention node.

Why: once the linear layers are SlimMatMul, a decode step of an Optimum export with a long cache
spends most of its time in the attention's plain ONNX ops (per layer: repeat_kv copies of the whole
cache to every query head, transposes, mask slicing, dozens of shape nodes).
The fused node is slim_onnx::GroupQueryAttention: our CPU kernel (csrc/attention_op.cc, which copies
the cache once per key/value head), with a model-local fallback function that is onnxruntime's own
com.microsoft::GroupQueryAttention (same contract, docs/op-spec.md), so the fused model still runs on
stock onnxruntime.

Matched per layer, anchored on the cache (names as Optimum writes them):

  present.i.key   = Concat(past_key_values.i.key,   K, axis=2)      K: [B, Hkv, S, D], rotary applied
  present.i.value = Concat(past_key_values.i.value, V, axis=2)
  scores = MatMul(Q [* cq], Transpose(repeat_kv(present.i.key), 0,1,3,2) [* ck])   Q: [B, H, S, D]
  probs  = Softmax(scores [+ bias])  [NaN -> 0]                      bias: [B|1, 1, S, P+S]
  out    = Reshape(Transpose(MatMul(probs, repeat_kv(present.i.value)), 0,2,1,3))   -> [B, S, H*D]
  (repeat_kv = Unsqueeze(axis 2) -> Expand -> Reshape, absent when H == Hkv)

becomes GroupQueryAttention(Q, K, V as [B, S, heads*D], the caches, seqlens_k, total_sequence_length,
attention_bias=bias) with scale cq*ck and causal masking; its present outputs take the names of the
old ones. seqlens_k is P+S-1 for every row (the cache holds P entries per row, padded or not), so
padding is masked by the model's own bias exactly as before.
A layer whose attention does not read as above is left as it is: e.g. a float16 export, whose
attention runs in float32 between Casts.

GroupQueryAttention reads Q, K, V as [B, S, heads*D], which is what the projections produce before
the export splits them into heads (Reshape [B, S, -1, D] -> Transpose 0,2,1,3). So Q, K, V are taken
from the projection p itself (Reshape(p, [0, 0, -1]): a view, checked to have the Reshape's leading
dimensions) instead of transposing the heads back. Where Q or K is the export's rotary embedding of
the split heads (rotate_half: x*cos + Concat(-x[..., D/2:], x[..., :D/2])*sin with cos, sin of shape
[B, S, D] unsqueezed at axis 1 and built as Cos/Sin of Concat(f, f), so both halves agree), it becomes
com.microsoft::RotaryEmbedding on [B, S, heads*D], reading the model's own cos/sin: the first halves,
flattened to a [B*S, D/2] cache, indexed by position b*S + s. Positions stay exactly the model's
(left padding included), and any rope scaling the export computes carries over. Per layer this
removes about 30 nodes (head splits, slices, concats, shape arithmetic). Once q/k/v are one merged
SlimMatMul, passes/packed_attention.py moves the views, the split and the rotary into the op.

Limits of the fallback (onnxruntime's CPU kernel; our kernel has neither): a batch of more than one
row cannot feed several new tokens onto a non-empty cache in one call (batched prompts with an empty
cache and batched one-token decode steps are fine), onnxruntime says so with an error; and the head
size must be a multiple of 8, so other layers are not fused. `slim-onnx compress --no-fuse-attention`
keeps the export's attention.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from slim_onnx.fallback import ATTENTION_OP_TYPE, DOMAIN
from slim_onnx.passes.linear import _constant_source, _weight_source
from slim_onnx.passes.rewrite import AddFallbackFunctionsPass, register_constant

_PAST = re.compile(r"^past_key_values\.(\d+)\.key$")


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _scalar(value: ir.Value | None) -> float | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().reshape(()))


def _ints(value: ir.Value | None) -> list[int] | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else [int(x) for x in tensor.numpy().reshape(-1)]


def _perm(node: ir.Node | None) -> list[int] | None:
    attr = node.attributes.get("perm") if node is not None else None
    return None if attr is None else list(attr.as_ints())


def _scaled(value: ir.Value) -> tuple[ir.Value, float]:
    """(x, c) for value = x * c or x / (1/c) with a constant scalar c; (value, 1) otherwise."""
    for op in ("Mul", "Div"):
        node = _producer(value, op)
        if node is None:
            continue
        for i in (1, 0) if op == "Mul" else (1,):
            c = _scalar(node.inputs[i])
            if c is not None and c != 0:
                return node.inputs[1 - i], c if op == "Mul" else 1.0 / c
    return value, 1.0


def _through_repeat_kv(present: ir.Value) -> list[ir.Value]:
    """The values that hold `present` for the attention MatMuls: itself and its repeat_kv copies."""
    found = [present]
    for use in present.uses():
        unsqueeze = use.node
        if unsqueeze.op_type != "Unsqueeze" or _ints(unsqueeze.inputs[1] if len(unsqueeze.inputs) > 1 else None) != [2]:
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
            weight = _weight_source(node.inputs[1])
            if weight is None:
                return None
            source, transposed, _ = weight
            return source.const_value.shape[0 if transposed else 1]
        if node.op_type != "Add":
            return None
        value = node.inputs[1] if _constant_source(node.inputs[0]) is not None else node.inputs[0]


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
            if node.op_type == "Transpose" and _perm(node) == [0, 2, 1, 3]:
                reshape = _producer(node.inputs[0], "Reshape")
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
    direct = _ints(shape)
    if direct is not None:
        return direct
    concat = _producer(shape, "Concat")
    if concat is None:
        return None
    entries = []
    for part in concat.inputs:
        ints = _ints(part)
        entries.extend(ints if ints is not None else [-1])
    return entries


def _linear_input(value: ir.Value) -> ir.Value | None:
    """The activation input of the linear layer (under an optional bias Add) that made `value`."""
    node = value.producer()
    if node is not None and node.op_type == "Add":
        constant = [_constant_source(v) is not None for v in node.inputs]
        if constant.count(True) != 1:
            return None
        node = node.inputs[constant.index(False)].producer()
    if node is None:
        return None
    if node.op_type in ("SlimMatMul", "MatMulNBits") or (node.op_type == "MatMul" and _weight_source(node.inputs[1])):
        return node.inputs[0]
    return None


def _is_dim(entry: ir.Value, index: int, sources: tuple) -> bool:
    """`entry` (a Reshape target's entry) is dimension `index` of one of `sources`, or 0 (copy)."""
    if _ints(entry) == [0]:
        return True
    unsqueeze = _producer(entry, "Unsqueeze")
    gather = _producer(unsqueeze.inputs[0], "Gather") if unsqueeze is not None else None
    shape = _producer(gather.inputs[0], "Shape") if gather is not None else None
    return (
        shape is not None and not shape.attributes and _ints(gather.inputs[1]) == [index]
        and any(shape.inputs[0] is s for s in sources)
    )


def _split_heads_source(x: ir.Value, head_size: int) -> ir.Value | None:
    """p, when x [B, heads, S, D] = Transpose(Reshape(p, [B, S, -1|heads, D]), 0,2,1,3) and B, S are
    p's own first dimensions (read from p or from its linear layer's input, or copied by a 0)."""
    transpose = _producer(x, "Transpose")
    if transpose is None or _perm(transpose) != [0, 2, 1, 3]:
        return None
    reshape = _producer(transpose.inputs[0], "Reshape")
    if reshape is None or reshape.attributes.get_int("allowzero", 0):
        return None
    p, target = reshape.inputs[0], reshape.inputs[1]
    entries = _producer(target, "Concat")
    entries = list(entries.inputs) if entries is not None else None
    constant = _ints(target)
    if constant is not None:  # a fully constant target: only 0 (copy) can be a leading dimension
        if len(constant) != 4 or constant[:2] != [0, 0] or constant[3] != head_size:
            return None
        return p
    if entries is None or len(entries) != 4 or _ints(entries[3]) != [head_size]:
        return None
    sources = (p, _linear_input(p))
    return p if all(_is_dim(entries[i], i, sources) for i in (0, 1)) else None


def _operands(value: ir.Value | None, op_type: str) -> tuple[ir.Value, ir.Value] | None:
    node = _producer(value, op_type)
    return None if node is None or len(node.inputs) != 2 else (node.inputs[0], node.inputs[1])


def _last_axis_slice(value: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value] | None:
    """(input, start, end) of a Slice along the last axis with step 1."""
    node = _producer(value, "Slice")
    if node is None or len(node.inputs) < 4 or _ints(node.inputs[3]) not in ([-1], [3]):
        return None
    if len(node.inputs) > 4 and node.inputs[4] is not None and _ints(node.inputs[4]) != [1]:
        return None
    return node.inputs[0], node.inputs[1], node.inputs[2]


def _is_half_head(value: ir.Value, x: ir.Value, head_size: int) -> bool:
    """value is [D/2] for x [B, H, S, D]: a constant, or Unsqueeze(Cast*(Div(Cast*(Gather(Shape(x), 3|-1)), 2)))."""
    if _ints(value) == [head_size // 2]:
        return True
    node = _producer(value, "Unsqueeze")
    value = node.inputs[0] if node is not None else None
    while _producer(value, "Cast") is not None:
        value = value.producer().inputs[0]
    div = _producer(value, "Div")
    if div is None or _scalar(div.inputs[1]) != 2:
        return False
    value = div.inputs[0]
    while _producer(value, "Cast") is not None:
        value = value.producer().inputs[0]
    gather = _producer(value, "Gather")
    shape = _producer(gather.inputs[0], "Shape") if gather is not None else None
    return shape is not None and shape.inputs[0] is x and not shape.attributes and _ints(gather.inputs[1]) in ([3], [-1])


def _rotate_half_input(value: ir.Value, head_size: int) -> ir.Value | None:
    """x, when value = Concat(Neg(x[..., D/2:]), x[..., :D/2], axis=-1)."""
    concat = _producer(value, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.attributes.get_int("axis", 0) not in (-1, 3):
        return None
    neg = _producer(concat.inputs[0], "Neg")
    upper = _last_axis_slice(neg.inputs[0]) if neg is not None else None
    lower = _last_axis_slice(concat.inputs[1])
    if upper is None or lower is None or upper[0] is not lower[0]:
        return None
    x = lower[0]
    if _ints(lower[1]) != [0] or not (_is_half_head(lower[2], x, head_size) and _is_half_head(upper[1], x, head_size)):
        return None
    end = _ints(upper[2])
    return lower[0] if end is not None and len(end) == 1 and end[0] >= head_size else None


def _cos_sin_source(value: ir.Value, op_type: str) -> ir.Value | None:
    """t [B, S, D], when value = Unsqueeze(t, 1) and t = Cast*(Cos|Sin(Concat(f, f, axis=-1)) [* c])."""
    unsqueeze = _producer(value, "Unsqueeze")
    if unsqueeze is None or len(unsqueeze.inputs) != 2 or _ints(unsqueeze.inputs[1]) != [1]:
        return None
    table = walk = unsqueeze.inputs[0]
    while True:
        node = walk.producer() if walk is not None else None
        if node is None or node.domain != "":
            return None
        if node.op_type == "Cast":
            walk = node.inputs[0]
        elif node.op_type == "Mul" and _scalar(node.inputs[1]) is not None:
            walk = node.inputs[0]
        elif node.op_type == op_type:
            concat = _producer(node.inputs[0], "Concat")
            ok = concat is not None and len(concat.inputs) == 2 and concat.inputs[0] is concat.inputs[1]
            return table if ok and concat.attributes.get_int("axis", 0) in (-1, 2) else None
        else:
            return None


def _rotary(x: ir.Value, head_size: int) -> tuple[ir.Value, ir.Value, ir.Value] | None:
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
class _Attention:
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


def match_attention(graph: ir.Graph, past_key: ir.Value, past_value: ir.Value) -> _Attention | None:
    key_concat, value_concat = _cache_concat(past_key), _cache_concat(past_value)
    if key_concat is None or value_concat is None or past_key.shape is None or len(past_key.shape) != 4:
        return None
    kv_heads, head_size = past_key.shape[1], past_key.shape[3]
    if not isinstance(kv_heads, int) or not isinstance(head_size, int) or head_size % 8:
        return None  # onnxruntime's GroupQueryAttention (the fallback) needs D % 8 == 0
    present_key, present_value = key_concat.outputs[0], value_concat.outputs[0]

    pv = _consumers(_through_repeat_kv(present_value), "MatMul", 1)
    if len(pv) != 1:
        return None
    pv = pv[0]
    probs = pv.inputs[0]
    where = _producer(probs, "Where")
    if where is not None:  # Where(IsNaN(p), 0, p): a fully masked row gives 0, not NaN
        is_nan = _producer(where.inputs[0], "IsNaN")
        if is_nan is None or is_nan.inputs[0] is not where.inputs[2] or _scalar(where.inputs[1]) != 0:
            return None
        probs = where.inputs[2]
    softmax = _producer(probs, "Softmax")
    if softmax is None or softmax.attributes.get_int("axis", -1) not in (-1, 3):
        return None
    scores, bias = softmax.inputs[0], None
    add = _producer(scores, "Add")
    if add is not None:
        scores, bias = add.inputs[0], add.inputs[1]
    scores, post_scale = _scaled(scores)
    qk = _producer(scores, "MatMul")
    if qk is None:
        return None
    query, q_scale = _scaled(qk.inputs[0])
    key_t, k_scale = _scaled(qk.inputs[1])
    transpose = _producer(key_t, "Transpose")
    if transpose is None or _perm(transpose) != [0, 1, 3, 2] or transpose.inputs[0] not in _through_repeat_kv(present_key):
        return None

    out_transpose = [u.node for u in pv.outputs[0].uses()]
    if len(out_transpose) != 1 or out_transpose[0].op_type != "Transpose" or _perm(out_transpose[0]) != [0, 2, 1, 3]:
        return None
    out_reshape = [u.node for u in out_transpose[0].outputs[0].uses()]
    if len(out_reshape) != 1 or out_reshape[0].op_type != "Reshape":
        return None
    heads = _query_heads(query, head_size)
    if heads is None or heads % kv_heads:
        return None
    return _Attention(
        past_key, past_value, present_key, present_value, key_concat.inputs[1], value_concat.inputs[1], query, bias,
        q_scale * k_scale * post_scale, heads, kv_heads, out_reshape[0].outputs[0],
    )


class _InputBuilder:
    """Builds GroupQueryAttention's [B, S, heads*D] inputs from the export's [B, heads, S, D] ones,
    sharing one flat shape, and one rotary cache per cos/sin pair, across all layers."""

    def __init__(self, graph: ir.Graph, head_size: int):
        self.graph, self.head_size = graph, head_size
        self.flat = _const(graph, [0, 0, -1])
        self.caches: dict[tuple[int, int], tuple[ir.Value, ir.Value, ir.Value]] = {}
        self.rotaries = 0

    def __call__(self, before: ir.Node, x: ir.Value, heads: int) -> ir.Value:
        rotary = _rotary(x, self.head_size)
        source = _split_heads_source(rotary[0] if rotary else x, self.head_size)
        if source is None:  # transpose the heads back
            t = ir.node("Transpose", [x], {"perm": [0, 2, 1, 3]})
            nodes = [t, ir.node("Reshape", [t.outputs[0], self.flat])]
        else:
            nodes = [ir.node("Reshape", [source, self.flat])]
            if rotary is not None:
                positions, cos, sin = self._cache(before, rotary[1], rotary[2])
                nodes.append(ir.node(
                    "RotaryEmbedding", [nodes[0].outputs[0], positions, cos, sin],
                    {"interleaved": 0, "num_heads": heads}, domain="com.microsoft",
                ))
                self.rotaries += 1
        self.graph.insert_before(before, nodes)
        return nodes[-1].outputs[0]

    def _cache(self, before: ir.Node, cos: ir.Value, sin: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
        """(positions [B, S] = b*S + s, cos and sin caches [B*S, D/2]) from the model's cos/sin tables."""
        key = (id(cos), id(sin))
        if key not in self.caches:
            half = self.head_size // 2
            graph, zero = self.graph, _const(self.graph, [0])
            rows = _const(graph, [-1, half])
            nodes, tables = [], []
            for table in (cos, sin):
                first_half = ir.node("Slice", [table, zero, _const(graph, [half]), _const(graph, [-1])])
                tables.append(ir.node("Reshape", [first_half.outputs[0], rows]))
                nodes += [first_half, tables[-1]]
            batch_seq = ir.node("Shape", [cos], {"start": 0, "end": 2})
            count = ir.node("ReduceProd", [batch_seq.outputs[0]], {"keepdims": 0})
            flat = ir.node("Range", [_const(graph, 0), count.outputs[0], _const(graph, 1)])
            positions = ir.node("Reshape", [flat.outputs[0], batch_seq.outputs[0]])
            nodes += [batch_seq, count, flat, positions]
            graph.insert_before(before, nodes)
            self.caches[key] = (positions.outputs[0], tables[0].outputs[0], tables[1].outputs[0])
        return self.caches[key]


@dataclasses.dataclass
class _Lengths:
    seqlens_k: ir.Value  # int32 [B] = P+S-1
    total_sequence_length: ir.Value  # int32 scalar-like [1] = P+S
    total: ir.Value  # int64 [1] = P+S


def _lengths(graph: ir.Graph, before: ir.Node, past_key: ir.Value, key: ir.Value) -> _Lengths:
    """The lengths GroupQueryAttention takes, from the first layer's past [B, Hkv, P, D] and its new
    key as fed to the fused op ([B, S, Hkv*D]: reading the export's key would keep its ops alive)."""
    one = _const(graph, [1])
    nodes = [
        ir.node("Shape", [past_key], {"start": 2, "end": 3}),
        ir.node("Shape", [key], {"start": 1, "end": 2}),
        ir.node("Shape", [past_key], {"start": 0, "end": 1}),
    ]
    past_len, new_len, batch = (n.outputs[0] for n in nodes)
    total = ir.node("Add", [past_len, new_len])
    last = ir.node("Sub", [total.outputs[0], one])
    seqlens = ir.node("Expand", [last.outputs[0], batch])
    seqlens32 = ir.node("Cast", [seqlens.outputs[0]], {"to": ir.DataType.INT32})
    total32 = ir.node("Cast", [total.outputs[0]], {"to": ir.DataType.INT32})
    nodes += [total, last, seqlens, seqlens32, total32]
    graph.insert_before(before, nodes)
    seqlens32.outputs[0].name, total32.outputs[0].name = "gqa/seqlens_k", "gqa/total_sequence_length"
    return _Lengths(seqlens32.outputs[0], total32.outputs[0], total.outputs[0])


def _cache_shape(graph: ir.Graph, before: ir.Node, past: ir.Value, total: ir.Value, heads: int) -> ir.Value:
    """[B, heads, P+S, D]: the shape of the old present (heads = Hkv) or of its repeat_kv copy (H),
    computed from the inputs' shapes. The shape arithmetic of the mask slice read those tensors;
    reading the fused op's present instead would make a cycle through attention_bias, and keeping
    them would keep the cache copies alive."""
    batch = ir.node("Shape", [past], {"start": 0, "end": 1})
    tail = ir.node("Shape", [past], {"start": 3})
    shape = ir.node("Concat", [batch.outputs[0], _const(graph, [heads]), total, tail.outputs[0]], {"axis": 0})
    graph.insert_before(before, [batch, tail, shape])
    return shape.outputs[0]


def _retarget_shape_reads(graph: ir.Graph, before: ir.Node, a: _Attention, total: ir.Value, shapes: dict) -> None:
    """Point every Shape node that reads a cache tensor (old present or its repeat_kv copy) at an
    equivalent shape computed from the inputs; the cache tensors themselves then die. `shapes` keeps
    one value per (heads, head size) for all layers (their caches share batch and length), so the
    layers' identical mask slices can be merged by onnxruntime's common-subexpression elimination."""
    for present, past in ((a.present_key, a.past_key), (a.present_value, a.past_value)):
        for value in _through_repeat_kv(present):
            readers = [use.node for use in value.uses() if use.node.op_type == "Shape"]
            if not readers:
                continue
            heads = a.kv_heads if value is present else a.heads
            key = (heads, past.shape[3])
            if key not in shapes:
                shapes[key] = _cache_shape(graph, before, past, total, heads)
            for node in readers:
                start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", None)
                if start == 0 and end is None:
                    node.outputs[0].replace_all_uses_with(shapes[key])
                    continue
                sliced = ir.node("Slice", [shapes[key], _const(graph, [start]), _const(graph, [4 if end is None else end])])
                graph.insert_before(before, sliced)
                node.outputs[0].replace_all_uses_with(sliced.outputs[0])


def _const(graph: ir.Graph, ints: list[int] | int) -> ir.Value:
    """An int64 initializer: 1-D from a list, a scalar from an int."""
    return register_constant(graph, f"gqa/const_{len(graph.initializers)}", np.array(ints, dtype=np.int64))


def _fuse(graph: ir.Graph, a: _Attention, qkv: list[ir.Value], lengths: _Lengths, shapes: dict, index: int) -> None:
    """Replace layer `a` by GroupQueryAttention over qkv ([B, S, heads*D] each)."""
    anchor = a.output.producer()
    inputs = [*qkv, a.past_key, a.past_value, lengths.seqlens_k, lengths.total_sequence_length]
    if a.bias is not None:
        inputs.append(a.bias)
    gqa = ir.node(
        ATTENTION_OP_TYPE, inputs,
        {"num_heads": a.heads, "kv_num_heads": a.kv_heads, "scale": float(a.scale)},
        domain=DOMAIN, overload="bias" if a.bias is not None else "nobias", num_outputs=3,
        name=f"GroupQueryAttention_{index}",
    )
    graph.insert_before(anchor, gqa)
    _retarget_shape_reads(graph, anchor, a, lengths.total, shapes)
    for old, new in zip((a.output, a.present_key, a.present_value), gqa.outputs):
        new.type, new.shape = old.type, old.shape
        name = old.name
        if old.is_graph_output():  # the caches: the graph output changes producer, the rest dies
            graph.outputs[graph.outputs.index(old)] = new
        else:
            old.replace_all_uses_with(new)
        old.name = None
        new.name = name


class FuseGroupQueryAttentionPass(ir.passes.InPlacePass):
    """Fuse each layer's cached attention into slim_onnx::GroupQueryAttention (see module doc).

    `fused` holds the count of layers after a call, `rotaries` that of rotary embeddings folded into
    RotaryEmbedding; dead nodes are left for RemoveUnusedNodesPass."""

    def __init__(self):
        super().__init__()
        self.fused = self.rotaries = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        matched = []
        for name, past_key in inputs.items():
            found = _PAST.match(name)
            past_value = inputs.get(f"past_key_values.{found.group(1)}.value") if found else None
            if past_value is not None:
                attention = match_attention(graph, past_key, past_value)
                if attention is not None:
                    matched.append(attention)
        self.rotaries = 0
        if matched:
            lengths, shapes = None, {}
            to_bsd = _InputBuilder(graph, matched[0].past_key.shape[3])
            for index, a in enumerate(matched):
                anchor = a.output.producer()
                qkv = [to_bsd(anchor, a.query, a.heads), to_bsd(anchor, a.key, a.kv_heads), to_bsd(anchor, a.value, a.kv_heads)]
                lengths = lengths or _lengths(graph, anchor, a.past_key, qkv[1])
                _fuse(graph, a, qkv, lengths, shapes, index)
            self.rotaries = to_bsd.rotaries
            model.opset_imports.setdefault("com.microsoft", 1)
        self.fused = len(matched)
        return ir.passes.PassResult(model, modified=bool(matched))


def fuse_attention(model: ir.Model) -> int:
    """Fuse every matching attention layer of `model` in place, drop the dead nodes, keep the graph
    sorted; returns the number of layers fused."""
    fuse = FuseGroupQueryAttentionPass()
    # Sorted before the clean-up: the new shape nodes sit after some of their (soon dead) readers,
    # and the removal sweeps the graph once in reverse order.
    ir.passes.Sequential(
        fuse, AddFallbackFunctionsPass(), common_passes.TopologicalSortPass(), common_passes.RemoveUnusedNodesPass()
    )(model)
    return fuse.fused


__all__ = ["FuseGroupQueryAttentionPass", "fuse_attention", "match_attention"]
