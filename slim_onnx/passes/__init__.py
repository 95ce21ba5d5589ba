"""onnx-ir graph passes: finding linear layers and rewriting them into SlimMatMul; fusing attention;
quantizing embedding tables; merging layers that share their input."""

from slim_onnx.passes.attention import FuseGroupQueryAttentionPass, fuse_attention
from slim_onnx.passes.embedding import QuantizeEmbeddingsPass, quantize_embeddings
from slim_onnx.passes.linear import LinearLayer, find_linear_layers
from slim_onnx.passes.rewrite import AddFallbackFunctionsPass, ReplaceLinearLayersPass, compress_graph
from slim_onnx.passes.siblings import MergeSiblingLayersPass, merge_sibling_layers

__all__ = [
    "AddFallbackFunctionsPass",
    "FuseGroupQueryAttentionPass",
    "LinearLayer",
    "MergeSiblingLayersPass",
    "QuantizeEmbeddingsPass",
    "ReplaceLinearLayersPass",
    "compress_graph",
    "find_linear_layers",
    "fuse_attention",
    "merge_sibling_layers",
    "quantize_embeddings",
]
