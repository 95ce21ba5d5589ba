"""What several test modules (and the subprocesses some of them start) share: builders of
SlimMatMul weights and GroupQueryAttention models with their numpy references, tiny Optimum exports,
and a way to run Python in a subprocess that can import this module."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper

import slim_onnx
from slim_onnx.calibration import model_feeds
from slim_onnx.config import GraphOptions
from slim_onnx.node_builder import add_fallback_functions
from slim_onnx.schema import DOMAIN, IR_VERSION, OPSET

TESTS = Path(__file__).resolve().parent


def run_python(code: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """`python -c code` with this folder on PYTHONPATH (so the code can import helpers)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=cwd)


# -- SlimMatMul weights ------------------------------------------------------------------------------

def random_2of4(rng: np.random.Generator, k: int, n: int, keep: int = 2) -> np.ndarray:
    """Random int4 [K, N] with at most `keep` nonzeros in each group of 4 consecutive k (K padded to 4)."""
    kp = -(-k // 4) * 4
    q = rng.integers(-8, 8, size=(kp, n))
    groups = q.reshape(kp // 4, 4, n)
    drop = np.argsort(rng.random(groups.shape), axis=1)[:, keep:, :]
    np.put_along_axis(groups, drop, 0, axis=1)
    return groups.reshape(kp, n)[:k].astype(np.int8)


def random_weights(
    rng: np.random.Generator,
    k: int,
    n: int,
    *,
    sparse: bool = True,
    group_size: int = 32,
    adapter_format: str = "none",
    rank: int = 0,
    bias: bool = False,
):
    from slim_onnx.layout import num_groups
    from slim_onnx.packing import pack_quantized

    q = random_2of4(rng, k, n) if sparse else rng.integers(-8, 8, size=(k, n)).astype(np.int8)
    scales = (rng.random((num_groups(k, group_size), n)) * 0.1 + 0.01).astype(np.float16)
    adapters = None
    if adapter_format != "none":
        adapters = (
            (rng.standard_normal((k, rank)) * 0.2).astype(np.float32),
            (rng.standard_normal((rank, n)) * 0.2).astype(np.float32),
        )
    return pack_quantized(
        q,
        scales,
        group_size,
        sparse,
        adapters,
        adapter_format if adapters is not None else "int4",
        adapter_group_size=32,
        bias=rng.standard_normal(n).astype(np.float32) if bias else None,
    )


KERNEL_SHAPES = [  # (lead dims, K, N)
    ((1,), 8, 8),
    ((3,), 12, 13),
    ((2, 5), 20, 7),
    ((4,), 100, 33),
    ((1, 1, 7), 64, 130),
    ((16,), 576, 40),
    ((33,), 36, 1),
    ((257,), 96, 24),
]


# -- tiny Optimum exports ------------------------------------------------------------------------------

HIDDEN = 64
LOSSLESS = slim_onnx.SlimConfig(sparsity="none", pruning="magnitude", quantizer="absmax", group_size=32,
                                lowrank="naive", adapter_format="float16", rank=HIDDEN)
FLOAT_GRAPH = GraphOptions(accuracy_level=0)  # float32 activations: outputs agree to float rounding


def export(model, root: Path, task: str, dtype: str = "fp32") -> Path:
    from optimum.exporters.onnx import main_export

    model.save_pretrained(root / "hf")
    main_export(str(root / "hf"), str(root / "onnx"), task=task, dtype=dtype, device="cpu")
    return root / "onnx"


def outputs(model_path: Path, feeds: dict, library: bool) -> list[np.ndarray]:
    so = slim_onnx.session_options() if library else ort.SessionOptions()
    session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def check_streamed_statistics(monkeypatch, dense_path: Path) -> list[tuple[list[str], set[str]]]:
    """Make compress() check, as it streams, that each block's statistics equal those of a run of
    the whole model as it is then (earlier blocks already SlimMatMul), and that from the second block
    on they differ from the dense model's. Returns, per block, its layers and the SlimMatMul nodes
    the model held when it was calibrated (filled as compress() runs)."""
    from slim_onnx import calibration, pipeline
    from slim_onnx.passes import find_linear_layers

    real = pipeline.stream_blocks
    dense = ir.load(dense_path)
    seen = []

    def spy(model, groups, feeds, compress_block, **options):
        def checked(block, stats):
            whole = calibration.collect_statistics(model, block, feeds)
            before = calibration.collect_statistics(dense, [l for l in find_linear_layers(dense) if l.name in stats], feeds)
            slim = {n.name for n in model.graph if n.op_type == "SlimMatMul"}
            seen.append(([layer.name for layer in block], slim))
            for layer in block:
                got, want = stats[layer.name].hessian.numpy(), whole[layer.name].hessian.numpy()
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
                change = np.abs(before[layer.name].hessian.numpy() - want).max() / np.abs(want).max()
                assert (change > 1e-3) == bool(slim), (layer.name, change)
            compress_block(block, stats)

        return real(model, groups, feeds, checked, **options)

    monkeypatch.setattr(pipeline, "stream_blocks", spy)
    return seen


def feeds_for(model_path: Path, vocab: int, seq: int = 12) -> dict:
    tokens = np.random.default_rng(0).integers(0, vocab, size=(1, seq))
    return next(model_feeds(ir.load(str(model_path)), tokens))


# -- GroupQueryAttention ---------------------------------------------------------------------------------

ATTENTION_INPUTS = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "attention_bias"]


def attention_model(heads: int, kv_heads: int, head_size: int, bias: bool, scale: float, packed: bool = False) -> bytes:
    """One slim_onnx::GroupQueryAttention node; `packed`: q/k/v side by side in query, rotary caches."""
    f, i = TensorProto.FLOAT, TensorProto.INT32
    # query's width symbolic: the kernel's own check of it is tested
    shapes = [("query", f, ["B", "S", "Q"]), ("key", f, ["B", "S", kv_heads * head_size]),
              ("value", f, ["B", "S", kv_heads * head_size]), ("past_key", f, ["B", kv_heads, "P", head_size]),
              ("past_value", f, ["B", kv_heads, "P", head_size]), ("seqlens_k", i, ["B"]), ("total_sequence_length", i, [1])]
    if bias:
        shapes.append(("attention_bias", f, [None, None, "S", "T"]))
    names = [s[0] for s in shapes]
    if packed:
        del shapes[1:3]
        shapes += [(n, f, ["BS", head_size // 2]) for n in ("cos_cache", "sin_cache")]
        names = ["query", "", "", *names[3:7], names[7] if bias else "", "cos_cache", "sin_cache"]
    node = helper.make_node("GroupQueryAttention", names, ["output", "present_key", "present_value"],
                            domain=DOMAIN, num_heads=heads, kv_num_heads=kv_heads, scale=scale)
    node.overload = ("packed_rotary_" if packed else "") + ("bias" if bias else "nobias")
    graph = helper.make_graph([node], "attention", [helper.make_tensor_value_info(*s) for s in shapes],
                              [helper.make_tensor_value_info("output", f, ["B", "S", heads * head_size]),
                               *(helper.make_tensor_value_info(n, f, ["B", kv_heads, "L", head_size]) for n in node.output[1:])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    add_fallback_functions(model)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def attention_reference(feeds: dict, heads: int, kv_heads: int, scale: float) -> list[np.ndarray]:
    """The contract, row by row in float64 (docs/op-spec.md)."""
    q, k, v, past_k, past_v = (feeds[n].astype(np.float64) for n in ATTENTION_INPUTS[:5])
    bias = feeds.get("attention_bias")
    b_, s_, _ = q.shape
    p_, d = past_k.shape[2], past_k.shape[3]
    length = max(int(feeds["total_sequence_length"][0]), p_)
    q = q.reshape(b_, s_, heads, d)
    presents = []
    for new, past in ((k, past_k), (v, past_v)):
        present = np.zeros((b_, kv_heads, length, d))
        for b in range(b_):
            n_past = int(feeds["seqlens_k"][b]) + 1 - s_
            present[b, :, :n_past] = past[b, :, :n_past]
            present[b, :, n_past:n_past + s_] = new[b].reshape(s_, kv_heads, d).transpose(1, 0, 2)
        presents.append(present)
    out = np.zeros((b_, s_, heads, d))
    for b in range(b_):
        n_past = int(feeds["seqlens_k"][b]) + 1 - s_
        for h in range(heads):
            g = h // (heads // kv_heads)
            for s in range(s_):
                n = n_past + s + 1
                scores = scale * presents[0][b, g, :n] @ q[b, s, h]
                if bias is not None:
                    scores = scores + bias[b % bias.shape[0], h % bias.shape[1], s, :n]
                if np.isneginf(scores).all():
                    continue  # every position masked: 0
                p = np.exp(scores - scores.max())
                out[b, s, h] = (p / p.sum()) @ presents[1][b, g, :n]
    return [out.reshape(b_, s_, heads * d), *presents]


# batch, new tokens, cached positions, heads, kv heads, head size, bias: "none" | "batch" (one per
# row, left padding of the last row masked with -inf) | "heads" (random, per row and head)
ATTENTION_CASES = [
    (1, 1, 37, 9, 3, 64, "batch"),  # a decode step, SmolLM2's heads
    (2, 1, 7, 4, 2, 16, "batch"),
    (2, 9, 0, 4, 2, 16, "batch"),  # a left-padded prompt: padded queries see only masked keys
    (1, 4, 7, 4, 2, 24, "none"),
    (2, 3, 5, 6, 6, 8, "heads"),  # no grouping
    (2, 5, 3, 6, 2, 20, "heads"),  # head size not a multiple of 8, batched continuation: kernel only
]


def case_feeds(batch, seq, past, heads, kv_heads, head_size, bias, rng) -> dict:
    total = past + seq
    feeds = {
        "query": rng.standard_normal((batch, seq, heads * head_size)),
        "key": rng.standard_normal((batch, seq, kv_heads * head_size)),
        "value": rng.standard_normal((batch, seq, kv_heads * head_size)),
        "past_key": rng.standard_normal((batch, kv_heads, past, head_size)),
        "past_value": rng.standard_normal((batch, kv_heads, past, head_size)),
    }
    feeds = {name: x.astype(np.float32) for name, x in feeds.items()}
    feeds["seqlens_k"] = np.full(batch, total - 1, dtype=np.int32)
    feeds["total_sequence_length"] = np.array([total], dtype=np.int32)
    if bias == "batch":
        mask = np.zeros((batch, 1, seq, total), dtype=np.float32)
        mask[-1, ..., : min(3, total - 1)] = -np.inf
        feeds["attention_bias"] = mask
    elif bias == "heads":
        feeds["attention_bias"] = rng.standard_normal((batch, heads, seq, total)).astype(np.float32)
    return feeds


def rotate_half(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, heads: int) -> np.ndarray:
    """x [B, S, heads*D] rotated as com.microsoft::RotaryEmbedding (interleaved=0) at position b*S + s."""
    b_, s_, _ = x.shape
    x = x.reshape(b_ * s_, heads, -1).astype(np.float64)
    half = x.shape[-1] // 2
    c, s = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(b_, s_, -1)


def packed_feeds(feeds: dict, heads: int, kv_heads: int, rng) -> tuple[dict, dict]:
    """(the packed op's feeds: q/k/v side by side, random rotary angles; the reference's feeds: q and k
    rotated in numpy)."""
    b_, s_, _ = feeds["query"].shape
    angles = rng.uniform(0, 2 * np.pi, (b_ * s_, feeds["past_key"].shape[3] // 2))
    cos, sin = np.cos(angles), np.sin(angles)
    op = {k: v for k, v in feeds.items() if k not in ("query", "key", "value")}
    op["query"] = np.concatenate([feeds["query"], feeds["key"], feeds["value"]], axis=-1)
    op["cos_cache"], op["sin_cache"] = cos.astype(np.float32), sin.astype(np.float32)
    ref = dict(feeds, query=rotate_half(feeds["query"], cos, sin, heads), key=rotate_half(feeds["key"], cos, sin, kv_heads))
    return op, ref


def attention_worst_error(with_library: bool = True, packed: bool = False) -> float:
    """Largest relative error over ATTENTION_CASES (fallback: only the cases onnxruntime's kernel accepts)."""
    rng = np.random.default_rng(3)
    worst, ran = 0.0, 0
    for batch, seq, past, heads, kv_heads, head_size, bias in ATTENTION_CASES:
        feeds = ref_feeds = case_feeds(batch, seq, past, heads, kv_heads, head_size, bias, rng)
        if packed:
            feeds, ref_feeds = packed_feeds(feeds, heads, kv_heads, rng)
        if not with_library and (head_size % 8 or (batch > 1 and past > 0 and seq > 1)):
            continue
        scale = 1.0 / np.sqrt(head_size) * 1.5
        so = slim_onnx.session_options() if with_library else ort.SessionOptions()
        session = ort.InferenceSession(attention_model(heads, kv_heads, head_size, bias != "none", scale, packed), so,
                                       providers=["CPUExecutionProvider"])
        for got, want in zip(session.run(None, feeds), attention_reference(ref_feeds, heads, kv_heads, scale), strict=True):
            assert got.shape == want.shape
            worst = max(worst, np.abs(got - want).max() / np.abs(want).max())
        ran += 1
    assert ran >= (len(ATTENTION_CASES) if with_library else 4), ran  # the fallback takes 4 of the 6
    return worst


def attention_non_finite_error() -> float:
    """Largest relative error on the finite outputs of a case with NaN and Inf in the query, a key and a
    value, after checking that NaN and Inf sit exactly where float math (the reference) puts them."""
    rng = np.random.default_rng(5)
    heads, kv_heads, head_size, scale = 4, 2, 16, 0.25
    feeds = case_feeds(2, 3, 5, heads, kv_heads, head_size, "batch", rng)
    feeds["query"][0, 1, :head_size] = np.nan  # row 0, query 1, head 0: that output row is NaN
    feeds["past_key"][1, 1, 4, 0] = np.inf  # row 1, kv head 1: scores of +-inf for heads 2 and 3
    feeds["past_value"][0, 0, 4, 3] = np.nan  # row 0, kv head 0: dimension 3 of heads 0 and 1
    session = ort.InferenceSession(attention_model(heads, kv_heads, head_size, True, scale), slim_onnx.session_options(),
                                   providers=["CPUExecutionProvider"])
    worst = 0.0
    with np.errstate(invalid="ignore"):
        expected = attention_reference(feeds, heads, kv_heads, scale)
    for got, want in zip(session.run(None, feeds), expected, strict=True):
        assert np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(np.isinf(got), np.isinf(want))
        finite = np.isfinite(want)
        worst = max(worst, np.abs(got[finite] - want[finite]).max() / np.abs(want[finite]).max())
    assert np.isnan(expected[0]).any() and np.isfinite(expected[0]).any()  # the case exercises both
    return worst


def english(start: int, length: int) -> str:
    """Plain English prose from the Python docs that ship with CPython (calibration and tokenizer text)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[start : start + length]


def tiny_llama_export(root: Path, initializer_range: float = 0.02) -> Path:
    """A 2-layer Llama with tied embeddings and a small BPE tokenizer under root/hf, exported with past
    key values to root/onnx, plus calibration text root/calib.txt. Returns root."""
    import torch
    from optimum.exporters.onnx import main_export
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([english(0, 100_000)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128,
                         initializer_range=initializer_range)
    LlamaForCausalLM(config).save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    main_export(str(root / "hf"), str(root / "onnx"), task="text-generation-with-past")
    (root / "calib.txt").write_text(english(100_000, 60_000))
    return root


# onnxruntime-genai 0.18's model builder is written against transformers 5: it imports two Qwen3.5
# classes at module level (a Llama build never uses them) and reads rope settings from
# config.rope_scaling as a dict. The Optimum exporter pins transformers 4.57, so the builder runs in a
# subprocess with placeholders for those names, on a copy of the model whose config spells out
# the default rope.
_GENAI_BUILDER = """
import runpy, sys
from transformers.utils import import_utils
placeholders = {"Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"}
lazy_getattr = import_utils._LazyModule.__getattr__
def getattr_with_placeholders(self, name):
    try:
        return lazy_getattr(self, name)
    except (AttributeError, ImportError):
        if name in placeholders:
            return type(name, (), {})
        raise
import_utils._LazyModule.__getattr__ = getattr_with_placeholders
sys.argv = ["builder", *sys.argv[1:]]
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
"""


def genai_build(hf_dir: Path, out: Path, precision: str = "fp32") -> Path:
    """An onnxruntime-genai model folder `out` built from the Hugging Face folder `hf_dir` by
    onnxruntime-genai's own model builder (CPU, `precision`)."""
    import json
    import shutil

    source = out.parent / f"{out.name}.hf"
    shutil.copytree(hf_dir, source)
    config = json.loads((source / "config.json").read_text())
    config["rope_scaling"] = config.get("rope_scaling") or {"rope_type": "default"}
    (source / "config.json").write_text(json.dumps(config))
    res = subprocess.run([sys.executable, "-c", _GENAI_BUILDER, "-m", str(source), "-i", str(source), "-o", str(out),
                          "-p", precision, "-e", "cpu", "-c", str(out.parent / f"{out.name}.cache")],
                         capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 0 and (out / "genai_config.json").is_file(), res.stderr[-3000:]
    return out
