"""Fusing the attention of a decoder export with a KV cache into one GroupQueryAttention node.

Why: once the linear layers are SlimMatMul, a decode step of an Optimum export with a long cache
spends most of its time in the attention's plain ONNX ops (per layer: repeat_kv copies of the whole
cache to every query head, transposes, mask slicing, dozens of shape nodes).
The fused node is slim_onnx::GroupQueryAttention: our CPU kernel (csrc/attention_op.cc, which copies
the cache once per key/value head), with a model-local fallback function that is onnxruntime's own
com.microsoft::GroupQueryAttention (same contract, docs/op-spec.md), so the fused model still runs on
stock onnxruntime.

The pattern is passes/attention_match.py's (per layer: the cache Concats, Q.K^T with its scales,
Softmax over the scores plus an optional bias, probs.V and the head merge); the layer becomes
GroupQueryAttention(Q, K, V as [B, S, heads*D], the caches, seqlens_k, total_sequence_length,
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

import numpy as np
import onnx_ir as ir

from slim_onnx.passes.attention_match import (
    PAST_KEY,
    AttentionLayer,
    cache_copies,
    match_attention,
    rotary_source,
    split_heads_source,
)
from slim_onnx.passes.graph import register_constant, remove_dead_producers, take_over_values
from slim_onnx.schema import DOMAIN, GROUP_QUERY_ATTENTION, AttentionVariant


class _InputBuilder:
    """Builds GroupQueryAttention's [B, S, heads*D] inputs from the export's [B, heads, S, D] ones,
    sharing one flat shape, and one rotary cache per cos/sin pair, across all layers."""

    def __init__(self, graph: ir.Graph, head_size: int):
        self.graph, self.head_size = graph, head_size
        self.flat = _const(graph, [0, 0, -1])
        self.caches: dict[tuple[int, int], tuple[ir.Value, ir.Value, ir.Value]] = {}
        self.rotaries = 0

    def __call__(self, before: ir.Node, x: ir.Value, heads: int) -> ir.Value:
        rotary = rotary_source(x, self.head_size)
        source = split_heads_source(rotary[0] if rotary else x, self.head_size)
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


def _retarget_shape_reads(graph: ir.Graph, before: ir.Node, a: AttentionLayer, total: ir.Value, shapes: dict) -> None:
    """Point every Shape node that reads a cache tensor (old present or its repeat_kv copy) at an
    equivalent shape computed from the inputs; the cache tensors themselves then die. `shapes` keeps
    one value per (heads, head size) for all layers (their caches share batch and length), so the
    layers' identical mask slices can be merged by onnxruntime's common-subexpression elimination."""
    for present, past in ((a.present_key, a.past_key), (a.present_value, a.past_value)):
        for value in cache_copies(present):
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
                else:
                    sliced = ir.node("Slice", [shapes[key], _const(graph, [start]), _const(graph, [4 if end is None else end])])
                    graph.insert_before(before, sliced)
                    node.outputs[0].replace_all_uses_with(sliced.outputs[0])
                graph.remove(node, safe=True)  # so that the cache tensor it read can die with the layer


def _const(graph: ir.Graph, ints: list[int] | int) -> ir.Value:
    """An int64 initializer: 1-D from a list, a scalar from an int."""
    return register_constant(graph, f"gqa/const_{len(graph.initializers)}", np.array(ints, dtype=np.int64))


def _fuse(graph: ir.Graph, a: AttentionLayer, qkv: list[ir.Value], lengths: _Lengths, shapes: dict, index: int) -> None:
    """Replace layer `a` by GroupQueryAttention over qkv ([B, S, heads*D] each)."""
    anchor = a.output.producer()
    inputs = [*qkv, a.past_key, a.past_value, lengths.seqlens_k, lengths.total_sequence_length]
    if a.bias is not None:
        inputs.append(a.bias)
    gqa = ir.node(
        GROUP_QUERY_ATTENTION, inputs,
        {"num_heads": a.heads, "kv_num_heads": a.kv_heads, "scale": float(a.scale)},
        domain=DOMAIN, overload=AttentionVariant(packed=False, bias=a.bias is not None).overload, num_outputs=3,
        name=f"GroupQueryAttention_{index}",
    )
    graph.insert_before(anchor, gqa)
    _retarget_shape_reads(graph, anchor, a, lengths.total, shapes)
    # The old layer's nodes, now read by nothing, go once every layer is fused. Of the caches only the
    # graph outputs move: a node that still reads an old cache may feed this op's mask (the export can
    # slice the mask to the scores' width), so it keeps reading the old one.
    take_over_values(graph, [(a.output, gqa.outputs[0])])
    take_over_values(graph, [(a.present_key, gqa.outputs[1]), (a.present_value, gqa.outputs[2])],
                     graph_outputs_only=True)


class FuseGroupQueryAttentionPass(ir.passes.InPlacePass):
    """Fuse each layer's cached attention into slim_onnx::GroupQueryAttention (see module doc).

    `fused` holds the count of layers after a call, `rotaries` that of rotary embeddings folded into
    RotaryEmbedding. The layers' old nodes are removed; the new ones are inserted before each layer's
    output, some after nodes that read them, so a TopologicalSortPass must follow, and the new
    overloads need AddFallbackFunctionsPass (rewrite.run_passes does both).
    """

    def __init__(self):
        super().__init__()
        self.fused = self.rotaries = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        matched = []
        for name, past_key in inputs.items():
            found = PAST_KEY.match(name)
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
            # after every layer is fused: the layers share nodes (rotary tables, shape arithmetic)
            remove_dead_producers(graph, [v for a in matched for v in (a.output, a.present_key, a.present_value)])
            self.rotaries = to_bsd.rotaries
            model.opset_imports.setdefault("com.microsoft", 1)
        self.fused = len(matched)
        return ir.passes.PassResult(model, modified=bool(matched))


__all__ = ["FuseGroupQueryAttentionPass"]
