"""Folding the SwiGLU of Llama/Qwen-style MLPs into the merged gate/up SlimMatMul (activation="swiglu").

Why: after the sibling merge (passes/siblings.py) a decoder MLP at one token per step is
SlimMatMul -> Split -> Sigmoid -> Mul -> Mul -> SlimMatMul: three small nodes, each a pass over the
intermediate activation, around the two products. With activation="swiglu" the kernel applies
silu(gate) * up to each column range as soon as the task that computed it is done, and writes only
the N/2 columns the down projection reads.

Matched (the siblings' Split has exactly two equal halves on the last axis; nothing else reads the
intermediate values):

  gate, up = Split(SlimMatMul(x), [N/2, N/2], axis=-1)
  y = Mul(Mul(gate, Sigmoid(gate)), up)                      (either operand order, both Muls)
becomes
  y = SlimMatMul(x, activation="swiglu")                     (overload: the weights' variant + "_swiglu")
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from slim_onnx.layout import TILE_N
from slim_onnx.passes.graph import const_ints, only_reader, other_input, remove_dead_producers, take_over_values
from slim_onnx.schema import DOMAIN, SLIM_MATMUL, SlimMatMulVariant


def _halves(split: ir.Node, n: int) -> bool:
    if len(split.outputs) != 2 or split.attributes.get_int("axis", 0) not in (-1, len(split.inputs[0].shape or []) - 1):
        return False
    if len(split.inputs) > 1 and split.inputs[1] is not None:
        return const_ints(split.inputs[1]) == [n // 2, n // 2]
    return split.attributes.get_int("num_outputs", 0) == 2 and n % 2 == 0


def _swiglu_output(node: ir.Node) -> ir.Node | None:
    """The final Mul, when the module doc's pattern follows `node`."""
    n = node.attributes["N"].as_int()
    split = only_reader(node.outputs[0], "Split")
    if split is None or not _halves(split, n) or n % (2 * TILE_N) != 0:
        return None
    gate, up = split.outputs
    readers = [u.node for u in gate.uses()]
    sigmoid = next((r for r in readers if r.op_type == "Sigmoid" and r.domain == ""), None)
    if sigmoid is None or len(readers) != 2 or gate.is_graph_output():
        return None
    silu = only_reader(sigmoid.outputs[0], "Mul")
    if silu is None or other_input(silu, sigmoid.outputs[0]) is not gate or silu not in readers:
        return None
    last = only_reader(silu.outputs[0], "Mul")
    if last is None or other_input(last, silu.outputs[0]) is not up or only_reader(up, "Mul") is not last:
        return None
    return last


class FuseSwiGluPass(ir.passes.InPlacePass):
    """Fold each SwiGLU after a two-way-split SlimMatMul of the main graph into it (see module doc);
    `fused` counts them after a call. The new overloads need AddFallbackFunctionsPass afterwards."""

    def __init__(self):
        super().__init__()
        self.fused = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.fused = 0
        for node in [n for n in graph if n.domain == DOMAIN and n.op_type == SLIM_MATMUL]:
            if node.attributes.get_string("activation", "none") != "none":
                continue
            last = _swiglu_output(node)
            if last is None:
                continue
            take_over_values(graph, [(last.outputs[0], node.outputs[0])])
            remove_dead_producers(graph, [last.outputs[0]])
            node.attributes["activation"] = ir.Attr("activation", ir.AttributeType.STRING, "swiglu")
            node.overload = dataclasses.replace(SlimMatMulVariant.parse(node.overload), swiglu=True).overload
            self.fused += 1
        return ir.passes.PassResult(model, modified=bool(self.fused))


__all__ = ["FuseSwiGluPass"]
