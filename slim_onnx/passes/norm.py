"""Fusing each residual Add and the RMSNorm that reads it into com.microsoft::SkipSimplifiedLayerNormalization.

Why: onnxruntime fuses an export's RMSNorm into SimplifiedLayerNormalization by itself, but leaves
the residual Add before it: per decoder layer two extra nodes at one token per step, each a pass over
the hidden state. The fused op (stock onnxruntime) adds and normalises in one pass and also returns
the sum for the next residual.

Matched (float32, as Optimum exports Llama-family RMSNorm):

  h = Add(a, b)
  c = Cast(h, float) | h                                                    (others may read c as h')
  y = Mul(c, Div(1, Sqrt(Add(ReduceMean(Pow(c, 2), axes=[-1]), eps))))     (either operand order)
  out = Mul(Cast(y, float) | y, gamma)                                      gamma: float32 [hidden]
becomes
  out, _, _, h' = SkipSimplifiedLayerNormalization(a, b, gamma, epsilon=eps),   h' replacing h elsewhere
"""

from __future__ import annotations

import onnx_ir as ir

from slim_onnx.passes.graph import (
    const_ints,
    const_scalar,
    constant_source,
    only_reader,
    readers,
    remove_dead_producers,
    take_over_values,
)


def _float_cast(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "Cast" and node.attributes.get_int("to", 0) == ir.DataType.FLOAT


def _rms_norm(h: ir.Value) -> tuple[ir.Node, float, ir.Value, ir.Value] | None:
    """(the norm's last Mul, eps, gamma, c) when the RMSNorm above reads h (and only it reads its
    inner values; c, the float32 Cast of h, may have other readers: exports read the residual there)."""
    casts = [n for n in readers(h, "Cast") if _float_cast(n)]
    for c in [h] + [n.outputs[0] for n in casts]:
        for pow_node in readers(c, "Pow"):
            if const_scalar(pow_node.inputs[1]) != 2:
                continue
            mean = only_reader(pow_node.outputs[0], "ReduceMean")
            if mean is None or len(mean.inputs) < 2 or const_ints(mean.inputs[1]) != [-1] or not mean.attributes.get_int("keepdims", 1):
                continue
            add = only_reader(mean.outputs[0], "Add")
            eps = const_scalar(add.inputs[1]) if add is not None else None
            sqrt = only_reader(add.outputs[0], "Sqrt") if eps is not None else None
            div = only_reader(sqrt.outputs[0], "Div") if sqrt is not None else None
            if div is None or div.inputs[1] is not sqrt.outputs[0] or const_scalar(div.inputs[0]) != 1:
                continue
            scale = only_reader(div.outputs[0], "Mul")
            if scale is None or c not in scale.inputs:
                continue
            y = scale.outputs[0]
            cast = only_reader(y, "Cast")
            if cast is not None:
                if not _float_cast(cast):
                    continue
                y = cast.outputs[0]
            last = only_reader(y, "Mul")
            gamma = next((v for v in last.inputs if v is not y), None) if last is not None else None
            gamma = constant_source(gamma)  # exporters alias equal tensors (all-ones gammas) through Identity
            tensor = gamma.const_value if gamma is not None else None
            if tensor is None or tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 1:
                continue
            return last, eps, gamma, c
    return None


class FuseSkipRmsNormPass(ir.passes.InPlacePass):
    """Fuse residual Add + RMSNorm pairs of the main graph (see module doc), removing the old nodes;
    `fused` counts them after a call."""

    def __init__(self):
        super().__init__()
        self.fused = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.fused = 0
        for add in [n for n in graph if n.op_type == "Add" and n.domain == ""]:
            h = add.outputs[0]
            found = _rms_norm(h) if len(add.inputs) == 2 and not h.is_graph_output() else None
            if found is None or any(constant_source(v) is not None for v in add.inputs):
                continue
            last, eps, gamma, c = found
            skip = ir.node("SkipSimplifiedLayerNormalization", [add.inputs[0], add.inputs[1], gamma],
                           {"epsilon": float(eps)}, domain="com.microsoft", num_outputs=4, name=f"{add.name}/SkipRmsNorm")
            graph.insert_before(last, skip)
            out, total = skip.outputs[0], skip.outputs[3]
            if c is not h:  # a Cast to float32 of a float32 sum (gamma is float32): the same values
                c.replace_all_uses_with(h)
            take_over_values(graph, [(last.outputs[0], out), (h, total)])
            remove_dead_producers(graph, [last.outputs[0], c, h])
            self.fused += 1
        if self.fused:
            model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, modified=bool(self.fused))


__all__ = ["FuseSkipRmsNormPass"]
