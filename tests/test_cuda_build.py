"""The CUDA kernels are compiled whenever the build had nvcc: CI has nvcc but no GPU, so this is what
keeps the CUDA sources compiling there. (Every CPU test runs on that same CUDA-enabled library.)"""

import os
import shutil

import pytest

from slim_onnx.cuda_kernels import built_with_cuda


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH, so the build skips the CUDA kernels")
@pytest.mark.skipif(os.environ.get("SLIM_ONNX_CUDA", "").upper() == "OFF", reason="SLIM_ONNX_CUDA=OFF")
def test_library_contains_the_cuda_kernels():
    assert built_with_cuda()

