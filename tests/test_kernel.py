"""The CPU kernel against the numpy reference (slim_onnx.layout) and the fallback function."""

import json
import os
import threading

import numpy as np
import onnxruntime as ort
import pytest
from helpers import KERNEL_SHAPES, random_weights, run_python

import slim_onnx
from slim_onnx import make_slim_matmul_model, reference_slim_matmul


def run(model, a, with_library=True, threads=2):
    so = slim_onnx.session_options() if with_library else ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(None, {"A": a})[0]


def assert_close(y, ref, dtype):
    """Relative to the output's scale: float32 sums differ from the float64 reference only by rounding."""
    y = y.astype(np.float64)
    scale = np.abs(ref).max() + 1e-6
    tol = 2e-3 if dtype == np.float16 else 2e-5
    assert np.abs(y - ref).max() / scale < tol, np.abs(y - ref).max() / scale


@pytest.mark.parametrize("lead,k,n", KERNEL_SHAPES)
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_kernel_matches_reference(rng, lead, k, n, sparse, accuracy_level):
    group = 32 if k > 32 else 1000  # also covers one group per column
    w = random_weights(rng, k, n, sparse=sparse, group_size=group, bias=k % 3 == 0)
    a = rng.standard_normal((*lead, k)).astype(np.float32)
    y = run(make_slim_matmul_model(w, accuracy_level=accuracy_level, batch_dims=len(lead)), a)
    assert y.shape == (*lead, n) and y.dtype == np.float32
    assert_close(y, reference_slim_matmul(a, w, accuracy_level).astype(np.float64), np.float32)


@pytest.mark.parametrize("adapter_format,rank", [("float16", 5), ("int4", 9), ("int4", 40)])
@pytest.mark.parametrize("accuracy_level", [0, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_adapters_bias_and_float16(rng, adapter_format, rank, accuracy_level, dtype):
    k, n = 72, 50
    w = random_weights(rng, k, n, group_size=32, adapter_format=adapter_format, rank=rank, bias=True)
    a = rng.standard_normal((3, 5, k)).astype(dtype)
    model = make_slim_matmul_model(w, dtype=dtype, accuracy_level=accuracy_level, batch_dims=2)
    y = run(model, a)
    assert y.dtype == dtype and y.shape == (3, 5, n)
    ref = reference_slim_matmul(a.astype(np.float32), w, accuracy_level).astype(np.float64)
    assert_close(y, ref, dtype)


@pytest.mark.parametrize("adapter_format", ["none", "float16", "int4"])
@pytest.mark.parametrize("sparse", [True, False])
def test_kernel_and_fallback_agree(rng, adapter_format, sparse):
    k, n = 44, 21
    w = random_weights(rng, k, n, sparse=sparse, group_size=16, adapter_format=adapter_format, rank=6, bias=sparse)
    a = rng.standard_normal((4, k)).astype(np.float32)
    model = make_slim_matmul_model(w, accuracy_level=0)
    kernel, fallback = run(model, a, True), run(model, a, False)
    np.testing.assert_allclose(kernel, fallback, rtol=1e-4, atol=1e-4 * np.abs(fallback).max())
    assert_close(fallback, reference_slim_matmul(a, w, 0).astype(np.float64), np.float32)


@pytest.mark.parametrize("adapter_format", ["none", "float16", "int4"])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("accuracy_level", [0, 4])
@pytest.mark.parametrize("rows", [1, 7])
def test_non_finite_activations_propagate_like_the_fallback(rng, adapter_format, sparse, accuracy_level, rows):
    """A NaN or an infinity in a row of A gives what float math gives (the fallback's dense MatMul, where
    inf * 0 is NaN), on the int8 path too; the other rows are untouched."""
    k, n = 72, 24
    w = random_weights(rng, k, n, sparse=sparse, group_size=32, adapter_format=adapter_format, rank=8, bias=True)
    a = rng.standard_normal((rows, k)).astype(np.float32)
    a[0, 9] = np.nan
    if rows > 1:
        a[rows // 2, 40] = -np.inf
        a[-1, :] = np.inf
    model = make_slim_matmul_model(w, accuracy_level=accuracy_level)
    kernel, fallback = run(model, a, True), run(model, a, False)
    assert np.isnan(kernel[0]).all()
    np.testing.assert_array_equal(np.isnan(kernel), np.isnan(fallback))
    np.testing.assert_array_equal(np.isposinf(kernel), np.isposinf(fallback))
    np.testing.assert_array_equal(np.isneginf(kernel), np.isneginf(fallback))
    finite_rows = np.isfinite(a).all(axis=1)
    assert finite_rows.sum() == max(rows - 3, 0)
    if finite_rows.any():
        assert_close(kernel[finite_rows], reference_slim_matmul(a, w, accuracy_level)[finite_rows].astype(np.float64), np.float32)


def swiglu_reference(a, w, accuracy_level):
    """silu(p[..., :N/2]) * p[..., N/2:] of the plain product p (float64 numpy)."""
    p = reference_slim_matmul(a, w, accuracy_level).astype(np.float64)
    gate, up = np.split(p, 2, axis=-1)
    return gate / (1 + np.exp(-gate)) * up


@pytest.mark.parametrize("adapter_format,rank", [("none", 0), ("float16", 5), ("int4", 12)])
@pytest.mark.parametrize("accuracy_level", [0, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("lead", [(1,), (3, 7)])
def test_swiglu_activation_matches_reference(rng, adapter_format, rank, accuracy_level, dtype, lead):
    """activation="swiglu": Y = silu(P[:, :N/2]) * P[:, N/2:] on both paths; 13 column tiles per
    half, which the 21-row case splits into 6 or 7 tasks of unequal size (kMinWorkPerTask); gates
    far outside [-10, 10]."""
    k, n = 200, 2 * 13 * 8
    w = random_weights(rng, k, n, group_size=16, adapter_format=adapter_format, rank=rank, bias=True)
    a = (rng.standard_normal((*lead, k)) * 10).astype(dtype)
    model = make_slim_matmul_model(w, dtype=dtype, accuracy_level=accuracy_level, batch_dims=len(lead), activation="swiglu")
    ref = swiglu_reference(a.astype(np.float32), w, accuracy_level)
    gate = reference_slim_matmul(a.astype(np.float32), w, accuracy_level)[..., : n // 2]
    assert gate.min() < -10 and gate.max() > 10
    y = run(model, a)
    assert y.dtype == dtype and y.shape == (*lead, n // 2)
    assert_close(y, ref, dtype)
    if accuracy_level == 0:  # the fallback has float activations only
        assert_close(run(model, a, with_library=False), ref, dtype)


def test_swiglu_needs_halves_of_whole_tiles(rng):
    w = random_weights(rng, 16, 24)  # halves of 12 columns: not whole tiles of 8
    with pytest.raises(Exception, match="activation='swiglu' needs N divisible by 16, got N=24"):
        run(make_slim_matmul_model(w, activation="swiglu"), np.ones((1, 16), np.float32))


def profiled_ops(model, a, with_library, tmp_path):
    so = slim_onnx.session_options() if with_library else ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    session.run(None, {"A": a})
    with open(session.end_profiling()) as f:
        events = json.load(f)
    return {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}


def test_profile_shows_which_path_ran(rng, tmp_path):
    w = random_weights(rng, 64, 16)
    model = make_slim_matmul_model(w)
    a = rng.standard_normal((2, 64)).astype(np.float32)
    assert profiled_ops(model, a, True, tmp_path) == {"SlimMatMul"}
    without = profiled_ops(model, a, False, tmp_path)
    assert "SlimMatMul" not in without and "MatMul" in without


def test_concurrent_runs_share_one_session(rng):
    w = random_weights(rng, 128, 64, adapter_format="int4", rank=16)
    so = slim_onnx.session_options()
    session = ort.InferenceSession(make_slim_matmul_model(w).SerializeToString(), so)
    inputs = [rng.standard_normal((1 + i % 5, 128)).astype(np.float32) for i in range(8)]
    expected = [session.run(None, {"A": a})[0] for a in inputs]
    results = {}

    def worker(i):
        for _ in range(20):
            y = session.run(None, {"A": inputs[i]})[0]
            if not np.array_equal(y, expected[i]):
                results[i] = "mismatch"
                return
        results[i] = "ok"

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results.values()) == {"ok"}


CAPPED_CHECK = """
import numpy as np, onnxruntime as ort, sys
from helpers import random_weights
import slim_onnx
assert slim_onnx.kernel_name() == {kernel!r}, slim_onnx.kernel_name()
rng = np.random.default_rng(7)
worst = 0.0
for k, n, m, sparse, fmt, lvl, act in [
        (20, 13, 3, True, "none", 0, "none"), (64, 40, 6, True, "int4", 4, "none"), (100, 17, 2, False, "float16", 0, "none"),
        (96, 24, 9, False, "int4", 4, "none"), (36, 8, 1, True, "none", 4, "none"), (200, 40, 4, True, "int4", 4, "none"),
        (64, 48, 5, True, "int4", 4, "swiglu"), (40, 32, 2, False, "none", 0, "swiglu")]:
    w = random_weights(rng, k, n, sparse=sparse, group_size=32, adapter_format=fmt, rank=7, bias=True)
    a = (rng.standard_normal((m, k)) * 4).astype(np.float32)
    a[0, k // 3] = np.nan  # NaN and Inf propagate as in float math, on every path
    a[-1, k // 2] = np.inf if m > 1 else a[-1, k // 2]
    model = slim_onnx.make_slim_matmul_model(w, accuracy_level=lvl, activation=act)
    s = ort.InferenceSession(model.SerializeToString(), slim_onnx.session_options())
    y = s.run(None, {{"A": a}})[0].astype(np.float64)
    ref = slim_onnx.reference_slim_matmul(a, w, lvl).astype(np.float64)
    if act == "swiglu":
        gate, up = np.split(ref, 2, axis=-1)
        with np.errstate(invalid="ignore", over="ignore"):
            ref = gate / (1 + np.exp(-gate)) * up
    assert np.array_equal(np.isnan(y), np.isnan(ref)) and np.array_equal(np.isinf(y), np.isinf(ref)), (k, n, m, fmt, lvl)
    assert np.isnan(y[0]).all(), "a NaN in a row makes all of that row's outputs NaN"
    finite = np.isfinite(ref)
    if finite.any():
        worst = max(worst, np.abs(y - ref)[finite].max() / np.abs(ref[finite]).max())
print(worst)
"""


def cpu_flags() -> set[str]:
    return set(open("/proc/cpuinfo").read().split())


@pytest.mark.parametrize("kernel", ["scalar", "avx2"])
def test_capped_kernels_match_reference(tmp_path, kernel):
    """SLIM_ONNX_KERNEL caps the choice: the portable kernels, and the AVX2 ones on an AVX-512 CPU."""
    if kernel == "avx2" and not {"avx2", "fma", "f16c"} <= cpu_flags():
        pytest.skip("this CPU has no AVX2")
    out = run_python(CAPPED_CHECK.format(kernel=kernel), env=dict(os.environ, SLIM_ONNX_KERNEL=kernel), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) < 2e-5


def test_best_kernels_are_chosen_on_this_machine():
    flags = cpu_flags()
    expected = "scalar"
    if {"avx2", "fma", "f16c"} <= flags:
        expected = "avx512" if {"avx512f", "avx512bw", "avx512_vnni"} <= flags else "avx2"
    assert slim_onnx.kernel_name() == expected


@pytest.mark.parametrize("activation,n_out", [("none", 32), ("swiglu", 16)])
def test_output_type_and_shape_are_inferred(rng, tmp_path, activation, n_out):
    """onnxruntime learns Y's type and shape from the op (A's type, A's shape with K replaced by N,
    or N/2 with the gated activation)."""
    from onnx import helper

    w = random_weights(rng, 64, 32)
    model = make_slim_matmul_model(w, dtype=np.float16, batch_dims=2, activation=activation)
    graph = model.graph
    graph.node[0].output[0] = "hidden"
    graph.node.append(helper.make_node("Relu", ["hidden"], ["Y"]))
    graph.output[0].type.tensor_type.ClearField("shape")
    so = slim_onnx.session_options()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(model.SerializeToString(), so)
    import onnx

    out = onnx.load(str(tmp_path / "optimized.onnx")).graph.output[0].type.tensor_type  # Relu passes it on
    assert out.elem_type == onnx.TensorProto.FLOAT16
    assert [d.dim_param or d.dim_value for d in out.shape.dim] == ["d0", "d1", n_out]


@pytest.mark.parametrize("sparse", [True, False])
def test_int8_sums_of_very_long_groups_do_not_overflow(sparse):
    # One scale group over K = 140000 with every weight at -8 and every activation at the int8
    # maximum: the int32 sum of a column reaches about 3.6e9 (16 q units) if nothing is flushed.
    from slim_onnx.packing import pack_quantized

    k, n = 140_000, 16
    q = np.full((k, n), -8, np.int8)
    if sparse:
        q.reshape(k // 4, 4, n)[:, 2:, :] = 0
    w = pack_quantized(q, np.full((1, n), 0.01, np.float16), k, sparse, None, "int4")
    a = np.ones((2, k), np.float32)
    a[1] = -a[1]
    y = run(make_slim_matmul_model(w, accuracy_level=4), a)
    ref = reference_slim_matmul(a, w, 4).astype(np.float64)
    assert_close(y, ref, np.float32)
    assert abs(ref[0, 0] - 0.01 * -8 * (k // 2 if sparse else k)) < 1e-3 * abs(ref[0, 0])


LOW_MEMORY_CHECK = """
import json
import numpy as np, onnxruntime as ort
import slim_onnx
from slim_onnx import make_slim_matmul_model, reference_slim_matmul
from slim_onnx.packing import pack_quantized

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

k, n = 4096, 8192
rng = np.random.default_rng(0)
q = rng.integers(-8, 8, size=(k, n)).astype(np.int8)
q.reshape(k // 4, 4, n)[:, 2:, :] = 0
w = pack_quantized(q, (rng.random((k // 128, n)) * 0.01 + 0.001).astype(np.float16), 128, True, None, "int4")
model = make_slim_matmul_model(w, accuracy_level=4).SerializeToString()
a = rng.standard_normal((3, k)).astype(np.float32)
ref = reference_slim_matmul(a, w, 4).astype(np.float64)
before = resident()
session = ort.InferenceSession(model, slim_onnx.session_options(low_memory=LOW), providers=["CPUExecutionProvider"])
grown = resident() - before
y = session.run(None, {"A": a})[0]
error = float(np.abs(y - ref).max() / np.abs(ref).max())
print(json.dumps({"grown": grown, "error": error, "packed": int(w.w.nbytes)}))
"""


@pytest.mark.skipif(tuple(int(p) for p in ort.__version__.split(".")[:2]) < (1, 24), reason="needs onnxruntime >= 1.24")
def test_low_memory_sessions_keep_one_copy_of_the_weights(tmp_path):
    results = {}
    for low in (False, True):  # each in its own process, so that its memory is its own
        out = run_python(LOW_MEMORY_CHECK.replace("LOW", str(low)), cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        results[low] = json.loads(out.stdout)
        assert results[low]["error"] < 2e-5
    extra = results[False]["grown"] - results[True]["grown"]
    if slim_onnx.kernel_name() == "avx512":  # the re-arranged copy: as many bytes as the packed weights
        assert extra > 0.8 * results[False]["packed"], results
    else:  # no kernel here makes a copy
        assert abs(extra) < 0.2 * results[False]["packed"], results


def test_low_memory_on_old_onnxruntime_names_the_fix(monkeypatch):
    monkeypatch.setattr(ort, "__version__", "1.22.0")
    with pytest.raises(ValueError, match="SLIM_ONNX_KERNEL=avx2"):
        slim_onnx.session_options(low_memory=True)
