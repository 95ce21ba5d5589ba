"""tools/gpu_check.py --dry-run: every phase of the GPU machine's one command (install, pytest,
bench_op, model build, model benchmark) runs on the CPU provider at tiny sizes and reports into one
JSON, so that the command is known to work before a GPU machine's minutes are spent on it."""

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_model", ROOT / "tools" / "bench_model.py")
bench_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_model)
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)  # its dataclasses look it up
_spec.loader.exec_module(gpu_check)


def _wheel(folder: Path, file_name: str = "slim_dry_probe-0.1-py3-none-any.whl", module: str = "slim_dry_probe") -> Path:
    """A minimal pure-Python wheel holding one module."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name
    name, version = file_name.split("-")[:2]
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{module}.py", "VALUE = 7\n" + "# padding\n" * 2000)  # several parts below
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return path


@pytest.mark.slow
def test_dry_run(tmp_path):
    out, target, stage = tmp_path / "out", tmp_path / "site", tmp_path / "stage"
    _wheel(stage / "py")
    # onnxruntime-gpu's stand-in, split as --prepare splits the real one (a module of its own: it must
    # not shadow the onnxruntime the dry run imports)
    parted = "slim_parts_probe-0.2-py3-none-any.whl"
    parts = gpu_check.split_parts(_wheel(stage, parted, "slim_parts_probe"), stage, 1000)
    assert len(parts) > 1 and not (stage / parted).exists()
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run", "--out", str(out),
                           "--stage", str(stage), "--target", str(target), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=300, check=False)
    report = json.loads((out / "gpu_check.json").read_text())
    assert done.returncode == 0 and report["passed"], done.stdout[-5000:] + done.stderr[-3000:]
    assert report["dry_run"] and report["seconds"] < report["budget_s"]
    assert report["install"]["installed"] == ["slim_dry_probe-0.1-py3-none-any.whl", parted]
    assert (target / "slim_dry_probe.py").exists() and (target / "slim_parts_probe.py").exists()
    assert report["pytest"]["results"]["failures"] == 0

    assert "Slim acc4" in report["bench_op"]["results"]["ms"]["1"]
    built = report["models"]["results"]["models"]
    assert report["models"]["results"]["complete"] and set(built) == {"tiny-gqa", "tiny-smollm2"}
    for name, variants in built.items():
        assert set(variants) == {"dense", "nbits", "slim", "slim_adapters"}
        bench = report[f"bench_model_{name}"]
        assert bench["passed"] and bench["seconds"] <= bench["limit_s"]
        results = bench["results"]
        assert results["provider"] == "CPUExecutionProvider"
        assert list(results["variants"]) == list(bench_model.CUDA_VARIANTS)
        for variant in results["variants"].values():
            assert variant["placements"]["CPUExecutionProvider"]["nodes"] > 0
            for batch in ("1", "2"):
                assert variant["speeds"][batch]["prefill_tok_s"] > 0 and variant["speeds"][batch]["decode_tok_s"] > 0
        assert set(results["ratios"]["SlimMatMul / MatMulNBits"]["1"]) == {"prefill", "decode"}
    log = (out / "gpu_check.log").read_text()
    assert "== bench_op: passed" in log and "K=256 N=256" in log


def test_node_placements_from_a_verbose_log():
    prefix = "2026-01-01 00:00:00.0 [V:onnxruntime:, session_state.cc:1581 VerifyEachNodeIsAssignedToAnEp]"
    log = "\n".join([
        f"{prefix} Node placements",
        f"{prefix}  Node(s) placed on [CUDAExecutionProvider]. Number of nodes: 40",
        f"{prefix}   MatMul (/model/layers.0/mlp/up_proj/MatMul)",
        f"{prefix}  Node(s) placed on [CPUExecutionProvider]. Number of nodes: 3",
        f"{prefix}   Shape (/model/mask/Shape)",
        f"{prefix}   Gather (/model/mask/Gather)",
        f"{prefix}   Shape (/model/mask/Shape_1)",
        ("2026-01-01 00:00:00.0 [W:onnxruntime:, session_state.cc:1591 VerifyEachNodeIsAssignedToAnEp] Some nodes "
         "were not assigned to the preferred execution providers"),
    ])
    placements = bench_model.node_placements(log)
    assert placements["CUDAExecutionProvider"]["nodes"] == 40
    assert placements["CPUExecutionProvider"] == {"nodes": 3, "ops": {"Shape": 2, "Gather": 1}}
    assert bench_model.node_placements(f"{prefix}  All nodes placed on [CUDAExecutionProvider]. Number of nodes: 9") == {
        "CUDAExecutionProvider": {"nodes": 9, "ops": {}}}
