"""End-to-end speed of a decoder export: dense vs onnxruntime's MatMulNBits vs SlimMatMul, one run.

The MatMulNBits model is made here from the dense export with onnxruntime's own MatMulNBitsQuantizer
(4-bit, block 128, symmetric, accuracy_level 4). `slim-onnx compress` also fuses the attention into
GroupQueryAttention (unless --no-fuse-attention); so that the linear layers are compared alone, both
peers are also run with the same fusion applied ("+GQA" rows), beside the peers as exported. For each model: prefill = one run over `--prefill`
tokens with an empty past; decode = `--decode` single-token steps feeding the KV cache back (greedy),
reported as tokens/s. Medians over `--repeats`, the models taking turns; all sessions share one
global thread pool of `--threads`.

    python tools/bench_model.py --dense exported/ --slim slim/
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

import slim_onnx
from slim_onnx.config import GraphOptions
from slim_onnx.passes import rewrite_graph
from slim_onnx.pipeline import resolve_model_path


def matmul_nbits_model(dense: Path, out: Path) -> Path:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # a line per node otherwise
    q = MatMulNBitsQuantizer(onnx.load(str(dense)), bits=4, block_size=128, is_symmetric=True, accuracy_level=4)
    q.process()
    out.mkdir()
    path = out / "model.onnx"
    q.model.save_model_to_file(str(path), True)
    return path


def attention_fused_model(src: Path, out: Path) -> Path:
    """`src` with the attention and norm fusions `slim-onnx compress` applies (passes/manager.py)."""
    model = ir.load(src)
    if not rewrite_graph(model, GraphOptions.only("fuse_attention", "fuse_norms")).attention_fused:
        raise SystemExit(f"{src}: no attention layer matched the GroupQueryAttention fusion")
    out.mkdir()
    ir.save(model, out / "model.onnx", external_data="model.onnx_data")
    return out / "model.onnx"


class Decoder:
    def __init__(self, path: Path, library: bool):
        so = slim_onnx.session_options() if library else ort.SessionOptions()
        so.use_per_session_threads = False
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def _feeds(self, ids: np.ndarray, past: dict, past_len: int) -> dict:
        seq = ids.shape[1]
        feeds = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((1, past_len + seq), dtype=np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(past_len, past_len + seq, dtype=np.int64)[None]
        for name, info in self.inputs.items():
            if name.startswith("past_key_values"):
                feeds[name] = past.get(name, np.zeros((1, info.shape[1], 0, info.shape[3]), dtype=np.float32))
        return feeds

    def run(self, prompt: np.ndarray, steps: int, ort_values: bool) -> tuple[float, float]:
        """(prefill seconds, decode tokens per second). ort_values: the cache stays in onnxruntime's
        OrtValues from step to step (as a deployment with IO binding keeps it) instead of being
        copied out to numpy and back in on every step (as ORTModelForCausalLM does on the CPU)."""
        def step(feeds: dict) -> dict:
            if not ort_values:
                return dict(zip(self.outputs, self.session.run(None, feeds)))
            feeds = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
            return dict(zip(self.outputs, self.session.run_with_ort_values(self.outputs, feeds)))

        def last_token(out: dict) -> np.ndarray:
            logits = out["logits"].numpy() if ort_values else out["logits"]
            return logits[:, -1:].argmax(-1).astype(np.int64)

        t0 = time.perf_counter()
        out = step(self._feeds(prompt, {}, 0))
        token = last_token(out)
        prefill = time.perf_counter() - t0
        past_len = prompt.shape[1]
        t0 = time.perf_counter()
        for _ in range(steps):
            past = {n.replace("present", "past_key_values"): v for n, v in out.items() if n.startswith("present")}
            out = step(self._feeds(token, past, past_len))
            token = last_token(out)
            past_len += 1
        return prefill, steps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", required=True, help="the dense export folder")
    parser.add_argument("--slim", required=True, help="the compressed folder")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    ort.capi._pybind_state.set_global_thread_pool_sizes(args.threads, 1)

    with tempfile.TemporaryDirectory() as tmp:
        dense = resolve_model_path(args.dense)
        nbits = matmul_nbits_model(dense, Path(tmp) / "nbits")
        models = {
            "dense fp32": Decoder(dense, False),
            "MatMulNBits acc4": Decoder(nbits, False),
            "dense fp32 +GQA": Decoder(attention_fused_model(dense, Path(tmp) / "dense_gqa"), False),
            "MatMulNBits acc4 +GQA": Decoder(attention_fused_model(nbits, Path(tmp) / "nbits_gqa"), False),
            "SlimMatMul": Decoder(resolve_model_path(args.slim), True),
        }
        vocab = models["dense fp32"].session.get_outputs()[0].shape[-1] or 1000
        prompt = np.random.default_rng(0).integers(3, min(int(vocab), 30000), size=(1, args.prefill), dtype=np.int64)
        runs = {(name, mode): [] for name in models for mode in (False, True)}
        for name, m in models.items():
            m.run(prompt[:, :16], 2, False)  # warm-up
        for _ in range(args.repeats):
            for (name, mode), rs in runs.items():
                rs.append(models[name].run(prompt, args.decode, mode))
    results = {
        name: {
            "prefill_ms": statistics.median(r[0] for r in runs[name, False]) * 1e3,
            "decode_tok_s": statistics.median(r[1] for r in runs[name, False]),
            "decode_tok_s_ortvalue_cache": statistics.median(r[1] for r in runs[name, True]),
        }
        for name in models
    }
    print(f"prefill {args.prefill} tokens, decode {args.decode} tokens, {args.threads} threads (medians of {args.repeats}); "
          "decode with the cache as numpy arrays (ORTModelForCausalLM on CPU) and kept as OrtValues")
    print(f"{'model':<24}{'prefill ms':>12}{'decode tok/s':>14}{'OrtValue cache':>16}")
    for name, r in results.items():
        print(f"{name:<24}{r['prefill_ms']:>12.1f}{r['decode_tok_s']:>14.1f}{r['decode_tok_s_ortvalue_cache']:>16.1f}")
    s = results["SlimMatMul"]
    for peer in (name for name in results if name != "SlimMatMul"):
        p = results[peer]
        print(f"SlimMatMul vs {peer:<22} prefill {p['prefill_ms'] / s['prefill_ms']:.2f}x, decode "
              f"{s['decode_tok_s'] / p['decode_tok_s']:.2f}x, with the OrtValue cache "
              f"{s['decode_tok_s_ortvalue_cache'] / p['decode_tok_s_ortvalue_cache']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
