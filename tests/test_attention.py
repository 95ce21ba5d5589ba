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
from slim_onnx.schema import DOMAIN, IR_VERSION, OPSET
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


def non_finite_error() -> float:
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
        expected = reference(feeds, heads, kv_heads, scale)
    for got, want in zip(session.run(None, feeds), expected, strict=True):
        assert np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(np.isinf(got), np.isinf(want))
        finite = np.isfinite(want)
        worst = max(worst, np.abs(got[finite] - want[finite]).max() / np.abs(want[finite]).max())
    assert np.isnan(expected[0]).any() and np.isfinite(expected[0]).any()  # the case exercises both
    return worst


def test_non_finite_inputs_propagate_as_in_float_math():
    assert non_finite_error() < 1e-5


def test_portable_kernel_matches_reference(tmp_path):
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import slim_onnx, test_attention; " \
           "assert slim_onnx.kernel_name() == 'scalar'; " \
           "print(max(test_attention.worst_error(), test_attention.worst_error(packed=True), " \
           "test_attention.non_finite_error()))"
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


@pytest.mark.parametrize("batch,seq", [(0, 5), (2, 0)])
def test_empty_batch_or_no_new_tokens(batch, seq):
    """Batch 0 (with an attention_bias: it once read the longest row of an empty batch) gives empty
    outputs; no new tokens give present = past."""
    heads, kv_heads, head_size = 4, 2, 16
    feeds = case_feeds(batch, seq, 4, heads, kv_heads, head_size, "heads", np.random.default_rng(0))
    session = ort.InferenceSession(attention_model(heads, kv_heads, head_size, True, 0.25), slim_onnx.session_options(),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)
    want = reference(feeds, heads, kv_heads, 0.25)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    assert got[1].shape == (batch, kv_heads, 4 + seq, head_size)


def attention_with_attribute(name: str, value) -> bytes:
    model = onnx.load_from_string(attention_model(4, 2, 16, False, 0.25))
    node = model.graph.node[0]
    node.attribute.remove(next(a for a in node.attribute if a.name == name))
    node.attribute.append(helper.make_attribute(name, value))
    return model.SerializeToString()


@pytest.mark.parametrize(
    "name,value,message",
    [
        # num_heads * head size once overflowed int64, passed the query's shape check and the kernel
        # wrote past the output
        ("num_heads", 2**61 + 1, "num_heads=2305843009213693953 must be a multiple of kv_num_heads=2, both from 1 to 65536"),
        ("kv_num_heads", 0, "num_heads=4 must be a multiple of kv_num_heads=0"),
        ("num_heads", "4", "attribute 'num_heads' must be an int, got a string"),
        ("scale", 1, "attribute 'scale' must be a float, got an int"),
        ("scale", float("nan"), "scale must be finite"),
    ],
)
def test_bad_attributes_are_refused(name, value, message):
    with pytest.raises(Exception, match=f"GroupQueryAttention node '[^']*': {message}"):
        ort.InferenceSession(attention_with_attribute(name, value), slim_onnx.session_options(),
                             providers=["CPUExecutionProvider"])


def test_shape_errors_name_the_input_and_both_shapes():
    feeds = case_feeds(1, 1, 5, 4, 2, 16, "none", np.random.default_rng(0))
    feeds["query"] = feeds["query"][..., :24]  # the model declares the width of the others
    session = ort.InferenceSession(attention_model(4, 2, 16, False, 0.25), slim_onnx.session_options(),
                                   providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match=r"input 'query' must be \[B, S, H \* D\] = \[1, 1, 64\] \(num_heads=4, "
                                        r"kv_num_heads=2, head size D=16 from past_key, B and S from query\), got \[1, 1, 24\]"):
        session.run(None, feeds)
