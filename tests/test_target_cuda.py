"""`compress --target cuda`: a graph onnxruntime's CUDA provider runs whole, checked on the CPU:
no op that has only a CPU kernel, float16 activations end to end with the rotary angles float32,
and the same outputs as the float32 compression within float16 rounding."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import tiny_llama_export

import slim_onnx
from slim_onnx.config import ConfigError, GraphOptions
from slim_onnx.schema import DOMAIN

# the non-standard ops a CUDA graph may hold: each has a CUDA kernel (SlimMatMul: ours)
CUDA_CAPABLE = {(DOMAIN, "SlimMatMul"), ("com.microsoft", "SkipSimplifiedLayerNormalization"),
                ("com.microsoft", "RotaryEmbedding"), ("com.microsoft", "GroupQueryAttention")}
FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(the float32 compression, the --target cuda one) of one tiny Llama, same calibration."""
    root = tiny_llama_export(tmp_path_factory.mktemp("target_cuda"), initializer_range=0.2)
    outs = []
    for name, extra in (("cpu", []), ("cuda", ["--target", "cuda"])):
        out = root / name
        res = subprocess.run([sys.executable, "-m", "slim_onnx.cli", "compress", str(root / "onnx"), str(out), "--calib",
                              str(root / "calib.txt"), "--calib-samples", "8", "--seqlen", "64", "--accuracy-level", "0",
                              "--no-fuse-attention", "-q", *extra], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        outs.append(out)
    return outs


def test_cuda_graph_has_only_cuda_ops_and_float16_activations(models):
    _, cuda = models
    model = onnx.load(str(cuda / "model.onnx"))
    graph = model.graph
    custom = {(n.domain, n.op_type) for n in graph.node if n.domain not in ("", "ai.onnx")}
    assert custom <= CUDA_CAPABLE and (DOMAIN, "SlimMatMul") in custom
    for value in (*graph.input, *graph.output):
        assert value.type.tensor_type.elem_type != FLOAT, value.name
    assert {v.type.tensor_type.elem_type for v in graph.input if v.name.startswith("past")} == {FLOAT16}
    readers = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, i))
    rotary = {n.name for n in graph.node if n.name.startswith("/model/rotary_emb/")}
    for init in graph.initializer:
        if init.data_type == FLOAT:  # only SlimMatMul's biases and the rotary angles' constants stay float32
            assert all((n.op_type == "SlimMatMul" and i == 3) or n.name in rotary for n, i in readers[init.name]), init.name
    # the rotary angles stay float32 (float16 holds position 99 times 1/1 to within 0.03 rad only):
    # every Cast upstream of Cos and Sin makes float32, and their outputs are cast to float16
    producers = {out: n for n in graph.node for out in n.output}
    angles = [n for n in graph.node if n.op_type in ("Cos", "Sin")]
    stack, upstream = [n for n in angles], []
    while stack:
        node = stack.pop()
        upstream.append(node)
        stack.extend(producers[x] for x in node.input if x in producers)
    assert angles and all(n.attribute[0].i == FLOAT for n in upstream if n.op_type == "Cast")
    assert all(r.op_type == "Cast" and r.attribute[0].i == FLOAT16 for n in angles for r, _ in readers[n.output[0]])
    report = json.loads((cuda / "slim_report.json").read_text())
    assert report["graph"]["target"] == "cuda" and report["float16_values"] > 0


def test_cuda_graph_computes_the_float32_compression_in_float16(models):
    """Logits over a 99-token prompt and then one cached step agree with the float32 compression's
    within float16 rounding, with our library and without it (the fallback functions)."""
    cpu, cuda = models
    ids = np.random.default_rng(0).integers(3, 250, size=(2, 100))

    def run(folder, dtype, library):
        session = ort.InferenceSession(str(folder / "model.onnx"), slim_onnx.session_options() if library else ort.SessionOptions())
        past = {i.name: np.zeros((2, i.shape[1], 0, i.shape[3]), dtype) for i in session.get_inputs() if i.name.startswith("past")}
        names = [o.name for o in session.get_outputs()]
        first = dict(zip(names, session.run(None, {"input_ids": ids[:, :99], "attention_mask": np.ones((2, 99), np.int64),
                                                    "position_ids": np.tile(np.arange(99), (2, 1)), **past})))
        cache = {n.replace("present", "past_key_values"): v for n, v in first.items() if n.startswith("present")}
        step = session.run(["logits"], {"input_ids": ids[:, 99:], "attention_mask": np.ones((2, 100), np.int64),
                                        "position_ids": np.full((2, 1), 99), **cache})[0]
        return first["logits"], step

    want = run(cpu, np.float32, True)
    for library in (True, False):
        got = run(cuda, np.float16, library)
        for g, w in zip(got, want):
            assert g.dtype == np.float16 and g.shape == w.shape
            assert np.abs(g.astype(np.float32) - w).max() < 1e-2 * np.ptp(w), library


def test_graph_options_for_cuda_leave_out_our_cpu_attention():
    with pytest.raises(ConfigError, match="runs on the CPU only"):
        GraphOptions(target="cuda")
    options = GraphOptions.for_target("cuda", accuracy_level=0)
    assert options.target == "cuda" and not options.fuse_attention and not options.pack_attention and options.merge_siblings
    with pytest.raises(ConfigError, match="expected one of"):
        GraphOptions(target="tpu")


def test_a_float16_export_keeps_its_own_float32_parts(models, tmp_path):
    """An export made in float16 already is what --target cuda writes: its float32 islands (the
    exporter's upcasts around norms and softmax) are left as they are, and the model runs."""
    from optimum.exporters.onnx import main_export

    root = models[0].parent
    main_export(str(root / "hf"), str(tmp_path / "fp16"), task="text-generation-with-past", dtype="fp16", device="cpu")
    out = tmp_path / "slim"
    res = subprocess.run([sys.executable, "-m", "slim_onnx.cli", "compress", str(tmp_path / "fp16"), str(out), "--calib",
                          str(root / "calib.txt"), "--calib-samples", "4", "--seqlen", "32", "--target", "cuda", "-q"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr

    def float32_casts(path):
        return sum(n.op_type == "Cast" and n.attribute[0].i == FLOAT for n in onnx.load(str(path)).graph.node)

    assert float32_casts(out / "model.onnx") == float32_casts(tmp_path / "fp16" / "model.onnx") > 0
    assert json.loads((out / "slim_report.json").read_text())["float16_values"] == 0
    session = ort.InferenceSession(str(out / "model.onnx"), slim_onnx.session_options())
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float16) for i in session.get_inputs() if i.name.startswith("past")}
    ids = np.arange(3, 13)[None]
    logits = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                      "position_ids": np.arange(10)[None], **past})[0]
    assert logits.dtype == np.float16 and np.isfinite(logits).all()
