"""The worker process of tools/fuzz_ops.py: runs the cases it is sent under the (sanitized) library.

Usage: python tools/fuzz_worker.py LIBRARY, with libasan preloaded and the sanitizer options set by the
harness. Once the library is registered it says "ready" on stdout; then it reads pickled
(model bytes, feeds) pairs from stdin until EOF and, for each, creates a session and runs it, and
answers one line on stdout: "ran", "rejected at creation: ..." or "rejected at run: ...". An
onnxruntime error is an answer like any other; a memory error kills the process, and the harness,
which knows the case it sent, reads the sanitizer's report from stderr.

It imports only numpy and onnxruntime, so that restarting it after a crash is quick.
"""

import os
import pickle
import sys

import numpy as np
import onnxruntime as ort


def session_options(library: str) -> ort.SessionOptions:
    """One set of options for every session: each tensor its own heap block (no arena, no memory
    pattern), so that AddressSanitizer's redzones sit right after every input and output."""
    so = ort.SessionOptions()
    so.register_custom_ops_library(library)
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4  # fatal only: stderr is for the sanitizers' reports
    return so


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def run_case(options: ort.SessionOptions, model: bytes, feeds: dict) -> str:
    try:
        session = ort.InferenceSession(model, options)
    except Exception as error:
        return f"rejected at creation: {first_line(error)}"
    # A fresh copy of each feed: its own malloc block of exactly its size (an unpickled array may
    # point into the pickle's bytes, where a read past its end would go unnoticed).
    feeds = {name: np.array(value, copy=True, order="C") for name, value in feeds.items()}
    try:
        session.run(None, feeds)
    except Exception as error:
        return f"rejected at run: {first_line(error)}"
    return "ran"


def main() -> None:
    ort.set_default_logger_severity(4)
    options = session_options(sys.argv[1])
    # The answers go to a private copy of stdout; stdout itself goes to stderr, so that anything the
    # native code prints cannot be mistaken for an answer.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    answers.write("ready\n")
    answers.flush()
    while True:
        try:
            model, feeds = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        answers.write(run_case(options, model, feeds).replace("\n", " ") + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
