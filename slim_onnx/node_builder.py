"""SlimMatMul nodes as ONNX protobuf: a node with its initializers, or a one-node model, for tests,
benchmarks and graphs built with onnx.helper. A thin wrapper over the passes' onnx-ir builder
(passes/rewrite.slim_matmul_node), so there is one way to write the node."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from slim_onnx.config import GraphOptions
from slim_onnx.layout import SlimWeights
from slim_onnx.passes.rewrite import AddFallbackFunctionsPass, slim_matmul_node
from slim_onnx.schema import IR_VERSION, OPSET

__all__ = ["IR_VERSION", "add_fallback_functions", "make_slim_matmul_model", "make_slim_matmul_node"]


def _one_node_graph(
    weights: SlimWeights, a: ir.Value, y_name: str, node_name: str, accuracy_level: int, activation: str
) -> ir.Graph:
    graph = ir.Graph([a], [], nodes=[], name="slim_matmul")
    node = slim_matmul_node(graph, a, weights, accuracy_level, node_name, activation)
    node.outputs[0].name = y_name
    graph.append(node)
    graph.outputs.append(node.outputs[0])
    return graph


def make_slim_matmul_node(
    weights: SlimWeights, a_name: str, y_name: str, node_name: str,
    accuracy_level: int = GraphOptions().accuracy_level, activation: str = "none",
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """One SlimMatMul node computing y = a @ W (+ adapters, + bias), and the initializers it reads;
    with activation="swiglu", y = silu(p[..., :N/2]) * p[..., N/2:] of that product p.

    Initializer names are node_name + "/W", "/W_scales", ... so that several nodes never collide.
    """
    graph = _one_node_graph(weights, ir.Value(name=a_name), y_name, node_name, accuracy_level, activation)
    initializers = [ir.serde.serialize_tensor(v.const_value) for v in graph.initializers.values()]
    return ir.serde.serialize_node(graph.node(0)), initializers


def add_fallback_functions(model: onnx.ModelProto) -> None:
    """Give `model` the fallback function of every SlimMatMul variant its graph uses (idempotent):
    AddFallbackFunctionsPass, applied to a ModelProto in place."""
    ir_model = ir.serde.deserialize_model(model)
    AddFallbackFunctionsPass()(ir_model)
    model.CopyFrom(ir.serde.serialize_model(ir_model))


def make_slim_matmul_model(
    weights: SlimWeights, dtype: type = np.float32, accuracy_level: int = GraphOptions().accuracy_level, batch_dims: int = 1,
    activation: str = "none",
) -> onnx.ModelProto:
    """A one-node model Y = SlimMatMul(A) with `batch_dims` symbolic leading dimensions."""
    elem = ir.DataType.FLOAT16 if np.dtype(dtype) == np.float16 else ir.DataType.FLOAT
    lead = [f"d{i}" for i in range(batch_dims)]
    n_out = weights.n // 2 if activation == "swiglu" else weights.n
    a = ir.Value(name="A", type=ir.TensorType(elem), shape=ir.Shape([*lead, weights.k]))
    graph = _one_node_graph(weights, a, "Y", "slim_matmul", accuracy_level, activation)
    y = graph.outputs[0]
    y.type, y.shape = ir.TensorType(elem), ir.Shape([*lead, n_out])
    graph.opset_imports[""] = OPSET
    model = ir.Model(graph, ir_version=IR_VERSION)
    AddFallbackFunctionsPass()(model)
    return ir.serde.serialize_model(model)
