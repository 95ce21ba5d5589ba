"""The README's first command: `slim-onnx demo` runs the whole embedded check."""

import subprocess
import sys


def test_demo_reports_size_agreement_and_speed(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "slim_onnx.cli", "demo", "--size", "256", "--layers", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "SlimMatMul" in text and "smaller than float16" in text
    assert "kernel vs fallback" in text and "result: OK" in text
    # the compressed weights of a 256 x 256 layer: 3.1 bits/weight + adapters, far below float16
    ratio = float(text.split("x smaller than float16")[0].rsplit("(", 1)[-1].split(",")[-1].split()[-1].rstrip("x"))
    assert ratio > 2.5
