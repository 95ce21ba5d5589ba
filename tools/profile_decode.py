"""Where one decode step of an Optimum export spends its time, by op type (onnxruntime profiling).

    python tools/profile_decode.py exported/model.onnx [--past 64] [--runs 20] [--threads 2]

Feeds one new token after `past` cached positions (zeros), runs it `runs` times with profiling on,
and prints the median model_run time and the kernel time per op type. Profiling adds a fixed cost
per node, so small nodes look slower than they are; compare models under the same settings.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile

import numpy as np
import onnxruntime as ort

import slim_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--past", type=int, default=64)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()

    so = slim_onnx.session_options()
    so.enable_profiling = True
    so.profile_file_prefix = tempfile.mkdtemp() + "/decode"
    so.intra_op_num_threads = args.threads
    session = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    feeds = {}
    for value in session.get_inputs():
        float_type = np.float16 if value.type == "tensor(float16)" else np.float32
        if value.name == "input_ids":
            feeds[value.name] = np.array([[42]], dtype=np.int64)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones((1, args.past + 1), dtype=np.int64)
        elif value.name == "position_ids":
            feeds[value.name] = np.array([[args.past]], dtype=np.int64)
        elif value.name.startswith("past_key_values"):
            feeds[value.name] = np.zeros((1, value.shape[1], args.past, value.shape[3]), dtype=float_type)
        else:
            raise SystemExit(f"do not know how to feed input {value.name}")
    for _ in range(args.runs):
        session.run(None, feeds)
    with open(session.end_profiling()) as f:
        events = json.load(f)
    time_by_op, nodes_by_op = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            time_by_op[e["args"]["op_name"]] += e["dur"]
            nodes_by_op[e["args"]["op_name"]] += 1
    runs = [e["dur"] for e in events if e.get("name") == "model_run"]
    print(f"{args.model}: model_run median {statistics.median(runs) / 1e3:.2f} ms, "
          f"kernels {sum(time_by_op.values()) / args.runs / 1e3:.2f} ms per run")
    for op, us in time_by_op.most_common(args.top):
        print(f"  {op:<22}{us / args.runs / 1e3:8.2f} ms  ({nodes_by_op[op] // args.runs} nodes)")


if __name__ == "__main__":
    main()
