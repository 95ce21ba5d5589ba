"""Graph passes that turn linear layers into SlimMatMul nodes (onnx-ir, in place).

  ReplaceLinearLayersPass(weights, accuracy_level)
                                    each layer named in `weights` becomes one SlimMatMul node with its
                                    packed initializers; a folded bias Add disappears; the old weight
                                    is removed unless something else still reads it (tied embeddings)
  AddFallbackFunctionsPass()        the model-local function of every variant of our ops in use
                                    (SlimMatMul, GroupQueryAttention), the custom opset import, IR 10
run_passes() ends every rewrite with the clean-up; compress_graph() is the first rewrite.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from slim_onnx.fallback import attention_fallback_function, fallback_function
from slim_onnx.layout import SlimWeights
from slim_onnx.passes.graph import register_constant, remove_dead_producers, take_over_values
from slim_onnx.passes.linear import LinearLayer, find_linear_layers
from slim_onnx.schema import DOMAIN, GROUP_QUERY_ATTENTION, IR_VERSION, OPSET, SLIM_MATMUL, VARIANTS


def slim_matmul_node(
    graph: ir.Graph, a: ir.Value, weights: SlimWeights, accuracy_level: int, name: str, activation: str = "none"
) -> ir.Node:
    """A SlimMatMul node named `name` computing a @ weights (then the activation, "none" or "swiglu"),
    its initializers ("name/W", ...) registered in `graph`; the caller inserts it."""
    inputs: list[ir.Value | None] = [a]
    for key, array in weights.input_tensors().items():
        if array is None:
            inputs.append(None)
            continue
        inputs.append(register_constant(graph, f"{name}/{key}", array))
    while inputs[-1] is None:
        inputs.pop()
    attributes = weights.attributes(accuracy_level)
    if activation != "none":
        attributes["activation"] = activation
    variant = dataclasses.replace(weights.variant, swiglu=activation == "swiglu")
    return ir.node(SLIM_MATMUL, inputs, attributes=attributes, domain=DOMAIN, overload=variant.overload, name=name)


def _replace(layer: LinearLayer, weights: SlimWeights, accuracy_level: int) -> None:
    if (weights.k, weights.n) != (layer.k, layer.n):
        raise ValueError(f"layer {layer.name}: packed weights are {weights.k}x{weights.n}, the layer is {layer.k}x{layer.n}")
    graph = layer.graph
    # the node's current input: an earlier rewrite may have replaced it
    new = slim_matmul_node(graph, layer.node.inputs[0], weights, accuracy_level, layer.name)
    graph.insert_before(layer.node, new)
    old, was_output = layer.output, layer.output.is_graph_output()
    take_over_values(graph, [(old, new.outputs[0])])
    remove_dead_producers(graph, [old])  # the MatMul/Gemm, its bias Add, a tied lm_head's Transpose
    if not was_output:
        new.outputs[0].name = f"{layer.name}/Y"


def _declare_our_ops(model: ir.Model) -> None:
    """What a model using our ops needs: our domain imported, and IR 10 (node overloads)."""
    model.opset_imports.setdefault(DOMAIN, 1)
    model.opset_imports.setdefault("", OPSET)
    model.ir_version = max(model.ir_version or 0, IR_VERSION)


class ReplaceLinearLayersPass(ir.passes.InPlacePass):
    """Replace the layers named in `weights` (LinearLayer.name -> SlimWeights) by SlimMatMul nodes.
    `layers`: those LinearLayers of the model, when the caller has them (block by block, a search of
    the whole graph per block would make the rewrite quadratic in depth)."""

    def __init__(self, weights: dict[str, SlimWeights], accuracy_level: int, layers: list[LinearLayer] | None = None):
        super().__init__()
        self.weights = weights
        self.accuracy_level = accuracy_level
        self.layers = layers

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = {layer.name: layer for layer in (self.layers or find_linear_layers(model))}
        missing = sorted(set(self.weights) - set(layers))
        if missing:
            raise ValueError(f"no linear layer named {missing[0]!r} in the model")
        for name, weights in self.weights.items():
            _replace(layers[name], weights, self.accuracy_level)
        if self.weights:  # the model may run as it is (streaming)
            _declare_our_ops(model)
        return ir.passes.PassResult(model, modified=bool(self.weights))


_FALLBACKS = {SLIM_MATMUL: fallback_function, GROUP_QUERY_ATTENTION: attention_fallback_function}


class AddFallbackFunctionsPass(ir.passes.InPlacePass):
    """Add the fallback function of each variant of our ops the model uses (and the opset import)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        variants = {
            (node.op_type, node.overload)
            for node in ir.traversal.RecursiveGraphIterator(model.graph)
            if node.domain == DOMAIN and node.op_type in _FALLBACKS
        }
        modified = False
        for op_type, overload in sorted(variants):
            if (DOMAIN, op_type, overload) not in model.functions:
                function = ir.serde.deserialize_function(_FALLBACKS[op_type](VARIANTS[op_type].parse(overload)))
                model.functions[function.identifier()] = function
                modified = True
        if variants:
            _declare_our_ops(model)
        return ir.passes.PassResult(model, modified=modified)


def run_passes(model: ir.Model, passes: list[ir.passes.PassBase]) -> ir.Model:
    """`passes` in order, then the clean-up every rewrite ends with, once, in place: the graph sorted,
    what nothing reads removed, and the fallback function of every variant in use (and of no other)."""
    clean_up = [
        common_passes.TopologicalSortPass(),  # before the removal, which sweeps the graph once, readers first
        common_passes.RemoveUnusedNodesPass(),
        AddFallbackFunctionsPass(),
        common_passes.RemoveUnusedFunctionsPass(),
    ]
    try:
        return ir.passes.PassManager([*passes, *clean_up])(model).model
    except ir.passes.PassError as error:  # report our own problem, not the pass manager's wrappers
        cause = error.__cause__
        while isinstance(cause, ir.passes.PassError):
            cause = cause.__cause__
        if isinstance(cause, ValueError):
            raise cause from None
        raise


def compress_graph(model: ir.Model, weights: dict[str, SlimWeights], accuracy_level: int) -> ir.Model:
    """Replace the layers named in `weights` by SlimMatMul nodes, in place (and clean up)."""
    return run_passes(model, [ReplaceLinearLayersPass(weights, accuracy_level)])
