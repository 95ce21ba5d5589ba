"""onnx-ir graph passes: finding linear layers and rewriting them into SlimMatMul."""

from slim_onnx.passes.linear import LinearLayer, find_linear_layers
from slim_onnx.passes.rewrite import AddFallbackFunctionsPass, ReplaceLinearLayersPass, compress_graph

__all__ = ["AddFallbackFunctionsPass", "LinearLayer", "ReplaceLinearLayersPass", "compress_graph", "find_linear_layers"]
