"""Finding the linear layers of an ONNX graph: y = x @ W (+ b) with a constant W.

Patterns (W a constant 2-D initializer, in this graph or an enclosing one, possibly behind Identity):
  MatMul(x, W)                          W is [K, N]
  MatMul(x, Transpose(W))               W is [N, K] (perm absent or [1, 0]); tied lm_head
  Gemm(x, W, b?) with alpha = beta = 1, transA = 0, transB in {0, 1}
  ... followed by Add(y, b) with a constant b of shape [N]: the bias is folded into the layer.
Not layers: MatMuls of two activations (attention), and MatMuls whose x is itself a constant or a
Cast of one (rotary embedding tables), so that only weights of real layers are compressed.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx_ir as ir

from slim_onnx.passes.graph import constant_source, weight_source


_BLOCK_INDEX = re.compile(r"(?:layers|layer|blocks|block|h)[./_](\d+)(?:[./_]|$)")


def block_index(name: str) -> str | None:
    """The transformer block a layer's node name places it in (`/model/layers.3/...`,
    `/transformer/h.3/...`, `/encoder/layer.3/...` give "3"), or None."""
    match = _BLOCK_INDEX.search(name)
    return match.group(1) if match else None


@dataclasses.dataclass
class LinearLayer:
    name: str
    node: ir.Node  # the MatMul or Gemm
    activation: ir.Value
    weight: ir.Value  # the 2-D initializer
    transposed: bool  # the initializer is [N, K]
    transpose_node: ir.Node | None
    bias: ir.Value | None  # constant [N]
    bias_add: ir.Node | None  # an Add folded into the layer
    k: int
    n: int

    @property
    def output(self) -> ir.Value:
        """The value the layer produces (after the folded bias Add, if any)."""
        return (self.bias_add or self.node).outputs[0]

    @property
    def graph(self) -> ir.Graph:
        return self.node.graph

    def weight_array(self) -> np.ndarray:
        """W as float32 [K, N]."""
        w = self.weight.const_value.numpy().astype(np.float32)
        return np.ascontiguousarray(w.T if self.transposed else w)

    def bias_array(self) -> np.ndarray | None:
        return None if self.bias is None else self.bias.const_value.numpy().astype(np.float32).reshape(-1)


def _is_constant_derived(value: ir.Value | None) -> bool:
    """A constant, or a Constant node, or a Cast/Identity of one: never a layer's activation."""
    if value is None:
        return False
    if value.const_value is not None:
        return True
    producer = value.producer()
    if producer is None:
        return False
    if producer.op_type == "Constant":
        return True
    return producer.op_type in ("Cast", "Identity") and _is_constant_derived(producer.inputs[0])


def _foldable_bias(node: ir.Node, n: int) -> tuple[ir.Value, ir.Node] | None:
    """A following Add(y, b) with a constant b of shape [N], when y has no other use."""
    out = node.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1:
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain != "" or len(add.inputs) != 2:
        return None
    other = constant_source(add.inputs[1 - uses[0].idx])
    if other is None or int(np.prod(other.const_value.shape)) != n or other.const_value.shape[-1] != n:
        return None
    return other, add


def _match(node: ir.Node, index: int) -> LinearLayer | None:
    if node.domain != "" or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    activation = node.inputs[0]
    if activation is None or _is_constant_derived(activation):
        return None
    bias = bias_add = None
    if node.op_type == "MatMul":
        source = weight_source(node.inputs[1])
        if source is None:
            return None
        weight, transposed, transpose_node = source
    else:
        a = node.attributes
        if a.get_int("transA", 0) or a.get_float("alpha", 1.0) != 1.0 or a.get_float("beta", 1.0) != 1.0:
            return None
        weight = constant_source(node.inputs[1])
        if weight is None or len(weight.const_value.shape) != 2:
            return None
        transposed, transpose_node = bool(a.get_int("transB", 0)), None
    rows, cols = weight.const_value.shape
    k, n = (cols, rows) if transposed else (rows, cols)
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        c = constant_source(node.inputs[2])
        if c is None or int(np.prod(c.const_value.shape)) != n:
            return None
        bias = c
    elif node.op_type == "MatMul":
        folded = _foldable_bias(node, n)
        if folded is not None:
            bias, bias_add = folded
    name = node.name or f"{node.op_type}_{index}"
    return LinearLayer(name, node, activation, weight, transposed, transpose_node, bias, bias_add, int(k), int(n))


def find_linear_layers(model: ir.Model) -> list[LinearLayer]:
    """Every linear layer of the model's graph and its subgraphs (If/Loop bodies), in graph order."""
    layers = []
    for index, node in enumerate(ir.traversal.RecursiveGraphIterator(model.graph)):
        layer = _match(node, index)
        if layer is not None:
            layers.append(layer)
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):  # unnamed or duplicate node names: make them unique
        seen: dict[str, int] = {}
        for layer in layers:
            count = seen.get(layer.name, 0)
            seen[layer.name] = count + 1
            if count:
                layer.name = f"{layer.name}_{count}"
    return layers
