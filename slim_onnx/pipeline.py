"""slim_onnx.compress: an ONNX model or Optimum export folder in, a compressed folder out.

  load (onnx-ir, external data mapped lazily) -> find linear layers -> calibrate in onnxruntime ->
  compress each layer (SlimConfig) -> rewrite the graph (passes) -> write to a temporary folder,
  copy the export's other files, write slim_report.json -> rename to the output folder.
The input is never modified and the output folder appears only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from slim_onnx.algorithms.layer import CompressionError, compress_layer
from slim_onnx.calibration import CalibrationError, TextCalibration, collect_statistics, model_feeds, npz_feeds, read_text, token_windows
from slim_onnx.config import SlimConfig
from slim_onnx.schema import DOMAIN, SLIM_MATMUL
from slim_onnx.passes import compress_graph, find_linear_layers
from slim_onnx.passes import fuse_attention as fuse_attention_layers
from slim_onnx.passes import fuse_skip_rms_norm, fuse_swiglu, merge_sibling_layers, pack_attention_inputs
from slim_onnx.passes import quantize_embeddings as quantize_embedding_tables
from slim_onnx.passes.linear import LinearLayer

MODEL_FILE_NAMES = ("model.onnx", "decoder_model_merged.onnx", "decoder_model.onnx")
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


def _calibration_feeds(model: ir.Model, model_dir: Path, calibration):
    if calibration is None:
        return None
    if isinstance(calibration, (str, os.PathLike)) and str(calibration).endswith(".npz"):
        return npz_feeds(calibration)
    if isinstance(calibration, (str, os.PathLike)):
        calibration = TextCalibration(calibration)
    if isinstance(calibration, TextCalibration):
        from transformers import AutoTokenizer

        tokenizer_dir = calibration.tokenizer or model_dir
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        except Exception as error:
            raise CalibrationError(f"no tokenizer in {tokenizer_dir} ({error}); pass --tokenizer PATH") from None
        ids = np.asarray(tokenizer(read_text(calibration.path))["input_ids"], dtype=np.int64)
        return list(model_feeds(model, token_windows(ids, calibration.samples, calibration.seqlen, calibration.seed)))
    return list(calibration)  # an iterable of feed dicts


def compress(
    model_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: SlimConfig = SlimConfig(),
    calibration=None,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    compress_lm_head: bool = True,
    accuracy_level: int = 4,
    overwrite: bool = False,
    sequential: bool = False,
    fuse_attention: bool = True,
    quantize_embeddings: bool = True,
    merge_siblings: bool = True,
    log=None,
    progress=None,
) -> dict:
    """Compress a model; returns the report also written to output_dir/slim_report.json.

    calibration: a text file or folder (TextCalibration for options), an .npz of inputs, an
    iterable of feed dicts, or None (only for configurations that need no statistics).
    sequential: calibrate each transformer block on the model whose earlier blocks are already
    compressed (as SparseGPT and SLiM do); one calibration pass per block.
    fuse_attention: afterwards, fuse each cached decoder attention layer into one
    GroupQueryAttention node (passes/attention.py), and each residual Add with the RMSNorm after it
    (passes/norm.py); what does not match stays as exported.
    quantize_embeddings: store token-embedding tables that nothing else reads as int8 rows with
    group scales (passes/embedding.py).
    merge_siblings: one SlimMatMul node (and a Split) for layers that read the same activation, such
    as q/k/v and gate/up (passes/siblings.py), and the SwiGLU after a merged gate/up folded into
    its node (passes/swiglu.py); with fuse_attention too, the merged q/k/v product feeds the
    attention directly, rotary included (passes/packed_attention.py).
    log: called with each message (default: print to stderr); progress: an optional factory
    `progress(label, total)` returning a callable advanced once per calibration batch and per layer,
    which replaces the per-layer messages.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    start = time.perf_counter()
    src = resolve_model_path(model_path)
    out = Path(output_dir)
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists: choose another output folder or pass --overwrite")
    if out.resolve() == src.parent.resolve():
        raise InputError("the output folder must differ from the input folder (the input is never modified)")
    model = load_model(src)
    bytes_before = _initializer_bytes(model)
    if any(n.domain == DOMAIN and n.op_type == SLIM_MATMUL for n in ir.traversal.RecursiveGraphIterator(model.graph)):
        raise InputError(f"{src} is already compressed (it holds SlimMatMul nodes)")
    layers = find_linear_layers(model)
    if not layers:
        raise InputError(f"{src} has no weight MatMul/Gemm layer to compress")
    chosen = _selected(layers, include, exclude, compress_lm_head)
    explicit = set(include or ())
    kept = []
    for layer in chosen:
        if config.sparsity == "2:4" and layer.k % 4:
            if any(re.fullmatch(p, layer.name) for p in explicit):
                raise InputError(f"layer {layer.name}: K={layer.k} is not divisible by 4, so it cannot be 2:4-sparse")
            log(f"warning: keeping {layer.name} dense (K={layer.k} is not divisible by 4)")
            continue
        kept.append(layer)
    if not kept:
        raise InputError("no layer left to compress after --include/--exclude")

    feeds = None
    if config.needs_statistics:
        feeds = _calibration_feeds(model, src.parent, calibration)
        if feeds is None:
            raise InputError("this configuration needs calibration data: pass --calib TEXT_OR_NPZ")
    had_external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())

    # One pass over all layers, or (sequential) block by block, each block calibrated on the model
    # whose earlier blocks are already compressed, so that its statistics see their error.
    groups = transformer_blocks(kept) if sequential and feeds is not None else [kept]
    weights, reports = {}, []
    layer_bar = progress("compressing", len(kept)) if progress else None
    for group in groups:
        stats = {}
        if feeds is not None:
            if not progress:
                log(f"calibrating {len(group)} layers on {len(feeds)} batches")
            batch_bar = progress("calibrating", len(feeds)) if progress and len(groups) == 1 else None
            stats = collect_statistics(model, group, feeds, hessian=config.needs_hessian, progress=batch_bar)
        block_weights = {}
        for layer in group:
            result = compress_layer(layer.weight_array(), stats.get(layer.name), config, layer.name, layer.bias_array())
            block_weights[layer.name] = result.weights
            reports.append(result.report)
            if layer_bar:
                layer_bar()
            else:
                error = result.report.get("output_error")  # needs calibration statistics; else the weight error
                what = f"output error {error:.4f}" if error is not None else f"weight error {result.report['weight_error']:.4f}"
                log(f"[{len(reports)}/{len(kept)}] {layer.name} {layer.k}x{layer.n}: {what}")
        del stats  # bounded memory: one block's statistics at a time in sequential mode
        model = compress_graph(model, block_weights, accuracy_level)
        weights.update(block_weights)
    embeddings = quantize_embedding_tables(model) if quantize_embeddings else []
    for e in embeddings:
        log(f"embedding {e.name} {e.rows}x{e.hidden}: int8, group {e.group_size} "
            f"({e.bytes_before / 2**20:.1f} -> {e.bytes_after / 2**20:.1f} MiB)")
    if fuse_attention and not _runtime_takes_fused_attention():
        log(f"warning: not fusing attention: onnxruntime {_onnxruntime_version()} cannot load the fused model's "
            f"fallback (GroupQueryAttention with attention_bias needs onnxruntime >= 1.22)")
        fuse_attention = False
    fused = fuse_attention_layers(model) if fuse_attention else 0
    if fused:
        log(f"fused {fused} attention layers into GroupQueryAttention")
    norms = fuse_skip_rms_norm(model) if fuse_attention else 0
    merged = merge_sibling_layers(model) if merge_siblings else []
    if merged:
        log(f"merged {sum(map(len, merged))} layers that share their input into {len(merged)} SlimMatMul nodes")
    swiglus = fuse_swiglu(model) if merged else 0
    if swiglus:
        log(f"folded {swiglus} SwiGLU activations into their gate/up SlimMatMul")
    packed = pack_attention_inputs(model) if fused and merged else 0
    if packed:
        log(f"fed {packed} attention layers their merged q/k/v product and rotary caches directly")

    report = {
        "model": str(src),
        "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "sequential": len(groups) > 1,
        "layers": reports,
        "kept_dense": [l.name for l in layers if l.name not in weights],
        "attention_fused": fused,
        "skip_norms_fused": norms,
        "embeddings": [dataclasses.asdict(e) for e in embeddings],
        "merged_siblings": merged,
        "swiglu_fused": swiglus,
        "attention_packed": packed,
        "totals": {
            "layers": len(reports),
            "bytes_float16": sum(r["bytes_float16"] for r in reports),
            "bytes_packed": sum(r["bytes_packed"] for r in reports),
            "model_bytes_before": bytes_before,
            "model_bytes_after": _initializer_bytes(model),
            "seconds": round(time.perf_counter() - start, 1),
        },
    }
    _write_output(model, src, out, report, had_external, overwrite)
    return report


_BLOCK_INDEX = re.compile(r"(?:layers|layer|blocks|block|h)[./_](\d+)(?:[./_]|$)")


def transformer_blocks(layers: list[LinearLayer]) -> list[list[LinearLayer]]:
    """Consecutive layers grouped by the block index in their names (`/model/layers.3/...`,
    `/transformer/h.3/...`, `/encoder/layer.3/...`); a layer outside any block is its own group."""
    groups: list[list[LinearLayer]] = []
    previous = object()
    for layer in layers:
        match = _BLOCK_INDEX.search(layer.name)
        key = match.group(1) if match else None
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


def _write_output(model: ir.Model, src: Path, out: Path, report: dict, had_external: bool, overwrite: bool) -> None:
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        if src.parent.is_dir():
            for item in src.parent.iterdir():  # tokenizer, config, generation config, ...
                if item.is_file() and item.suffix != ".onnx" and not item.name.endswith((".onnx_data", ".onnx.data")) and item.name != "slim_report.json":
                    shutil.copy2(item, tmp / item.name)
        target = tmp / src.name
        if had_external or report["totals"]["model_bytes_after"] > LARGE_MODEL_BYTES:
            ir.save(model, target, external_data=src.name + "_data")
        else:
            ir.save(model, target)
        (tmp / "slim_report.json").write_text(json.dumps(report, indent=2))
        if out.exists() and overwrite:
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["CalibrationError", "CompressionError", "InputError", "compress"]
