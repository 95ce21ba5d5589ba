"""The CUDA kernels driven from torch tensors, without onnxruntime-gpu (tests and benchmarks).

onnxruntime runs the same kernels through the op registered for CUDAExecutionProvider; this module
calls the library's C entry points (`SlimOnnxCuda*`) directly, on torch's current CUDA stream.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from slim_onnx.layout import SlimWeights
from slim_onnx.runtime import library_path

_ADAPTER_CODES = {"none": 0, "float16": 1, "int4": 2}
# Which code runs a product (slim::cuda::Path): "auto" picks by row count, "kernels" forces the fused
# kernels, "library" the float16 decode + cuBLAS GEMMs.
PATHS = {"auto": 0, "kernels": 1, "library": 2}
_INPUT_ORDER = ("W", "W_scales", "bias", "L", "L_scales", "R", "R_scales")


@functools.cache
def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(library_path())
    if not hasattr(lib, "SlimOnnxCudaCreate"):
        raise RuntimeError("this slim_onnx library was built without CUDA kernels (nvcc was not found at install time)")
    lib.SlimOnnxCudaCreate.restype = ctypes.c_void_p
    lib.SlimOnnxCudaCreate.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                       ctypes.c_char_p, ctypes.c_size_t]
    lib.SlimOnnxCudaScratchBytes.restype = ctypes.c_size_t
    lib.SlimOnnxCudaScratchBytes.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                             ctypes.c_char_p, ctypes.c_size_t]
    lib.SlimOnnxCudaRun.restype = ctypes.c_int
    lib.SlimOnnxCudaRun.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    lib.SlimOnnxCudaDestroy.argtypes = [ctypes.c_void_p]
    lib.SlimOnnxCudaFragments.restype = ctypes.c_int
    lib.SlimOnnxCudaFragments.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p),
                                          ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p, ctypes.c_void_p,
                                          ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    return lib


def built_with_cuda() -> bool:
    """Whether the installed library contains the CUDA kernels."""
    try:
        _library()
    except RuntimeError:
        return False
    return True


class _HostInputs:
    """The C entry points' view of SlimWeights: attrs {K, N, group_size, sparse, rank, adapter code,
    adapter_group_size} and host pointers to the weight inputs in the op's order (null = absent);
    the arrays stay referenced while this object lives."""

    def __init__(self, weights: SlimWeights):
        tensors = weights.input_tensors()
        self.arrays = [None if tensors[name] is None else np.ascontiguousarray(tensors[name]) for name in _INPUT_ORDER]
        self.pointers = (ctypes.c_void_p * len(self.arrays))(*[None if a is None else a.ctypes.data for a in self.arrays])
        self.attrs = (ctypes.c_int64 * 7)(weights.k, weights.n, weights.group_size, int(weights.sparse), weights.rank,
                                          _ADAPTER_CODES[weights.adapter_format], weights.adapter_group_size)


def fragment_layout(weights: SlimWeights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The main weight re-laid in the CUDA kernels' fragment order (docs/cuda.md), computed on the host:
    (values uint32 [NT, KS, 32, 4], metadata uint32 [NT, KS, 32, 2] (sparse) or empty, scale pairs
    uint32 [NT, groups, 8]). For tests of the layout; needs no GPU."""
    lib = _library()
    host = _HostInputs(weights)
    counts = (ctypes.c_int64 * 3)()
    error = ctypes.create_string_buffer(1024)

    def call(*outputs):
        if lib.SlimOnnxCudaFragments(host.attrs, host.pointers, counts, *outputs, error, len(error)):
            raise ValueError(error.value.decode())

    call(None, None, None)
    frag, meta, pairs = (np.zeros(int(c), dtype=np.uint32) for c in counts)
    call(frag.ctypes.data, meta.ctypes.data if meta.size else None, pairs.ctypes.data)
    nt = -(-weights.n // 16)
    ks = frag.size // (nt * 32 * 4)
    return frag.reshape(nt, ks, 32, 4), meta.reshape(nt, ks, 32, 2) if meta.size else meta, pairs.reshape(nt, -1, 8)


class CudaSlimMatMul:
    """One SlimMatMul node's weights on a CUDA device; call it on a torch float16/float32 tensor,
    optionally with the `path` (see PATHS) that runs it ("auto": as the op chooses)."""

    def __init__(self, weights: SlimWeights, device: int = 0):
        import torch

        self.k, self.n, self.device = weights.k, weights.n, device
        host = _HostInputs(weights)
        error = ctypes.create_string_buffer(1024)
        with torch.cuda.device(device):
            self._handle = _library().SlimOnnxCudaCreate(host.attrs, host.pointers, device, error, len(error))
        if not self._handle:
            raise ValueError(error.value.decode())

    def __call__(self, a, path: str = "auto"):
        import torch

        if path not in PATHS:
            raise ValueError(f"path must be one of {sorted(PATHS)}, got {path!r}")
        if a.dtype not in (torch.float16, torch.float32) or a.shape[-1] != self.k or not a.is_cuda:
            raise ValueError(f"expected a CUDA float16/float32 tensor [..., {self.k}], got {a.dtype} {tuple(a.shape)}")
        a = a.contiguous()
        m = a.numel() // self.k
        y = torch.empty((*a.shape[:-1], self.n), dtype=a.dtype, device=a.device)
        half = int(a.dtype == torch.float16)
        error = ctypes.create_string_buffer(1024)
        scratch_bytes = _library().SlimOnnxCudaScratchBytes(self._handle, m, half, PATHS[path], error, len(error))
        if scratch_bytes == ctypes.c_size_t(-1).value:
            raise RuntimeError(error.value.decode())
        scratch = torch.empty(max(scratch_bytes, 1), dtype=torch.uint8, device=a.device)
        stream = torch.cuda.current_stream(a.device).cuda_stream
        rc = _library().SlimOnnxCudaRun(self._handle, a.data_ptr(), half, m, y.data_ptr(), scratch.data_ptr(), stream,
                                        PATHS[path], error, len(error))
        if rc != 0:
            raise RuntimeError(error.value.decode())
        return y

    def __del__(self):
        if getattr(self, "_handle", None):
            _library().SlimOnnxCudaDestroy(self._handle)
            self._handle = None
