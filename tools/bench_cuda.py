"""The CUDA half of tools/bench_op.py (`python tools/bench_op.py --device cuda`).

Cases, each Y = A @ W for W [K, N] with float16 A:
  - torch fp16:   torch.matmul on a float16 W (cuBLAS)
  - torch 2:4:    torch.sparse.to_sparse_semi_structured float16 W (cuSPARSELt / CUTLASS), where it runs
  - NBits (ORT):  onnxruntime MatMulNBits 4-bit, block 128, on CUDAExecutionProvider (onnxruntime-gpu)
  - Slim:         SlimMatMul 2:4 + 4-bit, group 128, through the library's CUDA entry point
  - Slim+rR:      the same with rank-R 4-bit adapters (group 128)
  - ... kernels-path / library-path: the same op forced onto the code path the automatic choice did not
    take at that M (the fused kernels above 32 rows, float16 decode + cuBLAS GEMMs at 32 or fewer), so
    each M shows both paths and the crossover can be placed
  - Slim (ORT), Slim+rR (ORT): the same op through onnxruntime's CUDA provider (onnxruntime-gpu)
Times are GPU time per call: the torch-side cases are captured in a CUDA graph of calls rotating over
weight copies (together > 2x the L2 cache, so weights come from DRAM), replayed and timed with CUDA
events; the onnxruntime cases run a model of such copies with the provider's CUDA graph enabled.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

ISSUE_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]
L2_ROTATION_BYTES = 160 << 20


def random_2of4_q(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    """Random int4 [K, N] with exactly two nonzeros per group of 4 along K (fast: one of 6 patterns)."""
    patterns = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]], np.int8)
    mask = patterns[rng.integers(0, 6, size=(k // 4, n))].transpose(0, 2, 1).reshape(k, n)
    q = rng.integers(1, 8, size=(k, n), dtype=np.int8) * rng.choice(np.array([-1, 1], np.int8), size=(k, n))
    return q * mask


def graph_ms(torch, calls: list, replays: int = 20) -> float:
    """GPU ms per call of `calls` (zero-argument callables), run in turn inside one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:  # warm-up outside the graph (lazy initialisation, allocator)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    rounds = max(1, math.ceil(64 / len(calls)))
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for fn in calls:
                fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (rounds * len(calls)))
    return statistics.median(times)


def copy_bandwidth(torch) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the bytes read plus the bytes written."""
    size = 1 << 30
    src = torch.empty(size, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = graph_ms(torch, [lambda: dst.copy_(src)], replays=10)
    return 2 * size / (ms * 1e-3)


def ort_cuda_ms(ort, model, a: np.ndarray, copies: int) -> float:
    """ms per node of a model whose `copies` nodes all read A, with onnxruntime's CUDA graph."""
    import time

    import slim_onnx

    so = slim_onnx.session_options()
    providers = [("CUDAExecutionProvider", {"enable_cuda_graph": "1"})]
    session = ort.InferenceSession(model.SerializeToString(), so, providers=providers)
    binding = session.io_binding()
    a_dev = ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0)
    binding.bind_ortvalue_input("A", a_dev)
    outputs = [ort.OrtValue.ortvalue_from_shape_and_type((a.shape[0], o.shape[-1]), np.float16, "cuda", 0)
               for o in session.get_outputs()]
    for o, value in zip(session.get_outputs(), outputs):
        binding.bind_ortvalue_output(o.name, value)
    for _ in range(3):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(20):
        binding.synchronize_inputs()
        t0 = time.perf_counter()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3 / copies


def multi_node_model(nodes_and_inits, k: int, n: int, opsets):
    from onnx import TensorProto, helper

    from slim_onnx.node_builder import IR_VERSION, add_fallback_functions

    nodes, inits, outputs = [], [], []
    for i, (node, node_inits) in enumerate(nodes_and_inits):
        nodes.append(node)
        inits += node_inits
        outputs.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT16, ["M", n]))
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("A", TensorProto.FLOAT16, ["M", k])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)
    add_fallback_functions(model)
    return model


def nbits_node(rng, k: int, n: int, i: int, block: int = 128):
    from onnx import helper, numpy_helper

    kb = -(-k // block)
    packed = rng.integers(0, 256, size=(n, kb, block // 2), dtype=np.uint8)
    scales = (rng.random((n, kb)) * 0.01 + 0.001).astype(np.float16)
    node = helper.make_node("MatMulNBits", ["A", f"B{i}", f"S{i}"], [f"Y{i}"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=block, accuracy_level=0)
    return node, [numpy_helper.from_array(packed, f"B{i}"), numpy_helper.from_array(scales.reshape(-1), f"S{i}")]


def bench_cuda(args) -> None:
    import json

    import onnxruntime as ort
    import torch
    from onnx import helper

    import slim_onnx
    from slim_onnx.cuda_kernels import CudaSlimMatMul
    from slim_onnx.node_builder import make_slim_matmul_node

    shapes = [(args.k, args.n or args.k)] if args.k else ISSUE_SHAPES
    ms_list = args.m or [1, 16, 128, 2048]
    have_ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    rng = np.random.default_rng(0)
    bandwidth = copy_bandwidth(torch)
    print(f"device: {torch.cuda.get_device_name()}; device-to-device copy bandwidth {bandwidth / 1e9:.0f} GB/s "
          f"(read + write); onnxruntime CUDA provider: {'yes' if have_ort_cuda else 'no (onnxruntime-gpu missing)'}")
    results = {"copy_bandwidth": bandwidth, "shapes": {}}
    for k, n in shapes:
        rank = args.rank or math.ceil(0.1 * min(k, n) / 8) * 8
        q = random_2of4_q(rng, k, n)
        scales = (rng.random((k // 128, n)) * 0.01 + 0.001).astype(np.float16)
        adapters = (rng.standard_normal((k, rank)).astype(np.float32) * 0.01,
                    rng.standard_normal((rank, n)).astype(np.float32) * 0.01)
        plain = slim_onnx.pack_quantized(q, scales, 128, True)
        adapted = slim_onnx.pack_quantized(q, scales, 128, True, adapters, "int4")
        dense = torch.from_numpy(q.astype(np.float16)).cuda() * 0.01

        def copies_for(nbytes: int) -> int:
            return max(2, math.ceil(L2_ROTATION_BYTES / nbytes))

        fp16_w = [dense.clone() for _ in range(copies_for(dense.numel() * 2))]
        slim_ops = [CudaSlimMatMul(plain) for _ in range(copies_for(plain.nbytes()))]
        adapted_ops = [CudaSlimMatMul(adapted) for _ in range(copies_for(adapted.nbytes()))]
        sparse_w = None
        try:
            from torch.sparse import to_sparse_semi_structured

            # The semi-structured operand is the left one: Y^T = W^T @ A^T.
            sparse_w = [to_sparse_semi_structured(dense.t().contiguous()) for _ in range(copies_for(dense.numel()))]
        except Exception as e:  # noqa: BLE001 - report and go on without this peer
            print(f"  torch 2:4 semi-structured unavailable for {k}x{n}: {e}")

        ort_models = {}
        if have_ort_cuda:
            opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid("slim_onnx", 1)]
            c = copies_for(k * n // 2)
            ort_models["NBits (ORT)"] = (multi_node_model([nbits_node(rng, k, n, i) for i in range(c)], k, n, opsets), c)
            for name, w in (("Slim (ORT)", plain), (f"Slim+r{rank} (ORT)", adapted)):
                c = copies_for(w.nbytes())
                nodes = [make_slim_matmul_node(w, "A", f"Y{i}", f"slim{i}", 0) for i in range(c)]
                ort_models[name] = (multi_node_model(nodes, k, n, opsets), c)

        table = {}
        for m in ms_list:
            a = torch.randn((m, k), dtype=torch.float16, device="cuda")
            row = {
                "torch fp16": graph_ms(torch, [lambda w=w: a @ w for w in fp16_w]),
                "Slim": graph_ms(torch, [lambda op=op: op(a) for op in slim_ops]),
                f"Slim+r{rank}": graph_ms(torch, [lambda op=op: op(a) for op in adapted_ops]),
            }
            # the path the automatic choice did not take at this M (it takes the library above 32 rows)
            other = "kernels" if m > 32 else "library"
            for name, ops in (("Slim", slim_ops), (f"Slim+r{rank}", adapted_ops)):
                row[f"{name} {other}-path"] = graph_ms(torch, [lambda op=op: op(a, other) for op in ops])
            if sparse_w is not None:
                try:
                    row["torch 2:4"] = graph_ms(torch, [lambda w=w: (w @ a.t()).t() for w in sparse_w])
                except Exception as e:  # noqa: BLE001
                    print(f"  torch 2:4 failed at M={m}: {e}")
            a_np = a.cpu().numpy()
            for name, (model, c) in ort_models.items():
                try:
                    row[name] = ort_cuda_ms(ort, model, a_np, c)
                except Exception as e:  # noqa: BLE001
                    print(f"  {name} failed at M={m}: {e}")
            table[m] = row
        results["shapes"][f"{k}x{n}"] = {"rank": rank, "ms": table,
                                          "bytes": {"Slim": plain.nbytes(), f"Slim+r{rank}": adapted.nbytes(),
                                                    "torch fp16": k * n * 2}}
        if args.json:  # after every shape: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        names = list(dict.fromkeys(name for row in table.values() for name in row))
        print(f"\nK={k} N={n} rank={rank}  (GPU us per call; ratio = peer / Slim)")
        print(f"{'op':<24}" + "".join(f"{'M=' + str(m):>11}" for m in ms_list))
        for name in names:
            print(f"{name:<24}" + "".join(f"{table[m][name] * 1e3:>11.1f}" if name in table[m] else f"{'-':>11}"
                                          for m in ms_list))
        for slim_name in [x for x in names if x.startswith("Slim") and not x.endswith("-path")]:
            nbytes = adapted.nbytes() if "+r" in slim_name else plain.nbytes()
            fractions = [nbytes / (table[m][slim_name] * 1e-3) / bandwidth for m in ms_list if slim_name in table[m]]
            print(f"  {slim_name + ' weight bandwidth / copy':<38}" + "".join(f"{f:>10.0%}" for f in fractions))
            for peer in [x for x in names if not x.startswith("Slim")]:
                cells = "".join(f"{table[m][peer] / table[m][slim_name]:>9.2f}x" if peer in table[m] and slim_name in table[m]
                                else f"{'-':>10}" for m in ms_list)
                print(f"  {peer + ' / ' + slim_name:<38}{cells}")
