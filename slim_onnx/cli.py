"""The `slim-onnx` command line: demo, compress, inspect."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def _add_compress(sub) -> None:
    from slim_onnx.config import (
        ACCURACY_LEVELS,
        ADAPTER_FORMATS,
        CALIBRATION_MODES,
        LOWRANKS,
        PRUNINGS,
        QUANTIZERS,
        SPARSITIES,
        GraphOptions,
        SlimConfig,
    )

    d = SlimConfig()
    p = sub.add_parser("compress", help="compress an ONNX model or Optimum export folder into SlimMatMul")
    p.add_argument("input", help="a .onnx file or an export folder")
    p.add_argument("output", help="the output folder (must not exist unless --overwrite)")
    p.add_argument("--calib", help="calibration text file or folder of .txt files, or an .npz of model inputs")
    p.add_argument("--calib-samples", type=int, default=128, help="token windows (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the export folder)")
    p.add_argument("--bits", type=int, default=d.bits)
    p.add_argument("--sparsity", choices=SPARSITIES, default=d.sparsity)
    p.add_argument("--pruning", choices=PRUNINGS, default=d.pruning)
    p.add_argument("--quantizer", choices=QUANTIZERS, default=d.quantizer)
    p.add_argument("--group-size", type=int, default=d.group_size)
    p.add_argument("--rank", type=float, default=d.rank, help="adapter rank: ratio of min(K, N) if < 1, else absolute; 0 = none")
    p.add_argument("--lowrank", choices=LOWRANKS, default=d.lowrank)
    p.add_argument("--adapter-format", choices=ADAPTER_FORMATS, default=d.adapter_format)
    p.add_argument("--requantize", action="store_true")
    p.add_argument("--accuracy-level", type=int, choices=ACCURACY_LEVELS, default=GraphOptions().accuracy_level,
                   help="4: int8 activations in the CPU kernel (default); 0: float32")
    p.add_argument("--include", action="append", help="regex on node names; repeatable")
    p.add_argument("--exclude", action="append", help="regex on node names; repeatable")
    p.add_argument("--no-lm-head", action="store_true", help="keep lm_head dense")
    p.add_argument("--device", default=d.device, help="cpu or cuda for the algorithms")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--calibration", choices=CALIBRATION_MODES, default=CALIBRATION_MODES[0],
                   help="stream (default): block by block, each on the output of the compressed earlier blocks, "
                        "in one pass; one-pass: every layer from the dense model at once (more memory)")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--budget", type=float, metavar="BITS",
                      help="choose each layer's format (2:4 or dense 4-bit, adapter rank 0..0.25) for this average of "
                           "bits per compressed weight, scales and adapters included (the default format is about 3.8), "
                           "least predicted damage first (measures each layer's sensitivity: slower)")
    goal.add_argument("--size-ratio", type=float, metavar="R",
                      help="as --budget, for a size of R times the compressed layers' float16 bytes (default format: ~0.24)")
    goal.add_argument("--max-kl", type=float, metavar="K",
                      help="as --budget, for the smallest model found whose mean KL divergence from the dense model's "
                           "next-token distributions is at most K on the first calibration windows (measured)")
    goal.add_argument("--target-ppl-ratio", type=float, metavar="R",
                      help="as --max-kl, for a perplexity at most R times the dense model's on those windows")
    p.add_argument("--target", choices=GraphOptions.TARGETS, default="cpu",
                   help="cuda: a graph onnxruntime's CUDA provider runs whole: float16 activations end to end, the "
                        "export's attention in float16 instead of our CPU attention op (default: cpu)")
    p.add_argument("--no-fuse-attention", action="store_true",
                   help="keep the export's attention and RMSNorm ops (default: fuse cached decoder attention into "
                        "GroupQueryAttention, and residual Add + RMSNorm into SkipSimplifiedLayerNormalization)")
    p.add_argument("--no-quantize-embeddings", action="store_true",
                   help="keep embedding tables float (default: int8 rows with group scales when nothing else reads them)")
    p.add_argument("--no-merge-siblings", action="store_true",
                   help="one SlimMatMul per layer (default: layers reading the same input, like q/k/v, share one "
                        "node, and a SwiGLU after a merged gate/up is folded into it)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier slim-onnx output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages")
    p.add_argument("-v", "--verbose", action="store_true", help="a line per layer (with its error) instead of progress bars")


def _compress(args) -> int:
    from slim_onnx.calibration import TextCalibration
    from slim_onnx.config import GraphOptions, SlimConfig
    from slim_onnx.pipeline import compress
    from slim_onnx.progress import progress_factory

    config = SlimConfig(
        bits=args.bits, sparsity=args.sparsity, pruning=args.pruning, quantizer=args.quantizer, group_size=args.group_size,
        rank=args.rank, lowrank=args.lowrank, adapter_format=args.adapter_format if args.rank else "none",
        requantize=args.requantize, device=args.device, seed=args.seed,
    )
    calibration = None
    if args.calib:
        calibration = args.calib if args.calib.endswith(".npz") else TextCalibration(
            args.calib, args.calib_samples, args.seqlen, args.seed, args.tokenizer
        )
    fuse, merge = not args.no_fuse_attention, not args.no_merge_siblings
    graph = GraphOptions.for_target(
        args.target, accuracy_level=args.accuracy_level, quantize_embeddings=not args.no_quantize_embeddings,
        fuse_attention=fuse, fuse_norms=fuse, merge_siblings=merge, fuse_swiglu=merge, pack_attention=merge,
    )
    report = compress(
        args.input, args.output, config, calibration, graph=graph, include=args.include, exclude=args.exclude,
        compress_lm_head=not args.no_lm_head, overwrite=args.overwrite, calibration_mode=args.calibration,
        budget=_budget(args),
        log=_log(args.quiet), progress=progress_factory(not args.quiet and not args.verbose),
    )
    t = report["totals"]
    print(f"compressed {t['layers']} layers: {t['bytes_float16'] / 2**20:.1f} MiB (float16) -> "
          f"{t['bytes_packed'] / 2**20:.1f} MiB ({t['bytes_packed'] / t['bytes_float16']:.3f}x) in {t['seconds']} s; "
          f"report: {Path(args.output) / 'slim_report.json'}")
    print(f"model weights: {t['model_bytes_before'] / 2**20:.1f} MiB -> {t['model_bytes_after'] / 2**20:.1f} MiB "
          f"({t['model_bytes_before'] / max(t['model_bytes_after'], 1):.1f}x smaller)")
    return 0


def _budget(args):
    """The per-layer format goal the options ask for, or None."""
    from slim_onnx.budget import Budget

    given = dict(bits=args.budget, size_ratio=args.size_ratio, max_kl=args.max_kl, ppl_ratio=args.target_ppl_ratio)
    return Budget(**given) if any(v is not None for v in given.values()) else None


def _log(quiet: bool):
    return (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr))


# The SlimMatMul attributes inspect shows, with the kernel's default where it has one (docs/op-spec.md)
_SHOWN_ATTRIBUTES = {"K": None, "N": None, "group_size": None, "sparse": 1, "rank": 0, "adapter_format": "none"}


def _slim_attributes(node, path) -> dict:
    from slim_onnx.pipeline import InputError

    values = {}
    for name, default in _SHOWN_ATTRIBUTES.items():
        attribute = node.attributes.get(name)
        wanted = str if name == "adapter_format" else int
        if attribute is None and default is None:
            raise InputError(f"{path}: SlimMatMul node {node.name!r} has no attribute {name!r}: the model is damaged")
        value = default if attribute is None else attribute.value
        if type(value) is not wanted:
            raise InputError(f"{path}: SlimMatMul node {node.name!r}: attribute {name!r} must be "
                             f"{'a string' if wanted is str else 'an int'}, got {value!r}: the model is damaged")
        values[name] = value
    if values["rank"] and "adapter_format" not in node.attributes:
        raise InputError(f"{path}: SlimMatMul node {node.name!r} has rank {values['rank']} but no attribute "
                         "'adapter_format': the model is damaged")
    return values


def _inspect(args) -> int:
    import onnx_ir as ir

    from slim_onnx.passes import find_linear_layers
    from slim_onnx.pipeline import load_model, resolve_model_path
    from slim_onnx.schema import DOMAIN, SLIM_MATMUL

    path = resolve_model_path(args.model)
    model = load_model(path)
    rows = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain == DOMAIN and node.op_type == SLIM_MATMUL:
            a = _slim_attributes(node, path)
            nbytes = sum(v.const_value.nbytes for v in node.inputs[1:] if v is not None and v.const_value is not None)
            rows.append({"layer": node.name, "format": f"{'2:4' if a['sparse'] else 'dense'} int4 g{a['group_size']}"
                         + (f" + rank {a['rank']} {a['adapter_format']}" if a["rank"] else ""),
                         "shape": [a["K"], a["N"]], "bytes": nbytes})
    for layer in find_linear_layers(model):
        w = layer.weight.const_value
        rows.append({"layer": layer.name, "format": f"dense {w.dtype.name.lower()}", "shape": [layer.k, layer.n], "bytes": w.nbytes})
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    plan = _budget_plan(path.parent / "slim_report.json")
    if args.plot:
        if not plan:
            from slim_onnx.pipeline import InputError

            raise InputError(f"{path.parent / 'slim_report.json'} holds no per-layer plan to plot: --plot draws models "
                             "compressed with --budget, --size-ratio, --max-kl or --target-ppl-ratio")
        from slim_onnx.plot import save_plan_figure

        print(f"plot: {save_plan_figure(plan, args.plot)}", file=sys.stderr)
    if args.json:
        print(json.dumps({"layers": rows, "initializer_bytes": total} | ({"plan": plan} if plan else {}), indent=2))
        return 0
    for r in rows:
        print(f"{r['layer']:<48} {r['format']:<34} {r['shape'][0]:>6} x {r['shape'][1]:<6} {r['bytes'] / 2**20:>9.3f} MiB")
    print(f"{len(rows)} layers; all initializers: {total / 2**20:.1f} MiB")
    if plan:
        print("\nformats chosen per layer (slim_report.json): bytes; sensitivity = model divergence per unit of the "
              "layer's relative squared output error; damage = its predicted divergence; output error "
              "||XW - XW'|| / ||XW|| predicted (dense statistics) and measured (as compressed)")
        for p in plan:
            errors = "  ".join(f"{p[k]:.4f}" if p[k] is not None else "-" for k in ("predicted_output_error", "output_error"))
            print(f"{p['layer']:<48} {p['format']:<12} {p['bytes'] / 2**20:>9.3f} MiB  sensitivity {p['sensitivity']:<10.3g}"
                  f" damage {p['predicted_damage']:<10.3g} error {errors}")
    return 0


def _budget_plan(report_path: Path) -> list[dict]:
    """Each layer's planned format (compress --budget/--size-ratio/...) from the report beside the
    model, with its measured output error; empty when there is none."""
    try:
        layers = json.loads(report_path.read_text())["layers"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [{"layer": layer["layer"], **{k: layer["plan"][k] for k in ("format", "bytes", "sensitivity", "predicted_damage")},
             "predicted_output_error": layer["plan"].get("predicted_output_error"), "output_error": layer.get("output_error")}
            for layer in layers if isinstance(layer, dict) and "plan" in layer]


def _eval(args) -> int:
    from slim_onnx.evaluate import evaluate
    from slim_onnx.progress import progress_factory

    result = evaluate(args.model, args.text, args.reference, args.seqlen, args.windows, not args.no_library, args.tokenizer,
                      progress=progress_factory(not args.quiet), log=_log(args.quiet))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except KeyboardInterrupt:  # whatever was under way cleaned up after itself on the way out
        print("slim-onnx: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="slim-onnx", description="SLiM compression for ONNX models")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small Llama, export it with Optimum, compress it, evaluate both")
    demo.add_argument("--steps", type=int, default=1000, help="at most this many training steps (default 1000)")
    demo.add_argument("--seconds", type=float, default=60.0, help="at most this much training time (default 60)")
    demo.add_argument("--workdir", help="keep the models and texts here (default: a temporary folder)")
    _add_compress(sub)
    inspect = sub.add_parser("inspect", help="list a model's layers, their formats and bytes")
    inspect.add_argument("model")
    inspect.add_argument("--json", action="store_true")
    inspect.add_argument("--plot", metavar="FILE",
                         help="draw a budgeted model's bytes and sensitivity per layer into FILE (.png, .svg, .pdf; "
                              "needs matplotlib: pip install 'slim-onnx[plot]')")
    ev = sub.add_parser("eval", help="perplexity (causal LMs) and agreement with a reference model, via onnxruntime")
    ev.add_argument("model", help="a model folder or .onnx file")
    ev.add_argument("--text", required=True, help="evaluation text file or folder of .txt files")
    ev.add_argument("--reference", help="a reference model folder: KL divergence and top-1 agreement (cosine for encoders)")
    ev.add_argument("--seqlen", type=int, default=512)
    ev.add_argument("--windows", type=int, help="at most this many windows")
    ev.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    ev.add_argument("--no-library", action="store_true", help="run on stock onnxruntime (the fallback functions)")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from slim_onnx.algorithms.layer import CompressionError
    from slim_onnx.calibration import CalibrationError
    from slim_onnx.config import ConfigError
    from slim_onnx.genai import GenaiConfigError
    from slim_onnx.layout import FormatError
    from slim_onnx.pipeline import InputError
    from slim_onnx.schema import UnknownVariant

    try:
        if args.command == "demo":
            from slim_onnx.demo import run_demo

            return run_demo(steps=args.steps, seconds=args.seconds, workdir=args.workdir)
        if args.command == "compress":
            return _compress(args)
        if args.command == "eval":
            return _eval(args)
        return _inspect(args)
    except (InputError, CalibrationError, CompressionError, ConfigError, FormatError, GenaiConfigError,
            UnknownVariant) as error:
        print(f"slim-onnx: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:  # the machine's side (a full disk, a file that vanished), not the input's
        print(f"slim-onnx: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_FAILED


def _one_line(error: Exception) -> str:
    """Messages quoted from onnxruntime or transformers may span lines; the CLI's error is one."""
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
