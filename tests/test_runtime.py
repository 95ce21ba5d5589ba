"""The deployment path: `slim_onnx.session_options()` loads onnxruntime and our library, nothing else."""

import subprocess
import sys

import slim_onnx


def test_session_options_import_neither_torch_nor_the_compressor():
    code = (
        "import sys, slim_onnx; slim_onnx.session_options(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnx_ir') "
        "or m.startswith('slim_onnx.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['slim_onnx.runtime']"


def test_every_public_name_resolves():
    for name in slim_onnx.__all__:
        assert getattr(slim_onnx, name) is not None
    assert set(dir(slim_onnx)) == set(slim_onnx.__all__)
