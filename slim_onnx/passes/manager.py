"""The graph rewrite after the layers are compressed, as one onnx-ir PassManager.

  QuantizeEmbeddingsPass        token-embedding tables as int8 rows            (embedding.py)
  FuseGroupQueryAttentionPass   cached attention -> GroupQueryAttention        (attention.py)
  FuseSkipRmsNormPass           residual Add + RMSNorm -> one com.microsoft op (norm.py)
  MergeSiblingLayersPass        SlimMatMuls reading one input -> one + a Split (siblings.py)
  FuseSwiGluPass                SwiGLU -> the merged gate/up node's activation (swiglu.py)
  PackAttentionInputsPass       merged q/k/v -> the attention's packed input   (packed_attention.py)
  ConvertToFloat16Pass          float16 activations end to end (target cuda)  (float16.py)
  then, once, the clean-up of rewrite.run_passes.

GraphOptions (config.py) switches each pass; each removes what it made dead, so that the next one
matches a clean graph. The order matters: the SwiGLU fold needs the merge's Split, and the packing
needs both the fused attention and the merged q/k/v.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from slim_onnx.config import GraphOptions
from slim_onnx.passes.attention import FuseGroupQueryAttentionPass
from slim_onnx.passes.embedding import QuantizedEmbedding, QuantizeEmbeddingsPass
from slim_onnx.passes.float16 import ConvertToFloat16Pass
from slim_onnx.passes.norm import FuseSkipRmsNormPass
from slim_onnx.passes.packed_attention import PackAttentionInputsPass
from slim_onnx.passes.rewrite import run_passes
from slim_onnx.passes.siblings import MergeSiblingLayersPass
from slim_onnx.passes.swiglu import FuseSwiGluPass


@dataclasses.dataclass
class GraphRewrite:
    """What the rewrite did, for the report."""

    embeddings: list[QuantizedEmbedding]
    attention_fused: int
    skip_norms_fused: int
    merged_siblings: list[list[str]]
    swiglu_fused: int
    attention_packed: int
    float16_values: int


def rewrite_graph(model: ir.Model, options: GraphOptions) -> GraphRewrite:
    """Apply the passes `options` switches on (see the module doc) to `model` in place."""
    embeddings, attention, norms = QuantizeEmbeddingsPass(), FuseGroupQueryAttentionPass(), FuseSkipRmsNormPass()
    siblings, swiglu, packing = MergeSiblingLayersPass(), FuseSwiGluPass(), PackAttentionInputsPass()
    float16 = ConvertToFloat16Pass()
    switched = [(options.quantize_embeddings, embeddings), (options.fuse_attention, attention),
                (options.fuse_norms, norms), (options.merge_siblings, siblings), (options.fuse_swiglu, swiglu),
                (options.pack_attention, packing), (options.target == "cuda", float16)]
    run_passes(model, [pass_ for on, pass_ in switched if on])
    return GraphRewrite(embeddings.quantized, attention.fused, norms.fused, siblings.merged, swiglu.fused,
                        packing.packed, float16.converted)


__all__ = ["GraphRewrite", "rewrite_graph"]
