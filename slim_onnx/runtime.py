"""Finding the custom-op library and registering it in onnxruntime."""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
from pathlib import Path

import onnxruntime as ort

_LIBRARY_NAMES = ("libslim_onnx_ops.so", "libslim_onnx_ops.dylib", "slim_onnx_ops.dll")


class LibraryNotFoundError(RuntimeError):
    """The compiled SlimMatMul library is not where the package expects it."""


def library_path() -> str:
    """Path of the compiled SlimMatMul kernel library ($SLIM_ONNX_LIBRARY overrides it)."""
    override = os.environ.get("SLIM_ONNX_LIBRARY")
    if override:
        if not Path(override).is_file():
            raise LibraryNotFoundError(f"SLIM_ONNX_LIBRARY={override} is not a file")
        return override
    here = Path(__file__).resolve().parent
    for name in _LIBRARY_NAMES:
        candidate = here / name
        if candidate.is_file():
            return str(candidate)
    # Imported from a source checkout: use the library of the installed distribution, if any.
    try:
        for file in importlib.metadata.files("slim-onnx") or ():
            if file.name in _LIBRARY_NAMES:
                return str(file.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    raise LibraryNotFoundError(
        f"the slim_onnx kernel library is not built next to {here}. Install the package "
        "(`pip install .` in the repository builds it), or set SLIM_ONNX_LIBRARY to its path."
    )


def session_options(so: ort.SessionOptions | None = None, *, low_memory: bool = False) -> ort.SessionOptions:
    """SessionOptions with the SlimMatMul kernels registered (a new object, or `so` updated).

    On CPUs with AVX-512 VNNI the int8 kernels read their own copy of each weight, re-arranged at
    session creation, which holds as many bytes again as the packed weights. `low_memory=True` keeps
    one copy and runs the AVX2 kernels instead (slower decode); it needs onnxruntime >= 1.24, whose
    kernels can read session config entries.
    """
    so = so if so is not None else ort.SessionOptions()
    if low_memory:
        version = tuple(int(part) for part in ort.__version__.split(".")[:2])
        if version < (1, 24):
            raise ValueError(
                f"low_memory needs onnxruntime >= 1.24 (this is {ort.__version__}); with an older one, "
                "set SLIM_ONNX_KERNEL=avx2 in the environment before the library loads"
            )
        so.add_session_config_entry("slim_onnx.low_memory", "1")
    so.register_custom_ops_library(library_path())
    return so


def kernel_name() -> str:
    """Which CPU kernel set the library runs on this machine: "avx512", "avx2" or "scalar"."""
    lib = ctypes.CDLL(library_path())
    lib.SlimOnnxKernelName.restype = ctypes.c_char_p
    return lib.SlimOnnxKernelName().decode()
