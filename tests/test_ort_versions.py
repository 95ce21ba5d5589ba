"""The one kernel library loads and computes in the oldest and the newest supported onnxruntime."""

import os
import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest
from helpers import run_python

OLDEST, NEWEST = "1.20.1", "1.31.1"

CHECK = """
import sys
import numpy as np, onnxruntime as ort
from helpers import random_weights
import slim_onnx
assert ort.__version__ == {version!r}, ort.__version__
rng = np.random.default_rng(3)
def reference(a, w, level, act):
    p = slim_onnx.reference_slim_matmul(a.astype(np.float32), w, level).astype(np.float64)
    if act == "none":
        return p
    gate, up = np.split(p, 2, axis=-1)
    return gate / (1 + np.exp(-gate)) * up
for fmt, dtype, level, bias, act in [("none", np.float32, 4, True, "none"), ("float16", np.float16, 0, True, "none"),
                                     ("int4", np.float32, 0, False, "none"), ("int4", np.float32, 4, True, "swiglu")]:
    w = random_weights(rng, 96, 32, group_size=32, adapter_format=fmt, rank=8, bias=bias)
    model = slim_onnx.make_slim_matmul_model(w, dtype=dtype, accuracy_level=level, activation=act).SerializeToString()
    a = rng.standard_normal((5, 96)).astype(dtype)
    ref = reference(a, w, level, act)
    so = slim_onnx.session_options()
    so.enable_profiling = True
    so.profile_file_prefix = "profile"  # the subprocess runs in a temporary folder
    kernel = ort.InferenceSession(model, so)
    y = kernel.run(None, {{"A": a}})[0].astype(np.float64)
    assert '"op_name" : "SlimMatMul"' in open(kernel.end_profiling()).read().replace('":"', '" : "')
    fallback = ort.InferenceSession(model).run(None, {{"A": a}})[0].astype(np.float64)
    tol = 3e-3 if dtype == np.float16 else 1e-5
    assert np.abs(y - ref).max() / np.abs(ref).max() < tol, (fmt, "kernel")
    ref0 = reference(a, w, 0, act)
    assert np.abs(fallback - ref0).max() / np.abs(ref0).max() < tol, (fmt, "fallback")
print("ok", ort.__version__)
"""


def cache_dir() -> Path:
    base = os.environ.get("SLIM_ONNX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "slim-onnx"
    )
    return Path(base)


def onnxruntime_site(version: str) -> Path | None:
    """A folder holding onnxruntime==version (None: the current environment already has it)."""
    if onnxruntime.__version__ == version:
        return None
    site = cache_dir() / f"onnxruntime-{version}-py{sys.version_info.major}{sys.version_info.minor}"
    if not (site / "onnxruntime" / "__init__.py").is_file():
        tmp = site.with_name(site.name + ".tmp")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:", "--target", str(tmp),
             f"onnxruntime=={version}"],
            check=True,
        )
        tmp.rename(site)
    return site


def run_in_onnxruntime(version: str, check: str, cwd: Path) -> None:
    """Run `check` (formatted with version) in a subprocess that imports onnxruntime==version."""
    site = onnxruntime_site(version)
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    out = run_python(check.format(version=version), env=env, cwd=cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == f"ok {version}"


@pytest.mark.slow
@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_library_runs_in_onnxruntime(version, tmp_path):
    run_in_onnxruntime(version, CHECK, tmp_path)


ATTENTION_CHECK = """
import sys
import onnxruntime as ort
import helpers
assert ort.__version__ == {version!r}, ort.__version__
for packed in (False, True):
    assert helpers.attention_worst_error(with_library=True, packed=packed) < 1e-5
    assert helpers.attention_worst_error(with_library=False, packed=packed) < 1e-5
print("ok", ort.__version__)
"""


@pytest.mark.slow
@pytest.mark.parametrize("version", ["1.22.0", NEWEST])
def test_fused_attention_runs_in_onnxruntime(version, tmp_path):
    """The fused attention's kernel and its fallback (com.microsoft::GroupQueryAttention with
    attention_bias, which onnxruntime has since 1.22; compress does not fuse on older ones), plain
    and packed (the fallback adding Split and com.microsoft::RotaryEmbedding)."""
    run_in_onnxruntime(version, ATTENTION_CHECK, tmp_path)
