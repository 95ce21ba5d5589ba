"""slim_onnx.compress: an ONNX model or Optimum export folder in, a compressed folder out.

  load (onnx-ir, external data mapped lazily) -> select_layers -> per transformer block
  (streaming.py; or all layers at once with calibration_mode="one-pass"): calibrate in
  onnxruntime, compress_layers (SlimConfig), replace them in the graph -> rewrite_graph
  (GraphOptions: passes/manager.py) ->
  write to a temporary folder with the export's other files and slim_report.json -> rename to the
  output folder.
The input is never modified and the output folder appears only when complete; an earlier output that
--overwrite replaces is renamed aside and deleted only once the new one is in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from slim_onnx.algorithms.layer import CompressionError, compress_layer
from slim_onnx.budget import Budget, plan_formats
from slim_onnx.calibration import (
    CalibrationError,
    TextCalibration,
    collect_statistics,
    load_tokenizer,
    model_feeds,
    npz_feeds,
    read_text,
    token_windows,
)
from slim_onnx.config import CALIBRATION_MODES, GraphOptions, SlimConfig
from slim_onnx.genai import past_head_size, read_genai_config, write_genai_folder
from slim_onnx.packing import pack_layer
from slim_onnx.streaming import stream_blocks
from slim_onnx.passes import GraphRewrite, ReplaceLinearLayersPass, find_linear_layers, rewrite_graph
from slim_onnx.passes.linear import LinearLayer, block_index
from slim_onnx.schema import DOMAIN, SLIM_MATMUL

MODEL_FILE_NAMES = ("model.onnx", "decoder_model_merged.onnx", "decoder_model.onnx")
REPORT_NAME = "slim_report.json"  # also what marks a folder as slim-onnx's output, which --overwrite may replace
LARGE_MODEL_BYTES = 1 << 30  # above this, or when the input had it, tensors go to external data


class InputError(ValueError):
    """Bad input: a message that says what is wrong and what to do. The CLI exits with 2."""


def resolve_model_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        for name in MODEL_FILE_NAMES:
            if (p / name).is_file():
                return p / name
        found = sorted(p.glob("*.onnx"))
        if len(found) == 1:
            return found[0]
        raise InputError(f"{p} holds {'no' if not found else 'several'} .onnx files: pass the model file itself")
    if not p.is_file():
        raise InputError(f"{p} does not exist")
    return p


def load_model(path: Path) -> ir.Model:
    try:
        return ir.load(path)
    except Exception as error:  # protobuf or external-data errors: the file is not a usable ONNX model
        raise InputError(f"{path} is not a readable ONNX model ({type(error).__name__}: {error}); is it truncated?") from None


def _check_output(src: Path, given_folder: bool, out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that is the input's folder or holds it, one inside an input
    folder, one that exists (unless --overwrite, and then only an earlier slim-onnx output folder),
    and one whose folder cannot be written. `out` is resolved (symbolic links followed). A folder
    beside an input .onnx file is fine: it adds a folder there and changes nothing. A model file that
    is a symbolic link has two folders, its own and its target's: both count."""
    for input_dir in dict.fromkeys((src.parent.resolve(), src.resolve().parent)):
        if out == input_dir:
            what = "the input folder" if given_folder else f"the folder of the input {src}"
            raise InputError(f"{out} is {what}: choose another output folder (the input is never modified)")
        if input_dir.is_relative_to(out):
            raise InputError(f"{out} holds the input {src}: choose an output folder that does not contain the input")
        if given_folder and out.is_relative_to(input_dir):
            raise InputError(f"{out} is inside the input folder {input_dir}: choose an output folder outside it")
    _check_replaceable(out, overwrite)
    _check_writable(out)


def _check_outside_output(out: Path, calibration) -> None:
    """The calibration data and tokenizer must not lie in the output folder, which --overwrite replaces."""
    paths = {"calibration data": calibration} if isinstance(calibration, (str, os.PathLike)) else {}
    if isinstance(calibration, TextCalibration):
        paths = {"calibration text": calibration.path, "tokenizer": calibration.tokenizer}
    for what, path in paths.items():
        if path is not None and Path(path).resolve().is_relative_to(out):
            raise InputError(f"the {what} {path} lies in the output folder {out}, which the output replaces: "
                             "move it or choose another output folder")


def _check_replaceable(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise InputError(f"{out} exists: choose another output folder or pass --overwrite")
    if not out.is_dir():
        raise InputError(f"{out} is not a folder: --overwrite replaces only an earlier slim-onnx output folder")
    if not (out / REPORT_NAME).is_file():
        raise InputError(f"{out} is not an earlier slim-onnx output (it has no {REPORT_NAME}): --overwrite replaces "
                         "only those; choose another output folder")


def _check_writable(out: Path) -> None:
    """Write and remove a probe file where the output's temporary folder will go (the nearest folder
    that exists: the missing ones are made at the end)."""
    existing = next(p for p in out.parents if p.exists())
    if not existing.is_dir():
        raise InputError(f"cannot create {out}: {existing} is not a folder")
    with _interrupts_deferred():
        try:
            handle, probe = tempfile.mkstemp(prefix=".slim-onnx-probe-", dir=existing)
        except OSError as error:
            raise InputError(f"cannot write in {existing} ({error.strerror}): choose an output folder where you "
                             "can write") from None
        os.close(handle)
        os.remove(probe)


def _check_patterns(include, exclude) -> None:
    for option, patterns in (("--include", include), ("--exclude", exclude)):
        for pattern in patterns or ():
            try:
                re.compile(pattern)
            except re.error as error:
                raise InputError(f"{option} {pattern!r} is not a valid regular expression: {error}") from None


def _warn_clamped_ranks(layers: list[LinearLayer], config: SlimConfig, log) -> None:
    """An absolute rank above a layer's min(K, N) is cut to it: say so once per distinct limit."""
    clamped: dict[int, list[str]] = {}
    for layer in layers:
        used = config.resolve_rank(layer.k, layer.n)
        if config.rank >= 1 and used < config.rank:
            clamped.setdefault(used, []).append(layer.name)
    for used, names in clamped.items():
        which = names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more layers"
        log(f"warning: rank {int(config.rank)} > min(K, N) = {used} for {which}: using {used}")


def _selected(layers, include, exclude, compress_lm_head: bool):
    chosen = []
    for layer in layers:
        if include and not any(re.search(p, layer.name) for p in include):
            continue
        if exclude and any(re.search(p, layer.name) for p in exclude):
            continue
        if not compress_lm_head and "lm_head" in layer.name:
            continue
        chosen.append(layer)
    return chosen


def _calibration_feeds(model: ir.Model, model_dir: Path, calibration, log, genai: dict | None = None):
    """The calibration's feed dicts (None without calibration); genai: the model folder's
    onnxruntime-genai config, whose head size sizes the empty past."""
    if calibration is None:
        return None
    if isinstance(calibration, (str, os.PathLike)) and str(calibration).endswith(".npz"):
        return npz_feeds(calibration, model)
    if isinstance(calibration, (str, os.PathLike)):
        calibration = TextCalibration(calibration)
    if isinstance(calibration, TextCalibration):
        text = read_text(calibration.path, log)
        tokenizer = load_tokenizer(calibration.tokenizer or model_dir)
        ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int64)
        windows = token_windows(ids, calibration.samples, calibration.seqlen, calibration.seed)
        return list(model_feeds(model, windows, past_head_size(genai)))
    return list(calibration)  # an iterable of feed dicts


def select_layers(model: ir.Model, config: SlimConfig, include, exclude, compress_lm_head: bool, log,
                  per_layer_formats: bool = False):
    """(every linear layer, the ones to compress): --include/--exclude/--no-lm-head applied, and layers
    that cannot be 2:4-sparse kept dense (an error when --include names them), unless formats are
    chosen per layer (a budget), which gives them dense 4-bit formats."""
    layers = find_linear_layers(model)
    if not layers:
        raise InputError("the model has no weight MatMul/Gemm layer to compress")
    explicit = set(include or ())
    kept = []
    for layer in _selected(layers, include, exclude, compress_lm_head):
        if config.sparsity == "2:4" and layer.k % 4 and not per_layer_formats:
            if any(re.fullmatch(p, layer.name) for p in explicit):
                raise InputError(f"layer {layer.name}: K={layer.k} is not divisible by 4, so it cannot be 2:4-sparse")
            log(f"warning: keeping {layer.name} dense (K={layer.k} is not divisible by 4)")
            continue
        kept.append(layer)
    if not kept:
        raise InputError("no layer left to compress after --include/--exclude")
    _warn_clamped_ranks(kept, config, log)
    return layers, kept


def calibrate(model: ir.Model, layers: list[LinearLayer], feeds: list | None, config: SlimConfig, progress=None,
              hessian: bool | None = None) -> dict:
    """The input statistics of `layers` (LayerStatistics by name) on `model` as it is now; none
    without feeds (configurations that need no statistics). hessian: whether to sum X^T X (default:
    whether `config` needs it)."""
    if feeds is None:
        return {}
    hessian = config.needs_hessian if hessian is None else hessian
    return collect_statistics(model, layers, feeds, hessian=hessian, progress=progress, device=config.device,
                              providers=_calibration_providers(config))


def compress_layers(layers: list[LinearLayer], stats: dict, config: SlimConfig, done=None,
                    plan: dict | None = None) -> tuple[dict, list[dict]]:
    """(SlimWeights by layer name, reports) of `layers`, with their calibration statistics by name:
    each compressed (algorithms) and packed (packing), with `config`, or the format `plan` (budget.LayerPlan
    by name) chose for it; done(layer, report) is called as each is finished."""
    weights, reports = {}, []
    for layer in layers:
        w, bias = layer.weight_array(), layer.bias_array()
        for value in (layer.weight, layer.bias):  # the float32 copies are what is used: unmap the file
            if value is not None and isinstance(value.const_value, ir.ExternalTensor):
                value.const_value.release()
        chosen = plan.get(layer.name) if plan else None
        quantized = compress_layer(w, stats.get(layer.name), chosen.config if chosen else config, layer.name, bias)
        del w
        weights[layer.name] = pack_layer(quantized)
        reports.append(quantized.report | {"bytes_packed": weights[layer.name].nbytes()}
                       | ({"plan": chosen.report()} if chosen else {}))
        if done:
            done(layer, reports[-1])
    return weights, reports


def _layer_logger(total: int, log, bar):
    """done() for compress_layers: advances the progress bar, or logs a line per layer."""
    finished = itertools.count(1)

    def done(layer: LinearLayer, report: dict) -> None:
        if bar:
            bar()
            return
        error = report.get("output_error")  # needs calibration statistics; else the weight error
        what = f"output error {error:.4f}" if error is not None else f"weight error {report['weight_error']:.4f}"
        log(f"[{next(finished)}/{total}] {layer.name} {layer.k}x{layer.n}: {what}")

    return done


def compress(
    model_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: SlimConfig = SlimConfig(),
    calibration=None,
    *,
    graph: GraphOptions = GraphOptions(),
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    compress_lm_head: bool = True,
    overwrite: bool = False,
    calibration_mode: str = "stream",
    budget: Budget | None = None,
    log=None,
    progress=None,
) -> dict:
    """Compress a model; returns the report also written to output_dir/slim_report.json.

    calibration: a text file or folder (TextCalibration for options), an .npz of inputs, an
    iterable of feed dicts, or None (only for configurations that need no statistics).
    graph: how the graph is written (accuracy level, fusions: GraphOptions).
    include, exclude: regexes on layer (node) names; compress_lm_head: False keeps lm_head dense.
    calibration_mode: "stream" (default): block by block, each block's statistics taken on the
    output of the earlier blocks compressed (as SparseGPT and SLiM do), in one pass over the model
    (streaming.py); "one-pass": every layer's statistics from the dense model at once.
    budget: choose each layer's format (budget.py) for a size (average bits per compressed weight, or a
    fraction of their float16 bytes: the least predicted damage within it) or a quality on the
    calibration text (largest KL or perplexity ratio: the smallest plan found that meets it);
    `config` gives everything but the sparsity and adapter rank.
    log: called with each message (default: print to stderr); progress: an optional factory
    `progress(label, total)` returning a callable advanced once per calibration batch and per layer,
    which replaces the per-layer and per-block messages.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    start = time.perf_counter()
    if calibration_mode not in CALIBRATION_MODES:
        raise InputError(f"calibration_mode {calibration_mode!r}: expected one of {', '.join(CALIBRATION_MODES)}")
    src = resolve_model_path(model_path)
    out = Path(output_dir).resolve()
    _check_output(src, Path(model_path).is_dir(), out, overwrite)
    _check_outside_output(out, calibration)
    _check_patterns(include, exclude)
    graph = _loadable(graph, log)
    model = load_model(src)
    bytes_before = _initializer_bytes(model)
    ops = {(n.domain or "", n.op_type) for n in ir.traversal.RecursiveGraphIterator(model.graph)}
    if (DOMAIN, SLIM_MATMUL) in ops:
        raise InputError(f"{src} is already compressed (it holds SlimMatMul nodes)")
    if ("com.microsoft", "MatMulNBits") in ops:
        raise InputError(f"{src} is already quantized (MatMulNBits): its weights cannot be recompressed well. Compress the "
                         "float model instead (onnxruntime-genai: build it with `-p fp32` or `-p fp16`)")
    genai = read_genai_config(src.parent)
    layers, kept = select_layers(model, config, include, exclude, compress_lm_head, log, per_layer_formats=budget is not None)
    feeds = None
    if config.needs_statistics:
        feeds = _calibration_feeds(model, src.parent, calibration, log, genai)
        if feeds is None:
            raise InputError("this configuration needs calibration data: pass --calib TEXT_OR_NPZ")
    had_external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    inside = [layer.name for layer in kept if layer.graph is not model.graph]
    if feeds is not None and inside:
        raise InputError(f"{len(inside)} layers ({inside[0]}, ...) are inside If/Loop subgraphs, which calibration "
                         "cannot run (Optimum's merged decoder_model_merged.onnx): compress the export's model.onnx "
                         "(optimum-cli export onnx ... --no-post-process), or exclude them with --exclude")
    mode = calibration_mode if feeds is not None else "none"
    if budget is not None and feeds is None:
        raise InputError("per-layer formats (--budget, --size-ratio, --max-kl, --target-ppl-ratio) need calibration "
                         "data to predict each layer's damage: pass --calib TEXT_OR_NPZ")

    weights, reports = {}, []
    blocks = transformer_blocks(kept) if mode == "stream" else [kept]
    layer_bar = progress("compressing", len(kept)) if progress and mode != "stream" else None
    done = _layer_logger(len(kept), log, layer_bar)

    plan = None

    def compress_block(block: list[LinearLayer], stats: dict) -> None:
        block_weights, block_reports = compress_layers(block, stats, config, done, plan)
        # in place; the clean-up after it (sort, unused nodes, fallback functions) is rewrite_graph's
        ReplaceLinearLayersPass(block_weights, graph.accuracy_level, block)(model)
        weights.update(block_weights)
        reports.extend(block_reports)

    with _work_folder(out) as work:
        if budget is not None:
            chosen = plan_formats(src, model, kept, feeds, config, budget, work, providers=_calibration_providers(config),
                                  same_format_for_siblings=graph.merge_siblings, log=log)
            budget_report = chosen.summary(sum(layer.k * layer.n for layer in kept))
            log(f"formats for a budget of {chosen.budget / 2**20:.2f} MiB: {chosen.bytes / 2**20:.2f} MiB chosen, "
                + ", ".join(f"{label} x{count}" for label, count in budget_report["formats"].items()))
            plan = chosen.layers
        # a plan may give adapters (needing H) where the base configuration has none
        hessian = config.needs_hessian or any(p.config.needs_hessian for p in (plan or {}).values())
        streaming = None
        if mode == "stream":
            streaming = stream_blocks(
                model, blocks, feeds, compress_block, hessian=hessian, device=config.device, workdir=work,
                spill_weights=had_external, providers=_calibration_providers(config),
                log=(lambda msg: None) if progress else log,
                step=progress("compressing blocks", len(blocks)) if progress else None,
            )
        else:
            if feeds is not None and not progress:
                log(f"calibrating {len(kept)} layers on {len(feeds)} batches")
            batch_bar = progress("calibrating", len(feeds)) if progress and feeds is not None else None
            compress_block(kept, calibrate(model, kept, feeds, config, batch_bar, hessian))
        rewrite = rewrite_graph(model, graph)
        _log_rewrite(rewrite, log)
        report = {
            "model": str(src),
            "config": dataclasses.asdict(config),
            "graph": dataclasses.asdict(graph),
            "calibration": mode,
            "layers": reports,
            "kept_dense": [l.name for l in layers if l.name not in weights],
            **dataclasses.asdict(rewrite),
            "totals": {
                "layers": len(reports),
                "bytes_float16": sum(r["bytes_float16"] for r in reports),
                "bytes_packed": sum(r["bytes_packed"] for r in reports),
                "model_bytes_before": bytes_before,
                "model_bytes_after": _initializer_bytes(model),
                "seconds": round(time.perf_counter() - start, 1),
            },
        }
        if streaming is not None:
            report["streaming"] = streaming
        if plan is not None:
            report["budget"] = budget_report
        _write_output(model, src, out, report, had_external, overwrite, log, genai)
    return report


def _calibration_providers(config: SlimConfig) -> tuple[str, ...]:
    """Where the streamed blocks run: onnxruntime's CUDA provider with --device cuda when
    onnxruntime-gpu is installed (our library registers its CUDA kernels there too), else the CPU."""
    import onnxruntime

    if config.device.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ("CUDAExecutionProvider", "CPUExecutionProvider")
    return ("CPUExecutionProvider",)


@contextlib.contextmanager
def _work_folder(out: Path):
    """A scratch folder for cached activations and packed weights, beside the output (which may be
    on a disk with more room than the temporary folder, often memory-backed); always removed."""
    existing = next(p for p in out.parents if p.exists())
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=existing))
    try:
        yield work
    finally:
        with _interrupts_deferred():
            shutil.rmtree(work, ignore_errors=True)


def _loadable(graph: GraphOptions, log) -> GraphOptions:
    """`graph` without the attention fusion when this onnxruntime could not load its fallback."""
    if graph.fuse_attention and not _runtime_takes_fused_attention():
        log(f"warning: not fusing attention: onnxruntime {_onnxruntime_version()} cannot load the fused model's "
            f"fallback (GroupQueryAttention with attention_bias needs onnxruntime >= 1.22)")
        return dataclasses.replace(graph, fuse_attention=False)
    return graph


def _log_rewrite(rewrite: GraphRewrite, log) -> None:
    for e in rewrite.embeddings:
        log(f"embedding {e.name} {e.rows}x{e.hidden}: int8, group {e.group_size} "
            f"({e.bytes_before / 2**20:.1f} -> {e.bytes_after / 2**20:.1f} MiB)")
    if rewrite.attention_fused:
        log(f"fused {rewrite.attention_fused} attention layers into GroupQueryAttention")
    if rewrite.merged_siblings:
        log(f"merged {sum(map(len, rewrite.merged_siblings))} layers that share their input into "
            f"{len(rewrite.merged_siblings)} SlimMatMul nodes")
    if rewrite.swiglu_fused:
        log(f"folded {rewrite.swiglu_fused} SwiGLU activations into their gate/up SlimMatMul")
    if rewrite.attention_packed:
        log(f"fed {rewrite.attention_packed} attention layers their merged q/k/v product and rotary caches directly")
    if rewrite.float16_values:
        log(f"converted {rewrite.float16_values} float32 values to float16 for the CUDA provider (rotary angles kept float32)")


def transformer_blocks(layers: list[LinearLayer]) -> list[list[LinearLayer]]:
    """Consecutive layers grouped by the block index in their names (`/model/layers.3/...`,
    `/transformer/h.3/...`, `/encoder/layer.3/...`); a layer outside any block is its own group."""
    groups: list[list[LinearLayer]] = []
    previous = object()
    for layer in layers:
        key = block_index(layer.name)
        if key is None or key != previous:
            groups.append([])
        groups[-1].append(layer)
        previous = key
    return groups


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _runtime_takes_fused_attention() -> bool:
    """onnxruntime >= 1.22: the first whose GroupQueryAttention takes attention_bias (input 10)."""
    major, minor = (int(x) for x in _onnxruntime_version().split(".")[:2])
    return (major, minor) >= (1, 22)


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold a Ctrl-C until the block has run: its steps must not be left half done. (Signal handlers
    can only be set in the main thread; elsewhere no Ctrl-C arrives anyway.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received and callable(previous):
        previous(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt


def _genai_library(log) -> str | None:
    """Our kernel library for an onnxruntime-genai folder to carry, or None (with a warning) where
    it is not built: the folder then runs the fallback functions."""
    from slim_onnx.runtime import LibraryNotFoundError, library_path

    try:
        return library_path()
    except LibraryNotFoundError as error:
        log(f"warning: the onnxruntime-genai folder will run SlimMatMul as standard ops (slower): {error}")
        return None


def _write_output(
    model: ir.Model, src: Path, out: Path, report: dict, had_external: bool, overwrite: bool, log, genai: dict | None = None
) -> None:
    """Write everything into a temporary folder beside `out`, then move it into place. On failure
    the temporary folder and the folders made for it are removed. `genai`: the input's
    onnxruntime-genai config, written back naming our library (copied in)."""
    made = [folder for folder in out.parents if not folder.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if src.parent.is_dir():
            for item in src.parent.iterdir():  # tokenizer, config, generation config, ...
                if item.is_file() and item.suffix != ".onnx" and not item.name.endswith((".onnx_data", ".onnx.data")) and item.name != REPORT_NAME:
                    shutil.copy2(item, tmp / item.name)
        target = tmp / src.name
        if had_external or report["totals"]["model_bytes_after"] > LARGE_MODEL_BYTES:
            ir.save(model, target, external_data=src.name + "_data")
        else:
            ir.save(model, target)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
        if genai is not None:
            write_genai_folder(tmp, genai, _genai_library(log))
        _check_replaceable(out, overwrite)  # again: something may have appeared there during the work
        _move_into_place(tmp, out, log)
    except BaseException:
        with _interrupts_deferred():
            shutil.rmtree(tmp, ignore_errors=True)
            for folder in made:
                with contextlib.suppress(OSError):  # not empty: something else was put there meanwhile
                    folder.rmdir()
        raise


def _move_into_place(tmp: Path, out: Path, log) -> None:
    """Rename the finished folder to `out`. An earlier output there is renamed aside first and
    deleted only once the new one is in place, so `out` always holds one of the two."""
    with _interrupts_deferred():
        if not out.exists():
            tmp.rename(out)
            return
        old = tmp.with_name(tmp.name + ".old")
        out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)
            raise
        try:
            shutil.rmtree(old)
        except OSError as error:
            log(f"warning: {out} is replaced, but its previous contents, now in {old}, could not all be deleted "
                f"({error})")


__all__ = ["CalibrationError", "CompressionError", "InputError", "calibrate", "compress", "compress_layers", "select_layers"]
