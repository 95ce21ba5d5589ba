"""Writing SlimMatMul nodes: the node, its packed initializers, and its fallback function."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from slim_onnx.fallback import DOMAIN, IR_VERSION, OP_TYPE, OPSET, SWIGLU_SUFFIX
from slim_onnx.format import SlimWeights
from slim_onnx.passes.rewrite import AddFallbackFunctionsPass

__all__ = ["IR_VERSION", "add_fallback_functions", "make_slim_matmul_model", "make_slim_matmul_node"]


def make_slim_matmul_node(
    weights: SlimWeights, a_name: str, y_name: str, node_name: str, accuracy_level: int = 4, activation: str = "none"
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """One SlimMatMul node computing y = a @ W (+ adapters, + bias), and the initializers it reads;
    with activation="swiglu", y = silu(p[..., :N/2]) * p[..., N/2:] of that product p.

    Initializer names are node_name + "/W", "/W_scales", ... so that several nodes never collide.
    """
    inputs = [a_name]
    initializers = []
    for key, array in weights.input_tensors().items():
        if array is None:
            inputs.append("")
            continue
        name = f"{node_name}/{key}"
        inputs.append(name)
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    while inputs[-1] == "":
        inputs.pop()
    attributes = weights.attributes(accuracy_level)
    if activation != "none":
        attributes["activation"] = activation
    node = helper.make_node(OP_TYPE, inputs, [y_name], name=node_name, domain=DOMAIN, **attributes)
    node.overload = weights.variant + (SWIGLU_SUFFIX if activation == "swiglu" else "")
    return node, initializers


def add_fallback_functions(model: onnx.ModelProto) -> None:
    """Give `model` the fallback function of every SlimMatMul variant its graph uses (idempotent):
    AddFallbackFunctionsPass, applied to a ModelProto in place."""
    ir_model = ir.serde.deserialize_model(model)
    AddFallbackFunctionsPass()(ir_model)
    model.CopyFrom(ir.serde.serialize_model(ir_model))


def make_slim_matmul_model(
    weights: SlimWeights, dtype: type = np.float32, accuracy_level: int = 4, batch_dims: int = 1,
    activation: str = "none",
) -> onnx.ModelProto:
    """A one-node model Y = SlimMatMul(A) with `batch_dims` symbolic leading dimensions."""
    elem = TensorProto.FLOAT16 if np.dtype(dtype) == np.float16 else TensorProto.FLOAT
    lead = [f"d{i}" for i in range(batch_dims)]
    node, initializers = make_slim_matmul_node(weights, "A", "Y", "slim_matmul", accuracy_level, activation)
    n_out = weights.n // 2 if activation == "swiglu" else weights.n
    graph = helper.make_graph(
        [node],
        "slim_matmul",
        [helper.make_tensor_value_info("A", elem, [*lead, weights.k])],
        [helper.make_tensor_value_info("Y", elem, [*lead, n_out])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    add_fallback_functions(model)
    return model
