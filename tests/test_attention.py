"""slim_onnx::GroupQueryAttention (csrc/attention_op.cc) against a numpy reading of its contract, and
against its fallback function (onnxruntime's com.microsoft::GroupQueryAttention) where onnxruntime
accepts the shape. The AVX2 and the portable kernels are both checked."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import (
    attention_model,
    attention_non_finite_error,
    attention_reference,
    attention_worst_error,
    case_feeds,
    packed_feeds,
    run_python,
)
from onnx import helper

import slim_onnx


@pytest.mark.parametrize("packed", [False, True])
def test_kernel_matches_reference(packed):
    assert attention_worst_error(with_library=True, packed=packed) < 1e-5


@pytest.mark.parametrize("packed", [False, True])
def test_fallback_matches_reference(packed):
    assert attention_worst_error(with_library=False, packed=packed) < 1e-5


def test_non_finite_inputs_propagate_as_in_float_math():
    assert attention_non_finite_error() < 1e-5


def test_portable_kernel_matches_reference(tmp_path):
    code = ("import slim_onnx, helpers; assert slim_onnx.kernel_name() == 'scalar'; "
            "print(max(helpers.attention_worst_error(), helpers.attention_worst_error(packed=True), "
            "helpers.attention_non_finite_error()))")
    out = run_python(code, env=dict(os.environ, SLIM_ONNX_KERNEL="scalar"), cwd=tmp_path)
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
    want = attention_reference(feeds, heads, kv_heads, 0.25)
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
        ("num_heads", 2**61 + 1, "num_heads=2305843009213693953 and kv_num_heads=2 must both be from 1 to 65536"),
        ("kv_num_heads", 0, "num_heads=4 and kv_num_heads=0 must both be from 1 to 65536"),
        ("num_heads", 131072, "num_heads=131072 and kv_num_heads=2 must both be from 1 to 65536"),
        ("num_heads", 5, "num_heads=5 must be a multiple of kv_num_heads=2"),
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
