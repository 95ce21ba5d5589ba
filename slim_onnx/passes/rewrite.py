"""Graph passes that turn linear layers into SlimMatMul nodes (onnx-ir, in place).

  ReplaceLinearLayersPass(weights)  each layer named in `weights` becomes one SlimMatMul node with its
                                    packed initializers; a folded bias Add disappears; the old weight
                                    is removed unless something else still reads it (tied embeddings)
  AddFallbackFunctionsPass()        the model-local function of every variant of our ops in use
                                    (SlimMatMul, GroupQueryAttention), the custom opset import, IR 10
compress_graph() composes them with onnx-ir's clean-up passes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from slim_onnx.fallback import (
    ATTENTION_OP_TYPE,
    DOMAIN,
    IR_VERSION,
    OP_TYPE,
    OPSET,
    attention_fallback_function,
    fallback_function,
)
from slim_onnx.format import SlimWeights
from slim_onnx.passes.linear import LinearLayer, find_linear_layers


def register_constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """An initializer `name` holding `array`, registered in `graph` (0-d arrays stay scalars, which
    np.ascontiguousarray would make 1-d)."""
    array = array if array.flags.c_contiguous else np.ascontiguousarray(array)
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def take_over_values(graph: ir.Graph, pairs: list[tuple[ir.Value, ir.Value]], dead: list[ir.Node]) -> None:
    """Give each new value of `pairs` (old, new) the old one's type, shape, readers (graph outputs
    included) and name; remove the `dead` nodes (readers before what they read), then the
    initializers they read that nothing reads any more."""
    names = []
    for old, new in pairs:
        new.type, new.shape = old.type, old.shape
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        names.append(old.name)
    read = [v for node in dead for v in node.inputs if v is not None and v.is_initializer()]
    for node in dead:
        graph.remove(node, safe=True)
    for value in read:
        if value.name in graph.initializers and not any(True for _ in value.uses()):
            graph.initializers.pop(value.name)
    for (_, new), name in zip(pairs, names):
        new.name = name


def slim_matmul_node(graph: ir.Graph, a: ir.Value, weights: SlimWeights, accuracy_level: int, name: str) -> ir.Node:
    """A SlimMatMul node named `name` computing a @ weights, its initializers ("name/W", ...)
    registered in `graph`; the caller inserts it."""
    inputs: list[ir.Value | None] = [a]
    for key, array in weights.input_tensors().items():
        if array is None:
            inputs.append(None)
            continue
        inputs.append(register_constant(graph, f"{name}/{key}", array))
    while inputs[-1] is None:
        inputs.pop()
    return ir.node(
        OP_TYPE, inputs, attributes=weights.attributes(accuracy_level), domain=DOMAIN, overload=weights.variant,
        name=name,
    )


def _replace(layer: LinearLayer, weights: SlimWeights, accuracy_level: int) -> None:
    if (weights.k, weights.n) != (layer.k, layer.n):
        raise ValueError(f"layer {layer.name}: packed weights are {weights.k}x{weights.n}, the layer is {layer.k}x{layer.n}")
    graph = layer.graph
    old_out = layer.output
    # the node's current input: an earlier rewrite may have replaced it
    new = slim_matmul_node(graph, layer.node.inputs[0], weights, accuracy_level, layer.name)
    new.outputs[0].type = old_out.type
    new.outputs[0].shape = old_out.shape
    graph.insert_before(layer.node, new)
    was_output = old_out.is_graph_output()
    ir.convenience.replace_all_uses_with(old_out, new.outputs[0], replace_graph_outputs=True)
    name = old_out.name
    for node in (layer.bias_add, layer.node):
        if node is not None:
            graph.remove(node, safe=True)
    if layer.transpose_node is not None and not any(True for _ in layer.transpose_node.outputs[0].uses()):
        graph.remove(layer.transpose_node, safe=True)
    new.outputs[0].name = name if was_output else f"{layer.name}/Y"


class ReplaceLinearLayersPass(ir.passes.InPlacePass):
    """Replace the layers named in `weights` (LinearLayer.name -> SlimWeights) by SlimMatMul nodes."""

    def __init__(self, weights: dict[str, SlimWeights], accuracy_level: int = 4):
        super().__init__()
        self.weights = weights
        self.accuracy_level = accuracy_level

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = {layer.name: layer for layer in find_linear_layers(model)}
        missing = sorted(set(self.weights) - set(layers))
        if missing:
            raise ValueError(f"no linear layer named {missing[0]!r} in the model")
        for name, weights in self.weights.items():
            _replace(layers[name], weights, self.accuracy_level)
        return ir.passes.PassResult(model, modified=bool(self.weights))


_FALLBACKS = {OP_TYPE: fallback_function, ATTENTION_OP_TYPE: attention_fallback_function}


class AddFallbackFunctionsPass(ir.passes.InPlacePass):
    """Add the fallback function of each variant of our ops the model uses (and the opset import)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        variants = {
            (node.op_type, node.overload)
            for node in ir.traversal.RecursiveGraphIterator(model.graph)
            if node.domain == DOMAIN and node.op_type in _FALLBACKS
        }
        modified = False
        for op_type, variant in sorted(variants):
            if (DOMAIN, op_type, variant) not in model.functions:
                function = ir.serde.deserialize_function(_FALLBACKS[op_type](variant))
                model.functions[function.identifier()] = function
                modified = True
        if variants:
            model.opset_imports.setdefault(DOMAIN, 1)
            model.opset_imports.setdefault("", OPSET)
            model.ir_version = max(model.ir_version or 0, IR_VERSION)
        return ir.passes.PassResult(model, modified=modified)


def compress_graph(model: ir.Model, weights: dict[str, SlimWeights], accuracy_level: int = 4) -> ir.Model:
    """Replace layers, add fallback functions, drop what became unused, keep the graph sorted."""
    passes = ir.passes.Sequential(
        ReplaceLinearLayersPass(weights, accuracy_level),
        AddFallbackFunctionsPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.TopologicalSortPass(),
    )
    try:
        return passes(model).model
    except ir.passes.PassError as error:  # report our own problem, not the pass manager's wrapper
        if isinstance(error.__cause__, ValueError):
            raise error.__cause__ from None
        raise
