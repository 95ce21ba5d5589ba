"""Storing token-embedding tables as int8 rows with group scales, gathered with standard ONNX ops.

Why: once every linear layer is SlimMatMul (lm_head included), the float embedding table is most
of what is left of a decoder's bytes (SmolLM2-135M: 113 MB of a 178 MB compressed model), yet a
step reads only the rows of its tokens. Dequantizing those rows after the Gather costs nothing
measurable and needs no kernel of ours, so the model stays plain ONNX for this part.

  y = Gather(E, ids, axis=0),  E: [V, H] float constant, read by nothing else
becomes
  q = Gather(E_q, ids)        E_q: int8 [V, H/G, G],  E_q = round(E / s), |E_q| <= 127
  s = Gather(E_s, ids)        E_s: float16 [V, H/G, 1],  s = max |E| over each group of G columns / 127
  y = Reshape(Cast(q) * Cast(s), Concat(Shape(ids), [H]))   in E's element type

G is 32, or the largest power of two below it that divides H (H itself when none does). A table that
something else still reads (e.g. a tied lm_head kept dense) is left alone: quantizing it would add
bytes, not remove them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from slim_onnx.passes.graph import register_constant

MIN_ROWS = 1024  # smaller tables (position or token-type embeddings) are not worth it


def group_size(hidden: int) -> int:
    for g in (32, 16, 8):
        if hidden % g == 0:
            return g
    return hidden


ROW_CHUNK = 8192  # rows quantized together: the float32 temporaries stay 8192 x H (a 128256-row table is 2 GB)


def quantize_rows_int8(table: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 [V, H/G, G], float16 [V, H/G, 1]): symmetric absmax per row and group of G columns."""
    rows, hidden = table.shape
    q = np.empty((rows, hidden // group, group), np.int8)
    scales = np.empty((rows, hidden // group, 1), np.float16)
    for r0 in range(0, rows, ROW_CHUNK):
        grouped = table[r0 : r0 + ROW_CHUNK].astype(np.float32).reshape(-1, hidden // group, group)
        chunk_scales = (np.abs(grouped).max(axis=-1, keepdims=True) / 127).astype(np.float16)
        safe = np.where(chunk_scales == 0, 1, chunk_scales).astype(np.float32)
        q[r0 : r0 + ROW_CHUNK] = np.clip(np.rint(grouped / safe), -127, 127)
        scales[r0 : r0 + ROW_CHUNK] = chunk_scales
    return q, scales


def dequantize_rows(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The float32 table the quantized rows stand for (the numpy reading of the rewrite above)."""
    return (q.astype(np.float32) * scales.astype(np.float32)).reshape(q.shape[0], -1)


@dataclasses.dataclass
class QuantizedEmbedding:
    name: str
    rows: int
    hidden: int
    group_size: int
    bytes_before: int
    bytes_after: int
    max_abs_error: float


def _embedding_gathers(graph: ir.Graph) -> list[ir.Node]:
    found = []
    for node in graph:
        if node.op_type != "Gather" or node.domain != "" or node.attributes.get_int("axis", 0) != 0:
            continue
        table = node.inputs[0]
        tensor = table.const_value if table is not None else None
        if tensor is None or not table.is_initializer() or table.is_graph_input() or len(tensor.shape) != 2:
            continue
        if tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16) or tensor.shape[0] < MIN_ROWS:
            continue
        if len(list(table.uses())) != 1 or node.inputs[1].const_value is not None:
            continue
        found.append(node)
    return found


def _rewrite(graph: ir.Graph, gather: ir.Node) -> QuantizedEmbedding:
    table, ids = gather.inputs
    array = table.const_value.numpy()
    rows, hidden = array.shape
    group = group_size(hidden)
    q, scales = quantize_rows_int8(array, group)
    base = table.name
    q_value = register_constant(graph, f"{base}/int8", q)
    s_value = register_constant(graph, f"{base}/scales", scales)
    rows_q = ir.node("Gather", [q_value, ids], {"axis": 0})
    rows_s = ir.node("Gather", [s_value, ids], {"axis": 0})
    to = ir.DataType.FLOAT16 if table.const_value.dtype == ir.DataType.FLOAT16 else ir.DataType.FLOAT
    cast_q = ir.node("Cast", [rows_q.outputs[0]], {"to": to})
    cast_s = ir.node("Cast", [rows_s.outputs[0]], {"to": to})
    values = ir.node("Mul", [cast_q.outputs[0], cast_s.outputs[0]])
    ids_shape = ir.node("Shape", [ids])
    width = register_constant(graph, f"{base}/width", np.array([hidden], dtype=np.int64))
    shape = ir.node("Concat", [ids_shape.outputs[0], width], {"axis": 0})
    out = ir.node("Reshape", [values.outputs[0], shape.outputs[0]], name=gather.name)
    graph.insert_before(gather, [rows_q, rows_s, cast_q, cast_s, values, ids_shape, shape, out])
    old = gather.outputs[0]
    out.outputs[0].type, out.outputs[0].shape = old.type, old.shape
    name = old.name
    ir.convenience.replace_all_uses_with(old, out.outputs[0], replace_graph_outputs=True)
    graph.remove(gather, safe=True)
    graph.initializers.pop(table.name)
    out.outputs[0].name = name
    error = max(float(np.abs(dequantize_rows(q[r0 : r0 + ROW_CHUNK], scales[r0 : r0 + ROW_CHUNK])
                             - array[r0 : r0 + ROW_CHUNK].astype(np.float32)).max()) for r0 in range(0, rows, ROW_CHUNK))
    return QuantizedEmbedding(base, rows, hidden, group, array.nbytes, q.nbytes + scales.nbytes, error)


class QuantizeEmbeddingsPass(ir.passes.InPlacePass):
    """Rewrite each large token-embedding Gather of the main graph as above; `quantized` lists what
    it did (QuantizedEmbedding) after a call."""

    def __init__(self):
        super().__init__()
        self.quantized: list[QuantizedEmbedding] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.quantized = [_rewrite(model.graph, node) for node in _embedding_gathers(model.graph)]
        return ir.passes.PassResult(model, modified=bool(self.quantized))


__all__ = ["QuantizeEmbeddingsPass", "QuantizedEmbedding", "dequantize_rows", "quantize_rows_int8"]
