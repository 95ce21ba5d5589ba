"""Merging SlimMatMul nodes that read the same activation (q/k/v, gate/up) into one node and a Split.

Why: at one token per step, a SlimMatMul on a small layer costs about as much in per-call work
(activation quantization, thread dispatch, the adapter product's own pass) as in weights; SmolLM2's
k and v projections (576 x 192) take as long as its q projection (576 x 576). One node per group of
siblings does that work once. The merged weights are `layout.concatenate_columns` of the parts
(W and biases side by side, adapters [L_1 | L_2 | ...] with a block-diagonal R), so the merged
node computes exactly the parts' outputs at accuracy_level 0; at 4 the adapter input is quantized
once over the joint rank. Groups whose formats differ, or whose int4 adapters would not keep their
own scale groups in the joint rank (concatenate_columns), are left as they are.

  y_i = SlimMatMul_i(x)  for i = 1..n   ->   y_1, ..., y_n = Split(SlimMatMul(x), [N_1, ..., N_n], axis=-1)
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slim_onnx.layout import SlimWeights, concatenate_columns
from slim_onnx.passes.graph import register_constant, remove_dead_producers, take_over_values
from slim_onnx.passes.rewrite import slim_matmul_node
from slim_onnx.schema import DOMAIN, SLIM_MATMUL

# SlimWeights fields in the order of the op's inputs 1..7 (SlimWeights.input_tensors)
_FIELDS = ("w", "w_scales", "bias", "adapter_l", "adapter_l_scales", "adapter_r", "adapter_r_scales")


def node_weights(node: ir.Node) -> SlimWeights | None:
    """The SlimWeights a SlimMatMul node holds, or None when a weight input is not a constant."""
    arrays = {}
    for field, value in zip(_FIELDS, node.inputs[1:]):
        if value is None:
            continue
        if value.const_value is None:
            return None
        arrays[field] = value.const_value.numpy()
    a = node.attributes
    return SlimWeights(
        a["K"].as_int(), a["N"].as_int(), group_size=a["group_size"].as_int(), sparse=bool(a.get_int("sparse", 1)),
        adapter_format=a.get_string("adapter_format", "none"), rank=a.get_int("rank", 0),
        adapter_group_size=a.get_int("adapter_group_size", 128), **arrays,
    )


def _siblings(graph: ir.Graph) -> list[list[ir.Node]]:
    by_input: dict[int, list[ir.Node]] = {}
    for node in graph:
        if node.domain == DOMAIN and node.op_type == SLIM_MATMUL:
            by_input.setdefault(id(node.inputs[0]), []).append(node)
    return [group for group in by_input.values() if len(group) > 1]


def _merge(graph: ir.Graph, group: list[ir.Node], weights: SlimWeights) -> None:
    name = group[0].name + "/siblings"
    merged = slim_matmul_node(graph, group[0].inputs[0], weights, group[0].attributes.get_int("accuracy_level", 0), name)
    sizes = register_constant(graph, f"{name}/split", np.array([n.attributes["N"].as_int() for n in group], np.int64))
    split = ir.node("Split", [merged.outputs[0], sizes], {"axis": -1}, num_outputs=len(group), name=f"{name}/Split")
    graph.insert_before(group[0], [merged, split])
    olds = [node.outputs[0] for node in group]
    take_over_values(graph, list(zip(olds, split.outputs, strict=True)))
    remove_dead_producers(graph, olds)


class MergeSiblingLayersPass(ir.passes.InPlacePass):
    """Merge each group of SlimMatMul nodes of the main graph that read the same value (see module
    doc); `merged` holds the groups' node names after a call."""

    def __init__(self):
        super().__init__()
        self.merged: list[list[str]] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.merged = []
        for group in _siblings(model.graph):
            parts = [node_weights(node) for node in group]
            levels = {node.attributes.get_int("accuracy_level", 0) for node in group}
            weights = concatenate_columns(parts) if None not in parts and len(levels) == 1 else None
            if weights is not None:
                _merge(model.graph, group, weights)
                self.merged.append([node.name for node in group])
        return ir.passes.PassResult(model, modified=bool(self.merged))


__all__ = ["MergeSiblingLayersPass", "node_weights"]
