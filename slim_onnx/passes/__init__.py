"""onnx-ir graph passes: finding linear layers and rewriting them into SlimMatMul; fusing attention;
quantizing embedding tables."""

from slim_onnx.passes.attention import FuseGroupQueryAttentionPass, fuse_attention
from slim_onnx.passes.embedding import QuantizeEmbeddingsPass, quantize_embeddings
from slim_onnx.passes.linear import LinearLayer, find_linear_layers
from slim_onnx.passes.rewrite import AddFallbackFunctionsPass, ReplaceLinearLayersPass, compress_graph

__all__ = [
    "AddFallbackFunctionsPass",
    "FuseGroupQueryAttentionPass",
    "LinearLayer",
    "QuantizeEmbeddingsPass",
    "ReplaceLinearLayersPass",
    "compress_graph",
    "find_linear_layers",
    "fuse_attention",
    "quantize_embeddings",
]
