"""slim_onnx::GroupQueryAttention (csrc/attention_op.cc) against a numpy reading of its contract, and
against its fallback function (onnxruntime's com.microsoft::GroupQueryAttention) where onnxruntime
accepts the shape. The AVX2 and the portable kernels are both checked."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import slim_onnx
from slim_onnx.fallback import DOMAIN, IR_VERSION, OPSET
from slim_onnx.op import add_fallback_functions

INPUTS = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "attention_bias"]


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


def reference(feeds: dict, heads: int, kv_heads: int, scale: float) -> list[np.ndarray]:
    """The contract, row by row in float64 (docs/op-spec.md)."""
    q, k, v, past_k, past_v = (feeds[n].astype(np.float64) for n in INPUTS[:5])
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
CASES = [
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


def worst_error(with_library: bool = True, packed: bool = False) -> float:
    """Largest relative error over CASES (fallback: only the cases onnxruntime's kernel accepts)."""
    rng = np.random.default_rng(3)
    worst = 0.0
    for batch, seq, past, heads, kv_heads, head_size, bias in CASES:
        feeds = ref_feeds = case_feeds(batch, seq, past, heads, kv_heads, head_size, bias, rng)
        if packed:
            feeds, ref_feeds = packed_feeds(feeds, heads, kv_heads, rng)
        if not with_library and (head_size % 8 or (batch > 1 and past > 0 and seq > 1)):
            continue
        scale = 1.0 / np.sqrt(head_size) * 1.5
        so = slim_onnx.session_options() if with_library else ort.SessionOptions()
        session = ort.InferenceSession(attention_model(heads, kv_heads, head_size, bias != "none", scale, packed), so,
                                       providers=["CPUExecutionProvider"])
        for got, want in zip(session.run(None, feeds), reference(ref_feeds, heads, kv_heads, scale)):
            assert got.shape == want.shape
            worst = max(worst, np.abs(got - want).max() / np.abs(want).max())
    return worst


@pytest.mark.parametrize("packed", [False, True])
def test_kernel_matches_reference(packed):
    assert worst_error(with_library=True, packed=packed) < 1e-5


@pytest.mark.parametrize("packed", [False, True])
def test_fallback_matches_reference(packed):
    assert worst_error(with_library=False, packed=packed) < 1e-5


def test_portable_kernel_matches_reference(tmp_path):
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import slim_onnx, test_attention; " \
           "assert slim_onnx.kernel_name() == 'scalar'; " \
           "print(max(test_attention.worst_error(), test_attention.worst_error(packed=True)))"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, SLIM_ONNX_KERNEL="scalar"),
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) < 1e-5


def test_packed_query_of_the_wrong_width_is_refused():
    feeds, _ = packed_feeds(case_feeds(1, 1, 5, 4, 2, 16, "none", np.random.default_rng(0)), 4, 2, np.random.default_rng(1))
    feeds["query"] = feeds["query"][..., :-16]  # v missing
    session = ort.InferenceSession(attention_model(4, 2, 16, False, 0.25, packed=True), slim_onnx.session_options(),
                                   providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="packed q/k/v"):
        session.run(None, feeds)


def test_inconsistent_lengths_are_refused():
    feeds = case_feeds(1, 1, 5, 4, 2, 16, "none", np.random.default_rng(0))
    feeds["seqlens_k"] = np.array([9], dtype=np.int32)  # claims 10 positions, the cache holds 5 + 1
    session = ort.InferenceSession(attention_model(4, 2, 16, False, 0.25), slim_onnx.session_options(),
                                   providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="seqlens_k\\[0\\]=9 does not fit"):
        session.run(None, feeds)
