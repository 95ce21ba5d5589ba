"""Op-level benchmark: SlimMatMul against its peers, side by side in one run.

CPU (default): onnxruntime's MatMul (fp32) and MatMulNBits (4-bit) against SlimMatMul (2:4 + 4-bit,
group 128; with and without rank-r 4-bit adapters) for the same random W [K, N], on the same
onnxruntime thread settings. Prints median times and ratios (peer time / SlimMatMul time: > 1 means
SlimMatMul is faster).

    python tools/bench_op.py                      # K = N = 4096, M in 1, 16, 128
    python tools/bench_op.py --m 1 --json out.json
    python tools/bench_op.py --m 1 16 --chain 8   # weights streamed from memory, as in a model

By default each op's weights stay in the cache between runs (one op timed again and again: the
op's compute). `--chain L` (K = N only) times L copies of the op in sequence, each with its own
random weights, and reports the time per copy: once L copies exceed the last-level cache, every
run streams them from memory, as a model's decode step streams its layers.

CUDA (--device cuda, see docs/cuda.md): SlimMatMul's CUDA kernels against torch float16 matmul
(cuBLAS), torch 2:4 semi-structured float16, and onnxruntime MatMulNBits on CUDA when onnxruntime-gpu
is installed, for K x N in {4096^2, 4096x14336, 14336x4096, 8192^2} and M in {1, 16, 128, 2048}.
Every case is timed as GPU time per call inside a CUDA graph, rotating over enough weight copies
that they do not fit in L2; weight bandwidth is shown as a fraction of the measured device-to-device
copy bandwidth.

    python tools/bench_op.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import slim_onnx
from slim_onnx.node_builder import IR_VERSION
from slim_onnx.packing import absmax_int4


def _single_op_model(node, initializers, k: int, n: int, opsets):
    graph = helper.make_graph(
        [node],
        "bench",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)


def chain_model(models: list[onnx.ModelProto]) -> onnx.ModelProto:
    """One-node K x K models of one op (each with its own weights) in sequence, A -> ... -> Y (they
    share any model-local function)."""
    if len(models) == 1:
        return models[0]
    chained = onnx.ModelProto()
    chained.CopyFrom(models[0])
    del chained.graph.node[:]
    del chained.graph.initializer[:]
    for i, model in enumerate(models):
        (node,) = model.graph.node
        rename = {init.name: f"{init.name}.{i}" for init in model.graph.initializer}
        rename |= {"A": "A" if i == 0 else f"h{i}", "Y": "Y" if i == len(models) - 1 else f"h{i + 1}"}
        copy = chained.graph.node.add()
        copy.CopyFrom(node)
        copy.name = f"{node.name or node.op_type}.{i}"
        copy.input[:] = [rename.get(x, x) for x in node.input]
        copy.output[:] = [rename.get(x, x) for x in node.output]
        for init in model.graph.initializer:
            weights = chained.graph.initializer.add()
            weights.CopyFrom(init)
            weights.name = rename[init.name]
    return chained


def matmul_model(w: np.ndarray):
    node = helper.make_node("MatMul", ["A", "W"], ["Y"])
    return _single_op_model(node, [numpy_helper.from_array(w, "W")], *w.shape, [helper.make_opsetid("", 18)])


def matmul_nbits_model(w: np.ndarray, accuracy_level: int, block: int = 128):
    """com.microsoft::MatMulNBits with symmetric 4-bit blocks along K (default zero point 8)."""
    k, n = w.shape
    q, scales = absmax_int4(w, block)
    k_blocks = -(-k // block)
    u = np.full((k_blocks * block, n), 8, dtype=np.uint8)
    u[:k] = (q.astype(np.int16) + 8).astype(np.uint8)
    u = u.T.reshape(n, k_blocks, block // 2, 2)
    packed = (u[..., 0] | (u[..., 1] << 4)).astype(np.uint8)
    node = helper.make_node(
        "MatMulNBits",
        ["A", "B", "scales"],
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=4,
        block_size=block,
        accuracy_level=accuracy_level,
    )
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.astype(np.float32).T.copy(), "scales")]
    return _single_op_model(node, inits, k, n, [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def time_sessions(sessions: dict, a: np.ndarray, seconds: float) -> dict:
    """Median wall time (ms) of session.run for each session, measured round-robin.

    The cases take turns (0.1 s each per round, after two warm-up runs that bring its weights back
    into cache) so that load changes on a shared machine hit all of them alike.
    """
    feeds = {"A": a}
    times = {name: [] for name in sessions}
    start = time.perf_counter()
    while time.perf_counter() - start < seconds * len(sessions) or min(len(t) for t in times.values()) < 10:
        for name, s in sessions.items():
            s.run(None, feeds)
            s.run(None, feeds)
            turn = time.perf_counter()
            while time.perf_counter() - turn < 0.1 or len(times[name]) < 3:
                t0 = time.perf_counter()
                s.run(None, feeds)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=None, help="default 4096 (cuda: the four issue shapes)")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--m", type=int, nargs="+", default=None, help="default 1 16 128 (cuda: 1 16 128 2048)")
    parser.add_argument("--rank", type=int, default=None, help="adapter rank (default 0.1 * min(K, N), rounded up to 8, as SlimConfig)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chain", type=int, default=1,
                        help="CPU, K = N: time this many copies of each op in sequence (per copy), weights streamed from memory")
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum timing time per case")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    if args.device == "cuda":
        from bench_cuda import bench_cuda

        bench_cuda(args)
        return

    args.k, args.n, args.m = args.k or 4096, args.n or 4096, args.m or [1, 16, 128]
    args.rank = args.rank or slim_onnx.SlimConfig(rank=0.1).resolve_rank(args.k, args.n)
    # Before any session exists: every session runs on one global pool of `threads` threads.
    ort.capi._pybind_state.set_global_thread_pool_sizes(args.threads, 1)
    if args.chain > 1 and args.k != args.n:
        parser.error("--chain needs K = N (each copy's output is the next one's input)")
    rng = np.random.default_rng(0)
    # one W (and adapters) per copy in a chain: distinct bytes, which no runtime can share
    ws = [(rng.standard_normal((args.k, args.n)) / np.sqrt(args.k)).astype(np.float32) for _ in range(args.chain)]
    adapters = [(rng.standard_normal((args.k, args.rank)).astype(np.float32) * 0.01,
                 rng.standard_normal((args.rank, args.n)).astype(np.float32) * 0.01) for _ in range(args.chain)]
    slim_plain = [slim_onnx.pack_weight(w, group_size=128, sparse=True) for w in ws]
    slim_adapt = [slim_onnx.pack_weight(w, group_size=128, sparse=True, adapters=a, adapter_format="int4")
                  for w, a in zip(ws, adapters)]

    def session(models, custom: bool):
        so = slim_onnx.session_options() if custom else ort.SessionOptions()
        so.use_per_session_threads = False  # one shared pool: idle sessions' threads never spin beside the timed one
        return ort.InferenceSession(chain_model(models).SerializeToString(), so, providers=["CPUExecutionProvider"])

    def slim(packed, level):
        return session([slim_onnx.make_slim_matmul_model(p, accuracy_level=level) for p in packed], True)

    cases = {
        "MatMul fp32": session([matmul_model(w) for w in ws], False),
        "MatMulNBits acc0": session([matmul_nbits_model(w, 0) for w in ws], False),
        "MatMulNBits acc4": session([matmul_nbits_model(w, 4) for w in ws], False),
        "Slim acc0": slim(slim_plain, 0),
        "Slim acc4": slim(slim_plain, 4),
        f"Slim+r{args.rank} acc0": slim(slim_adapt, 0),
        f"Slim+r{args.rank} acc4": slim(slim_adapt, 4),
    }
    results = {"k": args.k, "n": args.n, "rank": args.rank, "threads": args.threads, "chain": args.chain,
               "kernel": slim_onnx.kernel_name(), "ms": {}}
    for m in args.m:
        a = rng.standard_normal((m, args.k)).astype(np.float32)
        results["ms"][m] = {name: ms / args.chain for name, ms in time_sessions(cases, a, args.seconds).items()}

    names = list(cases)
    per = f"; per op of a chain of {args.chain}, weights streamed from memory" if args.chain > 1 else "; weights in cache"
    print(f"K={args.k} N={args.n} threads={args.threads} kernels={results['kernel']}  (median ms{per}; ratio = peer / Slim)")
    print(f"{'op':<22}" + "".join(f"{'M=' + str(m):>12}" for m in args.m))
    for name in names:
        print(f"{name:<22}" + "".join(f"{results['ms'][m][name]:>12.3f}" for m in args.m))
    print("ratios:")
    ratios = {}
    for slim_name in [n for n in names if n.startswith("Slim")]:
        for peer in [n for n in names if not n.startswith("Slim")]:
            row = {m: results["ms"][m][peer] / results["ms"][m][slim_name] for m in args.m}
            ratios[f"{peer} / {slim_name}"] = row
            print(f"  {peer + ' / ' + slim_name:<38}" + "".join(f"{row[m]:>9.2f}x" for m in args.m))
    results["ratios"] = ratios
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
