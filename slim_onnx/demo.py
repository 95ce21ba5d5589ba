"""`slim-onnx demo`: an embedded end-to-end check that needs no download.

Builds a small stack of synthetic float32 linear layers (x -> W1 -> ReLU -> W2 -> ReLU ...) as an ONNX model,
packs every weight into SlimMatMul (magnitude 2:4 + 4-bit AbsMax group 128, plus rank-r 4-bit
adapters fitted to the compression error by truncated SVD), and runs the dense model, the compressed
model on stock onnxruntime (the fallback functions) and with the slim_onnx kernels. Prints sizes,
agreement and speed.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from slim_onnx.fallback import OPSET
from slim_onnx.op import IR_VERSION, add_fallback_functions, make_slim_matmul_node
from slim_onnx.packing import pack_weight
from slim_onnx.runtime import kernel_name, session_options


def _stack_model(layers: list, size: int, make_layer) -> "onnx.ModelProto":  # noqa: F821
    nodes, inits = [], []
    x = "x"
    for i, layer in enumerate(layers):
        y = f"h{i}"
        layer_nodes, layer_inits = make_layer(i, layer, x, y)
        nodes += layer_nodes
        inits += layer_inits
        x = y
        if i + 1 < len(layers):
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "demo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", size])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", size])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    add_fallback_functions(model)
    return model


def _adapters(w: np.ndarray, compressed: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank-r factors of the compression error W - W_c (truncated SVD)."""
    u, s, vt = np.linalg.svd(w - compressed, full_matrices=False)
    return (u[:, :rank] * s[:rank]).astype(np.float32), vt[:rank].astype(np.float32)


def _median_ms(session: ort.InferenceSession, x: np.ndarray, seconds: float = 0.5) -> float:
    session.run(None, {"x": x})
    times = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run_demo(size: int = 1024, layers: int = 4, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    rank = max(8, round(0.1 * size / 8) * 8)
    print(f"slim-onnx demo: {layers} linear layers of {size} x {size}, 2:4 + 4-bit (group 128) + rank-{rank} 4-bit adapters")
    # Synthetic weights shaped like trained ones: a power-law singular spectrum and a few strong
    # input channels. (Plain Gaussian matrices are the worst case for any compression.)
    weights = []
    for _ in range(layers):
        u, _ = np.linalg.qr(rng.standard_normal((size, size)))
        v, _ = np.linalg.qr(rng.standard_normal((size, size)))
        spectrum = np.arange(1, size + 1) ** -0.75
        w = (u * (spectrum / np.linalg.norm(spectrum))) @ v.T
        w[rng.choice(size, size // 32, replace=False)] *= 4.0
        weights.append(w.astype(np.float32))

    dense = _stack_model(
        weights, size, lambda i, w, x, y: ([helper.make_node("MatMul", [x, f"w{i}"], [y])], [numpy_helper.from_array(w, f"w{i}")])
    )
    packed, err_plain, err_adapted = [], [], []
    for w in weights:
        plain = pack_weight(w, group_size=128, sparse=True)
        adapted = pack_weight(w, 128, True, _adapters(w, plain.dense_weight(), rank), "int4")
        l, r = adapted.adapter_matrices()
        err_plain.append(np.linalg.norm(w - plain.dense_weight()) / np.linalg.norm(w))
        err_adapted.append(np.linalg.norm(w - adapted.dense_weight() - l @ r) / np.linalg.norm(w))
        packed.append(adapted)

    def slim_layer(i, p, x, y):
        node, inits = make_slim_matmul_node(p, x, y, f"layer{i}", accuracy_level=4)
        return [node], inits

    slim = _stack_model(packed, size, slim_layer)

    so_plain = ort.SessionOptions()
    s_dense = ort.InferenceSession(dense.SerializeToString(), so_plain)
    s_fallback = ort.InferenceSession(slim.SerializeToString(), ort.SessionOptions())
    s_kernel = ort.InferenceSession(slim.SerializeToString(), session_options())

    x = rng.standard_normal((16, size)).astype(np.float32)
    y_dense = s_dense.run(None, {"x": x})[0]
    y_fallback = s_fallback.run(None, {"x": x})[0]
    y_kernel = s_kernel.run(None, {"x": x})[0]

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    dense_bytes = sum(w.nbytes for w in weights)
    slim_bytes = sum(p.nbytes() for p in packed)
    print(f"\nsize of the weights: float32 {dense_bytes / 2**20:.1f} MiB, float16 {dense_bytes / 2**21:.1f} MiB, "
          f"SlimMatMul {slim_bytes / 2**20:.2f} MiB ({dense_bytes / slim_bytes:.1f}x smaller than float32, "
          f"{dense_bytes / 2 / slim_bytes:.1f}x smaller than float16)")
    print(f"weight error ||W - W'|| / ||W||, mean over layers: {np.mean(err_plain):.3f} without adapters, "
          f"{np.mean(err_adapted):.3f} with them")
    print("\nagreement on a batch of 16 rows (relative L2 error):")
    print(f"  kernel (slim_onnx library)  vs dense model: {rel(y_kernel, y_dense):.4f}")
    print(f"  fallback (stock onnxruntime) vs dense model: {rel(y_fallback, y_dense):.4f}")
    print(f"  kernel vs fallback: {rel(y_kernel, y_fallback):.5f}  (the kernel quantizes activations to int8)")

    print(f"\nspeed (median ms per run, onnxruntime {ort.__version__}, kernels: {kernel_name()}):")
    print(f"  {'rows':>5} {'dense fp32':>11} {'fallback':>9} {'kernel':>8} {'kernel speed-up':>16}")
    for m in (1, 16):
        xm = x[:m]
        t = [_median_ms(s, xm) for s in (s_dense, s_fallback, s_kernel)]
        print(f"  {m:>5} {t[0]:>11.3f} {t[1]:>9.3f} {t[2]:>8.3f} {t[0] / t[2]:>15.2f}x")
    ok = rel(y_kernel, y_fallback) < 0.02
    print("\nresult:", "OK" if ok else "MISMATCH between kernel and fallback")
    return 0 if ok else 1
