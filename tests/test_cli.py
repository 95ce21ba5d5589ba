"""The README's first command: `slim-onnx demo` runs the whole user path on an embedded default."""

import json
import subprocess
import sys


def test_demo_trains_exports_compresses_and_evaluates(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "slim_onnx.cli", "demo", "--steps", "40", "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for step in ("1. built", "2. exported with Optimum", "3. compressed", "4. held-out prose", "5. greedy generation"):
        assert step in text, text
    assert "result: OK" in text
    report = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    assert report["compress"]["layers"] == 4 * 7 + 1  # q k v o gate up down per block, and the tied lm_head
    assert report["compress"]["bytes_packed"] < 0.3 * report["compress"]["bytes_float16"]
    # the compressed model still predicts text: far better than uniform over the 512-token vocabulary
    assert report["kernel"]["perplexity"] < 0.5 * 512
    assert (tmp_path / "demo" / "slim" / "model.onnx").is_file()
