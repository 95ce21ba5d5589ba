"""The models tools/bench_model.py --device cuda compares, built fast enough to make on a GPU machine.

For each decoder shape: a random-weight float16 export with KV cache (tools/scale_model.py
--with-past --dtype float16), then from it, side by side in worker processes, onnxruntime's
MatMulNBits model (4-bit, block 128, symmetric) and two SlimMatMul models (2:4 + 4-bit, group 128;
without and with rank-0.1 int4 adapters).

The compression is the fastest configuration there is, because speed is what these models measure,
not accuracy (their weights are random anyway): magnitude 2:4 masks, absmax quantization and plain
SVD adapters, none of which reads calibration statistics, so no calibration runs at all; the packed
format, and so the kernels' work, is the same whatever method chose the values. Attention is left
unfused (`--no-fuse-attention`): the fused GroupQueryAttention op is CPU-only.

Shapes: Llama-3-8B with 4 of its 32 blocks and its vocabulary cut to 16384, so that lm_head keeps
the share of the linear weights it has in the whole model (7%; the full 128256 rows would be 37% of
a 4-block model, and slower to make), and SmolLM2-135M whole. `--tiny` makes two tiny models of the
same structure instead, for a dry run on the CPU.

    python tools/make_bench_models.py /tmp/bench_models --device cuda --json /tmp/bench_models.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from scale_model import PRESETS, write_llama

MODELS = {
    "llama3-8b-4blocks": dict(PRESETS["8b"], blocks=4, vocab=16384),
    "smollm2-135m": PRESETS["smollm2"],
}
TINY_MODELS = {
    "tiny-gqa": {"hidden": 256, "intermediate": 512, "heads": 4, "kv_heads": 2, "blocks": 2, "vocab": 512},
    # SmolLM2 in small: K not a multiple of the group size 128, three query heads per KV head
    "tiny-smollm2": {"hidden": 192, "intermediate": 384, "heads": 3, "kv_heads": 1, "blocks": 2, "vocab": 320},
}


def build_dense(folder: str, shapes: dict) -> None:
    write_llama(folder, **shapes, with_past=True, dtype="float16")


def build_nbits(dense: str, folder: str) -> None:
    from bench_model import matmul_nbits_model

    matmul_nbits_model(Path(dense) / "model.onnx", Path(folder))


def build_slim(dense: str, folder: str, adapters: bool, device: str, threads: int) -> None:
    import torch

    import slim_onnx
    from slim_onnx.config import GraphOptions

    torch.set_num_threads(threads)  # the workers share the machine's cores
    rank = {"lowrank": "naive"} if adapters else {"rank": 0, "adapter_format": "none"}
    config = slim_onnx.SlimConfig(pruning="magnitude", quantizer="absmax", device=device, **rank)
    slim_onnx.compress(dense, folder, config, graph=GraphOptions(fuse_attention=False), log=lambda msg: None)


def _timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return round(time.perf_counter() - start, 1)


def build_all(out: Path, models: dict, device: str, jobs: int, report=None) -> dict:
    """Every model under out/{model}/{dense,nbits,slim,slim_adapters}; {model: {variant: {"path",
    "seconds"} or {"error"}}}. A failed build is reported and the others go on; report(results) is
    called as each finishes, so that a build cut short still leaves the finished models listed."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    results = {name: {} for name in models}
    # spawn: the workers import torch and onnxruntime themselves, nothing is inherited half set up
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {}
        for name, shapes in models.items():  # in order: the largest first, its compressions take longest
            pending[pool.submit(_timed, build_dense, str(out / name / "dense"), shapes)] = (name, "dense")
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                name, variant = pending.pop(future)
                folder = out / name / variant
                try:
                    results[name][variant] = {"path": str(folder), "seconds": future.result()}
                except Exception as error:  # noqa: BLE001 - reported, the other builds go on
                    results[name][variant] = {"error": f"{type(error).__name__}: {error}"}
                    continue
                print(f"{name} {variant}: {results[name][variant]['seconds']} s", flush=True)
                if report:
                    report(results)
                if variant != "dense":
                    continue
                dense = str(folder)
                tasks = {"nbits": (build_nbits, dense, str(out / name / "nbits")),
                         "slim": (build_slim, dense, str(out / name / "slim"), False, device, threads),
                         "slim_adapters": (build_slim, dense, str(out / name / "slim_adapters"), True, device, threads)}
                for derived in ("slim_adapters", "slim", "nbits"):  # the slowest first
                    pending[pool.submit(_timed, *tasks[derived])] = (name, derived)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for the models (must not hold them already)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for a dry run on the CPU")
    parser.add_argument("--device", default="cuda", help="where the compression's torch work runs (cpu or cuda)")
    parser.add_argument("--jobs", type=int, default=6, help="worker processes (6: every compression of both models at once)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--model", action="append", help="only this model (repeatable; default all)")
    args = parser.parse_args()

    models = TINY_MODELS if args.tiny else MODELS
    if args.model:
        models = {name: models[name] for name in args.model}
    start = time.perf_counter()

    def report(results: dict, final: bool = False) -> None:
        summary = {"models": results, "device": args.device, "jobs": args.jobs, "complete": final,
                   "seconds": round(time.perf_counter() - start, 1)}
        if args.json:  # replaced whole, never left half written by a kill
            partial = args.json.with_suffix(".partial")
            partial.write_text(json.dumps(summary, indent=2))
            os.replace(partial, args.json)

    results = build_all(args.out, models, args.device, args.jobs, report)
    report(results, final=True)
    print(f"all built in {round(time.perf_counter() - start, 1)} s", flush=True)
    if any("error" in r for variants in results.values() for r in variants.values()):
        raise SystemExit("some models failed to build: " + json.dumps(results))


if __name__ == "__main__":
    main()
