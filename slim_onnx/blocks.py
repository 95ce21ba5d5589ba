"""Cutting an ONNX graph into the parts calibration runs: sub-models that compute chosen values from
graph inputs and from values cut out of the graph, run in onnxruntime without copying the weights.

Segments. The layers to compress come in groups (transformer blocks, in graph order); group g is
segment g. Every other node of the main graph belongs to the segment of the latest layer it depends
on, or to segment -1 ("static") when it depends on none: the embedding, the attention mask, the
rotary tables, the first block's input norm. So segment b is block b's layers and everything that
follows from them up to the next block's layers, and the graph reads as
    static -> segment 0 -> segment 1 -> ... -> segment B-1
where a segment's nodes read only static values and values of its own or earlier segments.

Sub-models. `Submodel` is the closure of some target values: every node they depend on, walking
back until a graph input, an initializer, or a cut value (given as an input instead; streaming cuts
block b's sub-model at every node of the static part and of earlier segments). A sub-model is a
ModelProto in memory whose weights stay where they are: tensors already in external data keep
their references, resolved in the model's own folder (onnxruntime's
session.model_external_initializers_file_folder_path), so nothing is copied or written to disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper

from slim_onnx.runtime import session_options

STATIC = -1


def _subgraphs(node: ir.Node) -> Iterator[ir.Graph]:
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            yield attr.value
        elif attr.type == ir.AttributeType.GRAPHS:
            yield from attr.value


def reads(node: ir.Node) -> Iterator[ir.Value]:
    """The values `node` reads: its inputs and what its subgraphs (If/Loop bodies) read from outside."""
    yield from (v for v in node.inputs if v is not None)
    for graph in _subgraphs(node):
        for inner in graph:
            yield from reads(inner)


def _main_producer(value: ir.Value, graph: ir.Graph) -> ir.Node | None:
    node = value.producer()
    return node if node is not None and node.graph is graph else None


def assign_segments(graph: ir.Graph, layer_segment: Callable[[ir.Node], int | None]) -> dict[ir.Node, int]:
    """Each main-graph node's segment (the module doc): layer_segment(node) for a layer, else None.
    The graph is in topological order (ONNX requires it; our passes keep it)."""
    segment: dict[ir.Node, int] = {}
    for node in graph:
        own = layer_segment(node)
        latest = STATIC if own is None else own
        values = reads(node) if node.attributes else node.inputs  # only attributes can hold subgraphs
        for value in values:
            producer = value.producer() if value is not None else None
            # a producer outside the main graph (inside a subgraph) is not in `segment` yet
            latest = max(latest, segment.get(producer, STATIC))
        segment[node] = latest
    return segment


def closure(graph: ir.Graph, targets: Iterable[ir.Value], cut: Callable[[ir.Node], bool]) -> tuple[list[ir.Node], list[ir.Value]]:
    """(nodes in graph order, cut values): what computing `targets` needs, stopping at graph inputs,
    initializers, and the outputs of nodes for which cut(node) is true (those values are inputs)."""
    needed: set[ir.Node] = set()
    cut_values: dict[ir.Value, None] = {}
    stack = list(targets)
    seen: set[ir.Value] = set()
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        node = _main_producer(value, graph)
        if node is None:
            continue
        if cut(node):
            cut_values[value] = None
            continue
        if node not in needed:
            needed.add(node)
            stack.extend(reads(node))
    return [node for node in graph if node in needed], list(cut_values)


def _value_info(value: ir.Value) -> onnx.ValueInfoProto:
    return ir.serde.serialize_value(value)


def _array_value_info(name: str, array: np.ndarray) -> onnx.ValueInfoProto:
    """An input declared by the arrays that will feed it: their dtype and rank, every size symbolic."""
    elem = helper.np_dtype_to_tensor_dtype(array.dtype)
    return helper.make_tensor_value_info(name, elem, [f"{name}_d{i}" for i in range(array.ndim)])


class Submodel:
    """The sub-model of `model` computing `targets` from the graph inputs and the `cut` values.

    inputs: the names to feed (graph inputs first, then cut values); `feed(graph_feed, carried)`
    picks them from one calibration feed and the carried (cut) values. Targets that are themselves
    graph inputs or cut values are not outputs: `run` returns them from the feeds as they are.
    """

    def __init__(self, model: ir.Model, targets: list[ir.Value], cut: Callable[[ir.Node], bool]):
        graph = model.graph
        self.model = model
        self.nodes, self.cut_values = closure(graph, targets, cut)
        used = {v for node in self.nodes for v in reads(node)} | set(targets)
        self.graph_inputs = [v for v in graph.inputs if v in used]
        self.initializers = [v for v in graph.initializers.values() if v in used]  # some also graph inputs
        produced = {v for node in self.nodes for v in node.outputs}
        self.targets = [v.name for v in targets]
        self.outputs = list(dict.fromkeys(v.name for v in targets if v in produced))
        self.inputs = [v.name for v in self.graph_inputs] + [v.name for v in self.cut_values]

    def proto(self, carried_example: dict[str, np.ndarray]) -> onnx.ModelProto:
        """The ModelProto; cut values are declared by example arrays of them."""
        graph = self.model.graph
        g = helper.make_graph(
            [ir.serde.serialize_node(node) for node in self.nodes],
            f"{graph.name or 'graph'}_part",
            [_value_info(v) for v in self.graph_inputs]
            + [_array_value_info(v.name, carried_example[v.name]) for v in self.cut_values],
            [helper.make_empty_tensor_value_info(name) for name in self.outputs],
            initializer=[ir.serde.serialize_tensor(v.const_value) for v in self.initializers],
        )
        proto = helper.make_model(
            g, opset_imports=[helper.make_opsetid(domain, version) for domain, version in self.model.opset_imports.items()],
            ir_version=self.model.ir_version,
        )
        proto.functions.extend(ir.serde.serialize_function(f) for f in self.model.functions.values())
        return proto

    def session(self, carried_example: dict[str, np.ndarray], weights_folder: str | os.PathLike | None,
                providers=("CPUExecutionProvider",)) -> SubmodelSession:
        return SubmodelSession(self, self.proto(carried_example), weights_folder, providers)


class SubmodelSession:
    """An onnxruntime session of a Submodel (with our kernels: earlier blocks may be SlimMatMul)."""

    def __init__(self, part: Submodel, proto: onnx.ModelProto, weights_folder, providers):
        self.part = part
        so = session_options()
        # Every value the caller asked for stays as computed: no fusion may change a layer's input.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if weights_folder is not None:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_folder))
        self.session = ort.InferenceSession(proto.SerializeToString(), so, providers=list(providers)) \
            if part.outputs else None

    def run(self, graph_feed: dict[str, np.ndarray], carried: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The targets by name, for one feed of the graph inputs and the carried values."""
        available = {**graph_feed, **carried}
        results = {}
        if self.session is not None:
            # a graph input that is also an initializer (older exports) has a default: fed only if given
            inputs = {name: available[name] for name in self.part.inputs if name in available}
            results = dict(zip(self.part.outputs, self.session.run(self.part.outputs, inputs), strict=True))
        return {name: results[name] if name in results else available[name] for name in self.part.targets}


def weights_folder(model: ir.Model) -> str | None:
    """The folder the model's external tensors are read from (None when all are in memory)."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            return tensor.base_dir
    return None


__all__ = ["STATIC", "Submodel", "SubmodelSession", "assign_segments", "closure", "reads", "weights_folder"]
