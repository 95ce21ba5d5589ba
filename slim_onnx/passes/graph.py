"""Graph helpers every pass uses: reading constants and producers, finding readers, adding
initializers, and handing a replaced value's place in the graph to its replacement.

Pattern matchers read the graph through these (`producer`, `only_reader`, `const_ints`, ...) so that
"a standard-domain node of this type" and "a constant, through Identity aliases" mean the same thing
in every pass; rewrites register initializers with `register_constant`, swap values with
`take_over_values`, and remove what the old values' producers leave dead with `remove_dead_producers`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    """The standard-domain `op_type` node that produced `value`, or None."""
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def readers(value: ir.Value, op_type: str) -> list[ir.Node]:
    """The standard-domain `op_type` nodes that read `value`."""
    return [u.node for u in value.uses() if u.node.op_type == op_type and u.node.domain == ""]


def only_reader(value: ir.Value, op_type: str) -> ir.Node | None:
    """The node that reads `value`, when that is its only use (not a graph output) and a standard-domain
    `op_type` node."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output() or uses[0].node.op_type != op_type or uses[0].node.domain != "":
        return None
    return uses[0].node


def other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The other input of a two-input node one of whose inputs is `value`."""
    if len(node.inputs) != 2 or value not in node.inputs:
        return None
    a, b = node.inputs
    return b if a is value else a


def const_scalar(value: ir.Value | None) -> float | None:
    """A constant one-element tensor's value as a float."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().reshape(()))


def const_ints(value: ir.Value | None) -> list[int] | None:
    """A constant tensor's values as a flat list of ints."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else [int(x) for x in tensor.numpy().reshape(-1)]


def perm(node: ir.Node | None) -> list[int] | None:
    """A Transpose's perm attribute (None when absent: the reversal)."""
    attr = node.attributes.get("perm") if node is not None else None
    return None if attr is None else list(attr.as_ints())


def constant_source(value: ir.Value | None) -> ir.Value | None:
    """The initializer behind `value`, following Identity nodes (exporters alias identical tensors,
    e.g. equal biases or all-ones norm weights, through Identity), or None when it is not a constant."""
    while value is not None and value.const_value is None:
        node = producer(value, "Identity")
        if node is None:
            return None
        value = node.inputs[0]
    return value


def weight_source(value: ir.Value | None) -> tuple[ir.Value, bool, ir.Node | None] | None:
    """(2-D initializer, transposed, Transpose node) behind a MatMul's second input, if any: the
    initializer itself ([K, N]) or a Transpose of it without perm or with perm [1, 0] ([N, K])."""
    if value is None:
        return None
    source = constant_source(value)
    if source is not None:
        return (source, False, None) if len(source.const_value.shape) == 2 else None
    transpose = producer(value, "Transpose")
    if transpose is not None and perm(transpose) in (None, [1, 0]):
        source = constant_source(transpose.inputs[0])
        if source is not None and len(source.const_value.shape) == 2:
            return source, True, transpose
    return None


def register_constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """An initializer `name` holding `array`, registered in `graph` (0-d arrays stay scalars, which
    np.ascontiguousarray would make 1-d)."""
    array = array if array.flags.c_contiguous else np.ascontiguousarray(array)
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _unread(value: ir.Value) -> bool:
    return not value.is_graph_output() and not any(True for _ in value.uses())


def take_over_values(graph: ir.Graph, pairs: list[tuple[ir.Value, ir.Value]], graph_outputs_only: bool = False) -> None:
    """Give each new value of `pairs` (old, new) the old one's type, shape, readers (graph outputs
    included) and name. The old values' producers stay, for remove_dead_producers.

    graph_outputs_only: only the graph-output slots move; the old value's readers keep it (when they
    may feed the new value's producer, moving them would close a cycle)."""
    for old, new in pairs:
        new.type, new.shape = old.type, old.shape
        if graph_outputs_only:
            graph.outputs[:] = [new if v is old else v for v in graph.outputs]
        else:
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        name, old.name = old.name, None  # one name per graph: the old value lives until its producer goes
        new.name = name


def remove_dead_producers(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Remove the producers of `values` that nothing reads any more, and theirs in turn, and the
    initializers they read that nothing reads any more (unless graph inputs or outputs): what a
    rewrite left behind, so that the next pass matches a clean graph. Readers go before what they
    read; a node with a live output, or a graph input, ends the walk."""
    pending = [v.producer() for v in values if v is not None and v.producer() is not None]
    while pending:
        node = pending.pop()
        if node.graph is not graph or not all(_unread(out) for out in node.outputs):
            continue
        inputs = [v for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
        for value in inputs:
            if value.producer() is not None:
                pending.append(value.producer())
            elif value.is_initializer() and _unread(value) and not value.is_graph_input():
                graph.initializers.pop(value.name, None)


__all__ = [
    "const_ints",
    "const_scalar",
    "constant_source",
    "only_reader",
    "other_input",
    "perm",
    "producer",
    "readers",
    "register_constant",
    "remove_dead_producers",
    "take_over_values",
    "weight_source",
]
