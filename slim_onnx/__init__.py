"""slim-onnx: SLiM compression (4-bit, 2:4 sparse, low-rank adapters) for ONNX models.

`import slim_onnx` loads only the runtime (onnxruntime and the kernel library's path), so that a
deployment that calls `slim_onnx.session_options()` never imports torch or the compressor; every
other name is imported on first use.
"""

import importlib

from slim_onnx.runtime import kernel_name, library_path, session_options

__version__ = "0.1.0"

# name -> the module that defines it
_LAZY = {
    "QuantizedLayer": "slim_onnx.algorithms.layer",
    "compress_layer": "slim_onnx.algorithms.layer",
    "LayerStatistics": "slim_onnx.algorithms.stats",
    "SlimConfig": "slim_onnx.config",
    "Budget": "slim_onnx.budget",
    "SlimWeights": "slim_onnx.layout",
    "reference_slim_matmul": "slim_onnx.layout",
    "pack_layer": "slim_onnx.packing",
    "pack_quantized": "slim_onnx.packing",
    "pack_weight": "slim_onnx.packing",
    "compress": "slim_onnx.pipeline",
    "make_slim_matmul_model": "slim_onnx.node_builder",
    "make_slim_matmul_node": "slim_onnx.node_builder",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'slim_onnx' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = ["kernel_name", "library_path", "session_options", *_LAZY]
