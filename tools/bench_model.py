"""End-to-end speed of a decoder export: dense vs onnxruntime's MatMulNBits vs SlimMatMul, one run.

CPU (default). The MatMulNBits model is made here from the dense export with onnxruntime's own
MatMulNBitsQuantizer (4-bit, block 128, symmetric, accuracy_level 4). `slim-onnx compress` also fuses the attention into
GroupQueryAttention (unless --no-fuse-attention); so that the linear layers are compared alone, both
peers are also run with the same fusion applied ("+GQA" rows), beside the peers as exported. For each model: prefill = one run over `--prefill`
tokens with an empty past; decode = `--decode` single-token steps feeding the KV cache back (greedy),
reported as tokens/s. Medians over `--repeats`, the models taking turns; all sessions share one
global thread pool of `--threads`.

    python tools/bench_model.py --dense exported/ --slim slim/ --also budget0.30=slim_030/

`--also LABEL=FOLDER` (repeatable) adds more compressed models, such as per-layer budgets
(`compress --size-ratio`): they take turns with the others, and every model's weight bytes are
printed beside its speed, since a budget buys accuracy with bytes that may run slower (a dense 4-bit
layer moves more bytes than a 2:4 one).

CUDA (--device cuda, onnxruntime-gpu): a float16 export with KV cache generating greedily through IO
binding, as a GPU deployment runs it: each step's `present` outputs stay in device memory and are
bound as the next step's past, the logits stay there too (a second small session takes their
argmax), and only the next token's id comes back to the host. For each batch size in `--batch`:
prefill of `--prefill` tokens, then `--decode` single-token steps, as tokens/s (medians of
`--repeats`). Variants: the dense export; MatMulNBits (made from it as above unless `--nbits` gives
it) with onnxruntime's default CUDA kernels, and again with ORT_FPA_INTB_GEMM=1 (its fpA_intB GEMM);
SlimMatMul (`--slim`) and SlimMatMul with adapters (`--slim-adapters`), compressed with
--no-fuse-attention (the fused attention op is CPU-only). Each variant runs in its own process (the
environment variable may be read once per process; a crash or hang, cut at `--variant-timeout`,
costs that variant only) and reports where onnxruntime placed its nodes. tools/make_bench_models.py
builds such models; `--dry-run` runs this path on CPUExecutionProvider, to check the script.

    python tools/bench_model.py --device cuda --dense m/dense --nbits m/nbits --slim m/slim \
        --slim-adapters m/slim_adapters --batch 1 16 --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper

import slim_onnx
from slim_onnx.config import GraphOptions
from slim_onnx.generate import CachedDecoder
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


def weight_bytes(path: Path) -> int:
    """The bytes of a model's initializers (external data counted, not read)."""
    return sum(v.const_value.nbytes for v in ir.load(path).graph.initializers.values() if v.const_value is not None)


def attention_fused_model(src: Path, out: Path) -> Path:
    """`src` with the attention and norm fusions `slim-onnx compress` applies (passes/manager.py)."""
    model = ir.load(src)
    if not rewrite_graph(model, GraphOptions.only("fuse_attention", "fuse_norms")).attention_fused:
        raise SystemExit(f"{src}: no attention layer matched the GroupQueryAttention fusion")
    out.mkdir()
    ir.save(model, out / "model.onnx", external_data="model.onnx_data")
    return out / "model.onnx"


class Decoder(CachedDecoder):
    """A decoder timed as it generates, on the global thread pool all sessions share."""

    def __init__(self, path: Path, library: bool):
        so = ort.SessionOptions()
        so.use_per_session_threads = False
        super().__init__(path, library=library, options=so)

    def run(self, prompt: np.ndarray, steps: int, ort_values: bool) -> tuple[float, float]:
        """(prefill seconds, decode tokens per second). ort_values: the cache stays in onnxruntime's
        OrtValues from step to step (as a deployment with IO binding keeps it) instead of being
        copied out to numpy and back in on every step (as ORTModelForCausalLM does on the CPU)."""
        def step(feeds: dict) -> dict:
            if not ort_values:
                return dict(zip(self.outputs, self.session.run(None, feeds)))
            return self.run_ort_values(feeds)

        def last_token(out: dict) -> np.ndarray:
            logits = out["logits"].numpy() if ort_values else out["logits"]
            return logits[:, -1:].argmax(-1).astype(np.int64)

        t0 = time.perf_counter()
        out = step(self.feeds(prompt[0], self.empty_past(), 0))
        token = last_token(out)
        prefill = time.perf_counter() - t0
        past_len = prompt.shape[1]
        t0 = time.perf_counter()
        for _ in range(steps):
            past = {n.replace("present", "past_key_values"): v for n, v in out.items() if n.startswith("present")}
            out = step(self.feeds(token[0], past, past_len))
            token = last_token(out)
            past_len += 1
        return prefill, steps / (time.perf_counter() - t0)


CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
CUDA_VARIANTS = {  # name: (model, with our library, extra environment)
    "dense fp16": ("dense", False, {}),
    "MatMulNBits": ("nbits", False, {}),
    "MatMulNBits fpA_intB": ("nbits", False, {"ORT_FPA_INTB_GEMM": "1"}),
    "SlimMatMul": ("slim", True, {}),
    "SlimMatMul +adapters": ("slim_adapters", True, {}),
}
PEERS = ("dense fp16", "MatMulNBits")


def argmax_model(logits_type: int) -> bytes:
    """logits [B, S, V] -> next [B, 1] int64, the greedy token after the last position, so that the
    logits never leave the device."""
    last = helper.make_node("Gather", ["logits", "last"], ["last_logits"], axis=1)
    argmax = helper.make_node("ArgMax", ["last_logits"], ["next"], axis=-1, keepdims=0)
    graph = helper.make_graph([last, argmax], "argmax", [helper.make_tensor_value_info("logits", logits_type, None)],
                              [helper.make_tensor_value_info("next", TensorProto.INT64, None)],
                              [helper.make_tensor("last", TensorProto.INT64, [1], [-1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10).SerializeToString()


class BoundDecoder:
    """A with-past decoder generating greedily through IO binding, its cache and logits kept in the
    provider's memory (see the module doc). Session creation logs verbosely, so that the parent
    process can read the node placements from stderr."""

    def __init__(self, path: Path, library: bool, provider: str):
        so = slim_onnx.session_options() if library else ort.SessionOptions()
        so.log_severity_level = 0  # the node placements are logged at VERBOSE only, at session creation
        providers = [provider] if provider == CPU else [provider, CPU]
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        self.device = "cuda" if provider == CUDA else "cpu"
        self.pasts = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values")]
        self.outputs = [o.name for o in self.session.get_outputs()]
        logits = self.session.get_outputs()[0]
        self.vocab = logits.shape[-1]
        self.float = np.float16 if logits.type == "tensor(float16)" else np.float32
        logits_type = TensorProto.FLOAT16 if self.float == np.float16 else TensorProto.FLOAT
        self.argmax = ort.InferenceSession(argmax_model(logits_type), providers=providers)
        self.quiet = ort.RunOptions()
        self.quiet.log_severity_level = 3  # the session's verbose level must not reach the timed runs

    def empty_cache(self, batch: int) -> list[ort.OrtValue]:
        return [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, i.shape[1], 0, i.shape[3]), self.float), self.device, 0)
                for i in self.pasts]

    def step(self, ids: np.ndarray, cache: list[ort.OrtValue], past_len: int) -> tuple[np.ndarray, list[ort.OrtValue]]:
        """(next token ids [B, 1] on the host, the new cache on the device) after `ids` [B, S]."""
        batch, seq = ids.shape
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", np.ones((batch, past_len + seq), np.int64))
        io.bind_cpu_input("position_ids", np.broadcast_to(np.arange(past_len, past_len + seq), (batch, seq)).copy())
        for info, value in zip(self.pasts, cache):
            io.bind_ortvalue_input(info.name, value)
        for name in self.outputs:
            io.bind_output(name, self.device)
        self.session.run_with_iobinding(io, self.quiet)
        logits, *presents = io.get_outputs()
        pick = self.argmax.io_binding()
        pick.bind_ortvalue_input("logits", logits)
        pick.bind_output("next", "cpu")
        self.argmax.run_with_iobinding(pick)
        return pick.copy_outputs_to_cpu()[0], presents

    def generate(self, prompt: np.ndarray, steps: int) -> tuple[float, float]:
        """(prefill seconds, seconds of `steps` decode steps)."""
        cache = self.empty_cache(len(prompt))
        t0 = time.perf_counter()
        token, cache = self.step(prompt, cache, 0)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        for past_len in range(prompt.shape[1], prompt.shape[1] + steps):
            token, cache = self.step(token, cache, past_len)
        return prefill, time.perf_counter() - t0


def time_variant(path: str, library: bool, provider: str, batches: list[int], prefill: int, decode: int,
                 repeats: int) -> dict:
    """{batch: speeds} of one model (run in a worker process)."""
    decoder = BoundDecoder(Path(path), library, provider)
    rng = np.random.default_rng(0)
    results = {}
    for batch in batches:
        prompt = rng.integers(0, decoder.vocab, size=(batch, prefill), dtype=np.int64)
        decoder.generate(prompt, min(decode, 4))  # warm-up: allocations and kernel choices for these shapes
        runs = [decoder.generate(prompt, decode) for _ in range(repeats)]
        prefill_s, decode_s = (statistics.median(r[i] for r in runs) for i in (0, 1))
        results[batch] = {"prefill_tok_s": batch * prefill / prefill_s, "decode_tok_s": batch * decode / decode_s,
                          "prefill_ms": prefill_s * 1e3, "decode_ms_per_step": decode_s * 1e3 / decode}
    return results


PLACED = re.compile(r"placed on \[(\w+)\]\. Number of nodes: (\d+)")
PLACED_NODE = re.compile(r"VerifyEachNodeIsAssignedToAnEp\]\s{3}(\w+) \(")


def node_placements(log: str) -> dict:
    """{provider: {"nodes": count, "ops": {op type: count}}} from a verbose session log; op types are
    listed only where the nodes are split between providers."""
    placements, current = {}, None
    for line in log.splitlines():
        if match := PLACED.search(line):
            current = placements[match[1]] = {"nodes": int(match[2]), "ops": collections.Counter()}
        elif current is not None and (match := PLACED_NODE.search(line)):
            current["ops"][match[1]] += 1
    return placements


def run_variant(path: Path, library: bool, env: dict, args, provider: str) -> dict:
    """One variant's speeds, measured in a fresh process with the variant's environment."""
    environment = {k: v for k, v in os.environ.items() if k != "ORT_FPA_INTB_GEMM"} | env
    worker = {"path": str(path), "library": library, "provider": provider, "batches": args.batch,
              "prefill": args.prefill, "decode": args.decode, "repeats": args.repeats}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(worker)], env=environment,
                              capture_output=True, text=True, timeout=args.variant_timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.variant_timeout} s"}
    result = {"seconds": round(time.perf_counter() - start, 1), "placements": node_placements(done.stderr)}
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if "VerifyEachNodeIsAssignedToAnEp" not in line and "[V:" not in line]
        return result | {"error": f"exit {done.returncode}: " + "\n".join(lines[-15:])}
    return result | {"speeds": json.loads(done.stdout.splitlines()[-1])}


def bench_bound(args) -> None:
    """The --device cuda benchmark (or its --dry-run on the CPU provider): every variant, then ratios."""
    provider = CPU if args.dry_run else CUDA
    models = {"dense": resolve_model_path(args.dense), "slim": resolve_model_path(args.slim)}
    if args.slim_adapters:
        models["slim_adapters"] = resolve_model_path(args.slim_adapters)
    with tempfile.TemporaryDirectory() as tmp:
        models["nbits"] = resolve_model_path(args.nbits) if args.nbits else matmul_nbits_model(models["dense"], Path(tmp) / "nbits")
        results = {}
        for name, (model, library, env) in CUDA_VARIANTS.items():
            if model in models:
                results[name] = run_variant(models[model], library, env, args, provider)
                print(f"{name}: {results[name].get('error') or 'done'} ({results[name].get('seconds')} s)", flush=True)
    report = {"provider": provider, "prefill": args.prefill, "decode": args.decode, "repeats": args.repeats,
              "variants": results, "ratios": speed_ratios(results, args.batch)}
    print_bound(report, args.batch)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if any("error" in r for r in results.values()):
        raise SystemExit("some variants failed")


def speed_ratios(results: dict, batches: list[int]) -> dict:
    """{"variant / peer": {batch: {"prefill": x, "decode": x}}}: tokens/s over the peer's (> 1: faster),
    for every variant but the dense one against the dense one and against MatMulNBits."""
    ratios = {}
    for name, r in results.items():
        for peer in PEERS:
            if name in (peer, PEERS[0]) or "speeds" not in r or "speeds" not in results.get(peer, {}):
                continue
            mine, theirs = r["speeds"], results[peer]["speeds"]
            ratios[f"{name} / {peer}"] = {
                b: {phase: mine[str(b)][f"{phase}_tok_s"] / theirs[str(b)][f"{phase}_tok_s"] for phase in ("prefill", "decode")}
                for b in batches}
    return ratios


def print_bound(report: dict, batches: list[int]) -> None:
    print(f"{report['provider']}: prefill {report['prefill']} tokens, decode {report['decode']} tokens, tokens/s "
          f"(medians of {report['repeats']})")
    print(f"{'variant':<24}" + "".join(f"{f'b={b} prefill':>16}{f'b={b} decode':>14}" for b in batches) + "  nodes on CPU")
    for name, r in report["variants"].items():
        if "speeds" not in r:
            print(f"{name:<24}failed: {r['error'].splitlines()[0]}")
            continue
        speeds = "".join(f"{r['speeds'][str(b)]['prefill_tok_s']:>16.1f}{r['speeds'][str(b)]['decode_tok_s']:>14.1f}"
                         for b in batches)
        on_cpu = r["placements"].get(CPU, {}).get("ops", {}) if report["provider"] != CPU else {}
        print(f"{name:<24}{speeds}  {dict(on_cpu) or '-'}")
    for pair, by_batch in report["ratios"].items():
        print(f"{pair:<38}" + "".join(f"  b={b}: prefill {v['prefill']:.2f}x decode {v['decode']:.2f}x"
                                      for b, v in by_batch.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", help="the dense export folder")
    parser.add_argument("--slim", help="the compressed folder")
    parser.add_argument("--also", action="append", default=[], metavar="LABEL=FOLDER",
                        help="CPU: another compressed folder to time beside --slim (repeatable)")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, help="decode steps (default 64; cuda: 128)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU: onnxruntime's threads")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="cuda: batch sizes")
    parser.add_argument("--nbits", help="cuda: the MatMulNBits folder (default: made here from --dense)")
    parser.add_argument("--slim-adapters", help="cuda: a compressed folder with adapters")
    parser.add_argument("--variant-timeout", type=float, default=150, help="cuda: seconds for each variant's process")
    parser.add_argument("--dry-run", action="store_true", help="run the cuda path on CPUExecutionProvider")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # run_variant's worker process: time one variant
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(time_variant(**json.loads(args.worker))))
        return
    if not args.dense or not args.slim:
        parser.error("--dense and --slim are required")
    if args.device == "cuda" or args.dry_run:
        args.decode = args.decode or 128
        bench_bound(args)
        return
    if args.slim_adapters or args.nbits:
        parser.error("--slim-adapters and --nbits are for --device cuda")
    also = dict(item.split("=", 1) for item in args.also if "=" in item)
    if len(also) != len(args.also):
        parser.error("--also takes LABEL=FOLDER")
    args.decode = args.decode or 64
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
        } | {label: Decoder(resolve_model_path(folder), True) for label, folder in also.items()}
        weights = {name: weight_bytes(m.path) for name, m in models.items()}
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
            "weight_mib": weights[name] / 2**20,
        }
        for name in models
    }
    print(f"prefill {args.prefill} tokens, decode {args.decode} tokens, {args.threads} threads (medians of {args.repeats}); "
          "decode with the cache as numpy arrays (ORTModelForCausalLM on CPU) and kept as OrtValues")
    print(f"{'model':<24}{'weights MiB':>12}{'prefill ms':>12}{'decode tok/s':>14}{'OrtValue cache':>16}")
    for name, r in results.items():
        print(f"{name:<24}{r['weight_mib']:>12.1f}{r['prefill_ms']:>12.1f}{r['decode_tok_s']:>14.1f}"
              f"{r['decode_tok_s_ortvalue_cache']:>16.1f}")
    for ours in ("SlimMatMul", *also):
        s = results[ours]
        for peer in (name for name in results if name not in ("SlimMatMul", *also)):
            p = results[peer]
            print(f"{ours} vs {peer:<22} prefill {p['prefill_ms'] / s['prefill_ms']:.2f}x, decode "
                  f"{s['decode_tok_s'] / p['decode_tok_s']:.2f}x, with the OrtValue cache "
                  f"{s['decode_tok_s_ortvalue_cache'] / p['decode_tok_s_ortvalue_cache']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
