"""Float16 activations end to end, for onnxruntime's CUDA provider (`compress --target cuda`).

Why: a float32 export compressed as it is runs float32 activations through every op; on a GPU the
SlimMatMul kernels, the norms and the attention all run (and are fastest) in float16, and a float32
graph would add a Cast per layer or run float32 kernels. So a float32 export compressed for CUDA
becomes a float16 graph, as an export made with `--dtype fp16` is:

  - every float32 tensor the graph computes, feeds or returns becomes float16: graph inputs and
    outputs (the KV cache, logits), initializers and constants (clipped to +-65504: an export's
    "minus infinity" mask value becomes -65504, which Softmax still maps to zero), and each
    Cast / ConstantOfShape that makes float32 makes float16;
  - except the rotary angles: everything upstream of a Cos or Sin (positions times inverse
    frequencies, which float16 cannot hold: at position 4096 its step is 4) stays float32, and the
    cos / sin values are cast to float16 where the rest of the graph reads them;
  - and what our ops' contract keeps float32: SlimMatMul's bias (docs/op-spec.md), and the float32
    statistics outputs (mean, inverse std) of com.microsoft's normalization ops.

A float16 export (no float32 graph input or output) is left as it is: its float32 parts are the
exporter's deliberate ones (norms and softmax computed in float32 between Casts).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slim_onnx.schema import DOMAIN, SLIM_MATMUL

FLOAT16_MAX = 65504.0
_FLOAT32 = ir.DataType.FLOAT
_FLOAT16 = ir.DataType.FLOAT16
# (domain, op type, input index) that stay float32 by contract
_FLOAT32_INPUTS = {(DOMAIN, SLIM_MATMUL, 3)}
# (domain, op type) whose outputs after the first are float32 statistics
_FLOAT32_STATISTICS = {("com.microsoft", "SkipSimplifiedLayerNormalization"), ("com.microsoft", "SkipLayerNormalization"),
                       ("", "SimplifiedLayerNormalization"), ("", "LayerNormalization")}


def _rotary_angles(graph: ir.Graph) -> set[ir.Node]:
    """Cos and Sin nodes and every node upstream of them: the float32 island."""
    island: set[ir.Node] = set()
    stack = [node for node in graph if node.op_type in ("Cos", "Sin") and node.domain == ""]
    while stack:
        node = stack.pop()
        if node in island:
            continue
        island.add(node)
        stack.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
    return island


_BOOLEAN_OPS = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Not", "Xor", "IsNaN", "IsInf"}
_INT64_OPS = {"Shape", "Size", "NonZero", "ArgMax", "ArgMin"}


def _element_types(graph: ir.Graph) -> dict[int, ir.DataType]:
    """Each value's element type (by id), where exports leave it unannotated: read off the graph's
    inputs and constants and carried through the nodes in order (Cast: its `to`; comparisons: bool;
    Shape and friends: int64; Where: its second input's; any other op: its first typed input's)."""
    types: dict[int, ir.DataType] = {}
    for value in (*graph.inputs, *graph.initializers.values()):
        if value.dtype is not None:
            types[id(value)] = value.dtype
    for node in graph:
        known = [types.get(id(v)) if v is not None else None for v in node.inputs]
        if node.op_type == "Cast" and node.domain == "":
            out = ir.DataType(node.attributes.get_int("to", 0))
        elif node.op_type in ("Constant", "ConstantOfShape") and node.domain == "":
            value = node.attributes.get("value")
            out = value.value.dtype if value is not None else _FLOAT32
        elif node.op_type in _BOOLEAN_OPS and node.domain == "":
            out = ir.DataType.BOOL
        elif node.op_type in _INT64_OPS and node.domain == "":
            out = ir.DataType.INT64
        elif node.op_type == "Where" and node.domain == "":
            out = known[1] if len(known) > 1 else None
        else:
            out = next((t for t in known if t is not None), None)
        for i, value in enumerate(node.outputs):
            typed = value.dtype or (_FLOAT32 if (node.domain, node.op_type) in _FLOAT32_STATISTICS and i > 0 else out)
            if typed is not None:
                types[id(value)] = typed
    return types


def _half(array: np.ndarray) -> np.ndarray:
    return np.clip(array, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)


def _half_tensor(tensor: ir.TensorProtocol, name: str) -> ir.Tensor:
    return ir.tensor(_half(tensor.numpy()), name=name)


class ConvertToFloat16Pass(ir.passes.InPlacePass):
    """Convert the main graph's float32 activations and constants to float16 (module doc);
    `converted` counts the values retyped after a call."""

    def __init__(self):
        super().__init__()
        self.converted = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.converted = 0
        if not any(v.dtype == _FLOAT32 for v in (*graph.inputs, *graph.outputs)):
            return ir.passes.PassResult(model, modified=False)
        island = _rotary_angles(graph)
        types = _element_types(graph)
        self._casts: dict[int, ir.Value] = {}

        def keeps_float32(use: ir.Usage) -> bool:
            node = use.node
            return node in island or (node.domain, node.op_type, use.idx) in _FLOAT32_INPUTS

        # initializers: float16, or both a float32 and a float16 copy where both kinds read them
        for value in list(graph.initializers.values()):
            if value.dtype != _FLOAT32 or value.const_value is None:
                continue
            uses = list(value.uses())
            kept = [u for u in uses if keeps_float32(u)]
            if len(kept) == len(uses) and not value.is_graph_output():
                continue
            half = ir.Value(name=f"{value.name}/float16", shape=value.shape, type=ir.TensorType(_FLOAT16),
                            const_value=_half_tensor(value.const_value, f"{value.name}/float16"))
            graph.register_initializer(half)
            for use in uses:
                if not keeps_float32(use):
                    use.node.replace_input_with(use.idx, half)
            if not kept:
                graph.initializers.pop(value.name)
            self.converted += 1

        for node in list(graph):
            if node in island:
                continue
            if node.domain == "" and node.op_type == "Cast" and node.attributes.get_int("to", 0) == _FLOAT32:
                node.attributes["to"] = ir.AttrInt64("to", _FLOAT16)
            elif node.domain == "" and node.op_type in ("Constant", "ConstantOfShape"):
                value = node.attributes.get("value")
                if value is None and node.op_type == "ConstantOfShape":  # float32 zeros by default
                    node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.zeros(1, np.float16)))
                elif value is not None and value.value.dtype == _FLOAT32:
                    node.attributes["value"] = ir.AttrTensor("value", _half_tensor(value.value, value.value.name or ""))
                for name in ("value_float", "value_floats"):  # float32 by definition: a float16 tensor instead
                    if name in node.attributes:
                        numbers = np.asarray(node.attributes.pop(name).value, dtype=np.float32)
                        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(_half(numbers)))
            statistics = (node.domain, node.op_type) in _FLOAT32_STATISTICS
            for i, out in enumerate(node.outputs):
                if out.dtype == _FLOAT32 and not (statistics and i > 0):
                    out.dtype = _FLOAT16
                    self.converted += 1
            for index, value in enumerate(node.inputs):  # float32 island outputs read here: cast
                if value is not None and value.producer() in island and types.get(id(value)) == _FLOAT32:
                    if (node.domain, node.op_type, index) not in _FLOAT32_INPUTS:
                        node.replace_input_with(index, self._cast(graph, value))
        for value in (*graph.inputs, *graph.outputs):
            if value.dtype == _FLOAT32:
                value.dtype = _FLOAT16
                self.converted += 1
        return ir.passes.PassResult(model, modified=self.converted > 0)

    def _cast(self, graph: ir.Graph, value: ir.Value) -> ir.Value:
        """One float16 Cast of an island value, shared by its readers, placed after its producer."""
        if id(value) not in self._casts:
            cast = ir.node("Cast", [value], {"to": _FLOAT16}, name=f"{value.name}/float16")
            cast.outputs[0].name = f"{value.name}/float16"
            cast.outputs[0].dtype, cast.outputs[0].shape = _FLOAT16, value.shape
            graph.insert_after(value.producer(), cast)
            self._casts[id(value)] = cast.outputs[0]
        return self._casts[id(value)]


__all__ = ["ConvertToFloat16Pass", "FLOAT16_MAX"]
