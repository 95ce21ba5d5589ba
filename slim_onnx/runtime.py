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


def session_options(so: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """SessionOptions with the SlimMatMul kernels registered (a new object, or `so` updated)."""
    so = so if so is not None else ort.SessionOptions()
    so.register_custom_ops_library(library_path())
    return so


def kernel_name() -> str:
    """Which CPU kernel set the library runs on this machine: "avx2" or "scalar"."""
    lib = ctypes.CDLL(library_path())
    lib.SlimOnnxKernelName.restype = ctypes.c_char_p
    return lib.SlimOnnxKernelName().decode()
