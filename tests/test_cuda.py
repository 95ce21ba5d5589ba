"""The CUDA kernels against the numpy reference, and the op on onnxruntime's CUDAExecutionProvider.

Needs a CUDA GPU (and, for the onnxruntime cases, onnxruntime-gpu); skipped otherwise. One command
runs them on a GPU machine: `python tools/gpu_check.py` (see docs/cuda.md).
"""

import json

import numpy as np
import onnxruntime as ort
import pytest
from helpers import KERNEL_SHAPES, random_weights

import slim_onnx
from slim_onnx import make_slim_matmul_model, reference_slim_matmul
from slim_onnx.config import GraphOptions
from slim_onnx.cuda_kernels import CudaSlimMatMul, built_with_cuda

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)
if not built_with_cuda():
    pytest.skip("the installed slim_onnx library was built without nvcc", allow_module_level=True)

needs_ort_cuda = pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(), reason="onnxruntime-gpu is not installed"
)

# The kernels round activations to float16 (their tensor-core input) and form each weight as the
# float16 product q * scale; both add relative errors of ~2^-11 per term, far below the 4-bit error.
TOLERANCE = 4e-3
# Whole models: the float16 rounding of every layer's input compounds over the layers.
TOLERANCE_LOGITS = 2e-2


def assert_close(y, ref):
    y = np.asarray(y, dtype=np.float64)
    scale = np.abs(ref).max() + 1e-6
    err = np.abs(y - ref).max() / scale
    assert err < TOLERANCE, err


def run_cuda(weights, a, path="auto"):
    y = CudaSlimMatMul(weights)(torch.from_numpy(a).cuda(), path)
    torch.cuda.synchronize()
    return y.cpu().numpy()


# Both code paths at every shape: the fused kernels, and the float16 decode + cuBLAS GEMMs that run
# above 32 rows ("library"; forced here at any row count).
PATHS = ["kernels", "library"]


@pytest.mark.parametrize("lead,k,n", KERNEL_SHAPES)
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("path", PATHS)
def test_cuda_kernel_matches_reference(rng, lead, k, n, sparse, dtype, path):
    group = 32 if k > 32 else 1000
    w = random_weights(rng, k, n, sparse=sparse, group_size=group, bias=k % 3 == 0)
    a = rng.standard_normal((*lead, k)).astype(dtype)
    y = run_cuda(w, a, path)
    assert y.shape == (*lead, n) and y.dtype == dtype
    assert_close(y, reference_slim_matmul(a.astype(np.float32), w, 0))


@pytest.mark.parametrize("m", [1, 3, 8, 9, 16, 17, 64, 300])
@pytest.mark.parametrize("group", [8, 16, 128])
@pytest.mark.parametrize("path", PATHS)
def test_cuda_rows_and_groups(rng, m, group, path):
    """Every row-slicing of the launch (8, 16, 32 rows per CTA) and groups smaller than a chunk."""
    w = random_weights(rng, 264, 72, sparse=True, group_size=group)
    a = rng.standard_normal((m, 264)).astype(np.float16)
    assert_close(run_cuda(w, a, path), reference_slim_matmul(a.astype(np.float32), w, 0))


@pytest.mark.parametrize("sparse", [True, False])
def test_cuda_library_path_slabs(rng, sparse):
    """A weight wider than one decoded slab (16 MiB of float16 W^T rows): several slab GEMMs, the last
    one partial, each writing its own columns of Y."""
    k, n = 4096, 2100  # 16 MiB holds 2048 rows of K = 4096: slabs of 2048 and 52 columns
    w = random_weights(rng, k, n, sparse=sparse, group_size=128, adapter_format="int4", rank=16, bias=True)
    a = rng.standard_normal((40, k)).astype(np.float16)
    assert_close(run_cuda(w, a, "library"), reference_slim_matmul(a.astype(np.float32), w, 0))


@pytest.mark.parametrize("adapter_format,rank", [("float16", 5), ("int4", 9), ("int4", 40)])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("m", [1, 16, 100])
@pytest.mark.parametrize("path", PATHS)
def test_cuda_adapters(rng, adapter_format, rank, sparse, m, path):
    w = random_weights(rng, 200, 50, sparse=sparse, adapter_format=adapter_format, rank=rank, bias=True)
    a = rng.standard_normal((m, 200)).astype(np.float16)
    assert_close(run_cuda(w, a, path), reference_slim_matmul(a.astype(np.float32), w, 0))


def test_cuda_rejects_bad_input(rng):
    w = random_weights(rng, 64, 16)
    op = CudaSlimMatMul(w)
    with pytest.raises(ValueError, match=r"\[\.\.\., 64\]"):
        op(torch.zeros((2, 63), dtype=torch.float16, device="cuda"))


def cuda_session(model, with_library=True, profile_dir=None):
    so = slim_onnx.session_options() if with_library else ort.SessionOptions()
    if profile_dir is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_dir / "profile")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def node_providers(session):
    with open(session.end_profiling()) as f:
        events = json.load(f)
    return {(e["args"]["op_name"], e["args"].get("provider")) for e in events
            if e.get("cat") == "Node" and "op_name" in e.get("args", {})}


@needs_ort_cuda
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("adapter_format,rank", [("none", 0), ("int4", 24), ("float16", 8)])
@pytest.mark.parametrize("rows", [7, 40])  # 14 rows: fused kernels; 80: cuBLAS through onnxruntime's allocator
def test_ort_cuda_provider_runs_the_op(rng, tmp_path, dtype, adapter_format, rank, rows):
    w = random_weights(rng, 256, 96, adapter_format=adapter_format, rank=rank, bias=True)
    model = make_slim_matmul_model(w, dtype=dtype, accuracy_level=0, batch_dims=2)
    a = rng.standard_normal((2, rows, 256)).astype(dtype)
    session = cuda_session(model, profile_dir=tmp_path)
    y = session.run(None, {"A": a})[0]
    assert ("SlimMatMul", "CUDAExecutionProvider") in node_providers(session)
    assert y.dtype == dtype and y.shape == (2, rows, 96)
    assert_close(y, reference_slim_matmul(a.astype(np.float32), w, 0))
    # The same model without the library: the fallback function, inlined, on the CUDA provider.
    y_fallback = cuda_session(model, with_library=False).run(None, {"A": a})[0]
    assert_close(y, y_fallback.astype(np.float64))


@needs_ort_cuda
def test_ort_cuda_io_binding_keeps_data_on_device(rng):
    """Inputs and outputs bound on the GPU: the path a serving loop (and CUDA graphs) takes."""
    w = random_weights(rng, 128, 64, adapter_format="int4", rank=16)
    model = make_slim_matmul_model(w, dtype=np.float16, accuracy_level=0)
    session = cuda_session(model)
    a = rng.standard_normal((5, 128)).astype(np.float16)
    binding = session.io_binding()
    binding.bind_ortvalue_input("A", ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0))
    binding.bind_output("Y", "cuda")
    for _ in range(3):
        session.run_with_iobinding(binding)
    y = binding.copy_outputs_to_cpu()[0]
    assert_close(y, reference_slim_matmul(a.astype(np.float32), w, 0))


def dense_block_model(rng, width=256, layers=3):
    """A dense float32 model of `layers` x (MatMul + bias Add + Relu) and a Softmax head."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        b = (rng.standard_normal(width) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"/layers.{i}/MatMul"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"])]
        x = f"r{i}"
    nodes.append(helper.make_node("Softmax", [x], ["y"], axis=-1))
    graph = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


@needs_ort_cuda
def test_compressed_model_on_cuda_matches_the_cpu_path(rng, tmp_path):
    """A model compressed by the pipeline (default config, streamed calibration) runs on the CUDA
    provider, every SlimMatMul on the GPU, and agrees with the CPU kernels (float32 path)."""
    import onnx

    onnx.save(dense_block_model(rng), str(tmp_path / "dense.onnx"))
    calib = [{"x": rng.standard_normal((64, 256)).astype(np.float32)} for _ in range(4)]
    slim_onnx.compress(tmp_path / "dense.onnx", tmp_path / "slim", calibration=calib,
                       graph=GraphOptions(accuracy_level=0), log=lambda msg: None)
    model = onnx.load(str(tmp_path / "slim" / "dense.onnx"))
    x = rng.standard_normal((5, 256)).astype(np.float32)
    session = cuda_session(model, profile_dir=tmp_path)
    y_cuda = session.run(None, {"x": x})[0]
    providers = node_providers(session)
    assert {p for op, p in providers if op == "SlimMatMul"} == {"CUDAExecutionProvider"}
    so = slim_onnx.session_options()
    y_cpu = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(y_cuda - y_cpu).max() / np.abs(y_cpu).max() < TOLERANCE_LOGITS


@needs_ort_cuda
def test_ort_model_for_causal_lm_on_cuda_generates_like_the_cpu(tmp_path):
    """ORTModelForCausalLM on CUDAExecutionProvider with our library, as a GPU user runs it, against the
    CPU path on the same compressed tiny Llama (float32 activations, --no-fuse-attention so every node
    has a CUDA kernel). The GPU rounds activations to float16 for the tensor cores (sums stay float32),
    so logits agree to TOLERANCE_LOGITS of their range, and greedy tokens agree wherever the CPU's
    top-2 margin is wider than twice the measured logit difference (a narrower near-tie may flip)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("optimum.onnxruntime")
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    from helpers import tiny_llama_export

    os.environ["HF_HUB_OFFLINE"] = "1"
    root = tiny_llama_export(tmp_path, initializer_range=0.2)  # wide weights: peaked, decisive logits
    out = tmp_path / "slim"
    res = subprocess.run([sys.executable, "-m", "slim_onnx.cli", "compress", str(root / "onnx"), str(out), "--rank", "0",
                          "--pruning", "magnitude", "--quantizer", "absmax", "--accuracy-level", "0",
                          "--no-fuse-attention", "-q"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The Python language", return_tensors="pt", return_token_type_ids=False)
    models = {p: ORTModelForCausalLM.from_pretrained(out, session_options=slim_onnx.session_options(), provider=p)
              for p in ("CPUExecutionProvider", "CUDAExecutionProvider")}
    tokens = {p: m.generate(**ids, max_new_tokens=24, do_sample=False)[0].tolist() for p, m in models.items()}
    cpu_tokens, cuda_tokens = tokens["CPUExecutionProvider"], tokens["CUDAExecutionProvider"]
    full = torch.tensor([cpu_tokens])
    logits = {p: m(input_ids=full, attention_mask=torch.ones_like(full)).logits[0].float().cpu().numpy()
              for p, m in models.items()}
    cpu, gpu = logits["CPUExecutionProvider"], logits["CUDAExecutionProvider"]
    diff = np.abs(cpu - gpu).max()
    assert diff < TOLERANCE_LOGITS * np.abs(cpu).max(), diff
    prompt = ids["input_ids"].shape[1]
    top2 = np.sort(cpu, axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 2 * diff
    assert decided[prompt - 1], "the test model's first step should be a clear decision"
    for i in range(prompt, len(cpu_tokens)):
        if not decided[i - 1]:
            break
        assert cuda_tokens[i] == cpu_tokens[i], (i, cpu_tokens, cuda_tokens)
