"""tools/fuzz_ops.py for a fixed seed and 40 s: no mutated SlimMatMul or GroupQueryAttention
model may crash the library built with AddressSanitizer and UBSan, or make it touch memory out of
bounds (onnxruntime errors are fine). The harness builds that library in build/sanitize first (about
15 s on two cores, then cached); a failure lists the findings, saved with their models and reports."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLCHAIN_MISSING = 77  # the harness's exit status when the compiler cannot build with sanitizers


@pytest.mark.slow
def test_fuzzed_models_are_rejected_never_crash(tmp_path):
    command = [sys.executable, str(ROOT / "tools" / "fuzz_ops.py"), "--seed", "0", "--seconds", "40",
               "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode == TOOLCHAIN_MISSING:
        pytest.skip(result.stdout.strip())
    findings = [line for line in result.stdout.splitlines() if line.startswith(("FINDING", "    "))]
    assert result.returncode == 0, (
        f"the fuzz harness failed (exit status {result.returncode}); findings saved under {tmp_path}:\n"
        + "\n".join(findings or [result.stdout[-3000:], result.stderr[-3000:]]))
    ran = re.search(r"^(\d+) cases in", result.stdout, re.M)
    assert ran is not None and int(ran.group(1)) >= 1000, result.stdout[-2000:]  # it really fuzzed
