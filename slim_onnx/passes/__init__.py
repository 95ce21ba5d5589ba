"""onnx-ir graph passes: finding linear layers and rewriting them into SlimMatMul; fusing attention
and residual RMSNorms;
quantizing embedding tables; merging layers that share their input; folding SwiGLU into the merged
gate/up layer, and the merged q/k/v layer straight into the fused attention."""

from slim_onnx.passes.attention import FuseGroupQueryAttentionPass, fuse_attention
from slim_onnx.passes.embedding import QuantizeEmbeddingsPass, quantize_embeddings
from slim_onnx.passes.linear import LinearLayer, find_linear_layers
from slim_onnx.passes.norm import FuseSkipRmsNormPass, fuse_skip_rms_norm
from slim_onnx.passes.packed_attention import PackAttentionInputsPass, pack_attention_inputs
from slim_onnx.passes.rewrite import AddFallbackFunctionsPass, ReplaceLinearLayersPass, compress_graph
from slim_onnx.passes.siblings import MergeSiblingLayersPass, merge_sibling_layers
from slim_onnx.passes.swiglu import FuseSwiGluPass, fuse_swiglu

__all__ = [
    "AddFallbackFunctionsPass",
    "FuseGroupQueryAttentionPass",
    "FuseSkipRmsNormPass",
    "FuseSwiGluPass",
    "LinearLayer",
    "MergeSiblingLayersPass",
    "PackAttentionInputsPass",
    "QuantizeEmbeddingsPass",
    "ReplaceLinearLayersPass",
    "compress_graph",
    "find_linear_layers",
    "fuse_attention",
    "fuse_skip_rms_norm",
    "fuse_swiglu",
    "merge_sibling_layers",
    "pack_attention_inputs",
    "quantize_embeddings",
]
