"""onnx-ir graph passes: finding linear layers and rewriting them into SlimMatMul (rewrite.py); then
the graph rewrite of manager.py: embedding tables quantized, attention and residual RMSNorms fused,
layers that share their input merged, SwiGLU folded into the merged gate/up layer, and the merged
q/k/v layer fed straight into the fused attention. Shared graph helpers: graph.py."""

from slim_onnx.passes.attention import FuseGroupQueryAttentionPass
from slim_onnx.passes.embedding import QuantizeEmbeddingsPass
from slim_onnx.passes.linear import LinearLayer, find_linear_layers
from slim_onnx.passes.manager import GraphRewrite, rewrite_graph
from slim_onnx.passes.norm import FuseSkipRmsNormPass
from slim_onnx.passes.packed_attention import PackAttentionInputsPass
from slim_onnx.passes.rewrite import AddFallbackFunctionsPass, ReplaceLinearLayersPass, compress_graph, run_passes
from slim_onnx.passes.siblings import MergeSiblingLayersPass
from slim_onnx.passes.swiglu import FuseSwiGluPass

__all__ = [
    "AddFallbackFunctionsPass",
    "FuseGroupQueryAttentionPass",
    "FuseSkipRmsNormPass",
    "FuseSwiGluPass",
    "GraphRewrite",
    "LinearLayer",
    "MergeSiblingLayersPass",
    "PackAttentionInputsPass",
    "QuantizeEmbeddingsPass",
    "ReplaceLinearLayersPass",
    "compress_graph",
    "find_linear_layers",
    "rewrite_graph",
    "run_passes",
]
