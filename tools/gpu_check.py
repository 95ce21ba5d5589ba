"""One command for a GPU machine: the CUDA tests, then the CUDA benchmark.

    python tools/gpu_check.py [--no-bench] [--bench-args "--m 1 16"]

Needs the slim_onnx library built with nvcc (`pip install .` on a machine with the CUDA toolkit, or
the library copied next to slim_onnx/__init__.py) and torch with CUDA. If onnxruntime-gpu is not
importable and its wheel is in .gpu/ (whole, or split into parts `ortgpu.part*` to fit a transfer
limit), it is joined and installed with `pip install --no-deps --target` into a scratch folder put
first on PYTHONPATH, together with any other wheels in .gpu/py/ (e.g. pytest, onnx-ir).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def ort_has_cuda(env: dict) -> bool:
    probe = "import onnxruntime as o; print('CUDAExecutionProvider' in o.get_available_providers())"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    return out.stdout.strip() == "True"


def install_wheels(stage: Path, target: Path) -> None:
    wheels = sorted(stage.glob("*.whl")) + sorted((stage / "py").glob("*.whl"))
    parts = sorted(stage.glob("ortgpu.part*"))
    if parts:
        joined = target.parent / "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl"
        with open(joined, "wb") as out:
            for part in parts:
                out.write(part.read_bytes())
        wheels.append(joined)
    if not wheels:
        return
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), *map(str, wheels)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--bench-args", default="", help="extra arguments for tools/bench_op.py --device cuda")
    parser.add_argument("--stage", default=str(REPO / ".gpu"), help="folder with wheels to install if needed")
    parser.add_argument("--target", default="/tmp/slim_onnx_gpu_site")
    args = parser.parse_args()

    env = dict(os.environ)
    target = Path(args.target)
    env["PYTHONPATH"] = os.pathsep.join([str(target), str(REPO), env.get("PYTHONPATH", "")])
    if not ort_has_cuda(env):
        target.mkdir(parents=True, exist_ok=True)
        install_wheels(Path(args.stage), target)
    print("onnxruntime CUDA provider:", ort_has_cuda(env), flush=True)
    subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"], check=False)
    rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
                        cwd=REPO, env=env).returncode
    if not args.no_bench:
        bench = [sys.executable, "tools/bench_op.py", "--device", "cuda", *shlex.split(args.bench_args)]
        rc = subprocess.run(bench, cwd=REPO, env=env).returncode or rc
    return rc


if __name__ == "__main__":
    sys.exit(main())
