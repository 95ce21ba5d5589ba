"""slim-onnx: SLiM compression (4-bit, 2:4 sparse, low-rank adapters) for ONNX models."""

from slim_onnx.algorithms.layer import CompressedLayer, compress_layer
from slim_onnx.algorithms.stats import LayerStatistics
from slim_onnx.config import SlimConfig
from slim_onnx.format import SlimWeights, reference_slim_matmul
from slim_onnx.packing import pack_quantized, pack_weight
from slim_onnx.pipeline import compress
from slim_onnx.op import make_slim_matmul_model, make_slim_matmul_node
from slim_onnx.runtime import kernel_name, library_path, session_options

__version__ = "0.1.0"

__all__ = [
    "CompressedLayer",
    "LayerStatistics",
    "SlimConfig",
    "compress",
    "compress_layer",
    "SlimWeights",
    "kernel_name",
    "library_path",
    "make_slim_matmul_model",
    "make_slim_matmul_node",
    "pack_quantized",
    "pack_weight",
    "reference_slim_matmul",
    "session_options",
]
