"""Graph passes on hand-built graphs holding every pattern the exporters produce."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import random_weights
from onnx import TensorProto, helper, numpy_helper

import slim_onnx
from slim_onnx.config import GraphOptions
from slim_onnx.passes import compress_graph, find_linear_layers, rewrite_graph

K, N, V = 32, 24, 40


def build_model(rng):
    """x[b, K] -> MatMul+Add (q) -> Gemm transB (o) -> attention-like x@x^T -> rotary-like MatMul of a
    Cast constant -> tied lm_head: Transpose(emb) shared with a Gather, and a MatMul inside an If."""
    f = lambda *s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)  # noqa: E731
    inits = {
        "q.w": f(K, N), "q.b": f(N), "o.w": f(K, N), "o.b": f(K), "emb": f(V, K), "rot": f(4, 4),
        "then.w": f(K, N), "cond": np.array(True),
    }
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["o_out", "then.w"], ["then_y"], name="/if/then/MatMul")],
        "then", [], [helper.make_tensor_value_info("then_y", TensorProto.FLOAT, ["b", N])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["q_out"], ["else_y"])], "else", [],
        [helper.make_tensor_value_info("else_y", TensorProto.FLOAT, ["b", N])],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "q.w"], ["q_mm"], name="/q/MatMul"),
        helper.make_node("Add", ["q.b", "q_mm"], ["q_out"], name="/q/Add"),
        helper.make_node("Gemm", ["q_out", "o.w", "o.b"], ["o_out"], name="/o/Gemm", transB=1),
        helper.make_node("MatMul", ["o_out", "o_out_t"], ["scores"], name="/attn/MatMul"),
        helper.make_node("Transpose", ["o_out"], ["o_out_t"]),
        helper.make_node("Cast", ["rot"], ["rot_f"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["rot_f", "rot"], ["rot_out"], name="/rotary_emb/MatMul"),
        helper.make_node("Transpose", ["emb"], ["emb_t"], name="/lm_head/Transpose"),
        helper.make_node("MatMul", ["o_out", "emb_t"], ["logits"], name="/lm_head/MatMul"),
        helper.make_node("Gather", ["emb", "ids"], ["embedded"], name="/embed/Gather"),
        helper.make_node("If", ["cond"], ["branch"], name="/if", then_branch=then_branch, else_branch=else_branch),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K]), helper.make_tensor_value_info("ids", TensorProto.INT64, ["b"])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in
         (("logits", ["b", V]), ("scores", ["b", "b"]), ("rot_out", [4, 4]), ("embedded", ["b", K]), ("branch", ["b", N]))],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    # o.w is [N_out=K, K_in=N] for transB: input width of Gemm is N
    graph.initializer[2].CopyFrom(numpy_helper.from_array(f(K, N), "o.w"))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_find_linear_layers_takes_only_weight_matmuls(rng):
    layers = {l.name: l for l in find_linear_layers(ir.from_proto(build_model(rng)))}
    assert set(layers) == {"/q/MatMul", "/o/Gemm", "/lm_head/MatMul", "/if/then/MatMul"}
    assert layers["/q/MatMul"].bias_add is not None and (layers["/q/MatMul"].k, layers["/q/MatMul"].n) == (K, N)
    assert layers["/o/Gemm"].transposed and (layers["/o/Gemm"].k, layers["/o/Gemm"].n) == (N, K)
    assert layers["/lm_head/MatMul"].transposed and (layers["/lm_head/MatMul"].k, layers["/lm_head/MatMul"].n) == (K, V)


def run(model_proto, feeds, library):
    so = slim_onnx.session_options() if library else ort.SessionOptions()
    return ort.InferenceSession(model_proto.SerializeToString(), so).run(None, feeds)


def test_compress_graph_replaces_layers_and_keeps_the_rest(rng):
    original = build_model(rng)
    model = ir.from_proto(original)
    layers = find_linear_layers(model)
    weights = {l.name: slim_onnx.pack_weight(l.weight_array(), 16, sparse=False, bias=l.bias_array()) for l in layers}
    compressed = ir.to_proto(compress_graph(model, weights, accuracy_level=0))
    onnx.checker.check_model(compressed)
    ops = [n.op_type for n in compressed.graph.node]
    assert ops.count("SlimMatMul") == 3 and "Gemm" not in ops and "Add" not in ops
    assert "Gather" in ops and {i.name for i in compressed.graph.initializer} >= {"emb", "rot"}  # tied embedding kept
    assert [o.name for o in compressed.graph.output] == [o.name for o in original.graph.output]
    then = next(a.g for n in compressed.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    assert [n.op_type for n in then.node] == ["SlimMatMul"]

    # reference: the original graph's computation with every layer's packed (dequantized) weights
    x = rng.standard_normal((3, K)).astype(np.float32)
    ids = np.array([1, 5, 7])
    eff = {name: (w.dense_weight(), w.bias if w.bias is not None else 0) for name, w in weights.items()}
    q = x @ eff["/q/MatMul"][0] + eff["/q/MatMul"][1]
    o = q @ eff["/o/Gemm"][0] + eff["/o/Gemm"][1]
    init = {i.name: numpy_helper.to_array(i) for i in original.graph.initializer}
    expected = {
        "logits": o @ eff["/lm_head/MatMul"][0], "scores": o @ o.T, "rot_out": init["rot"] @ init["rot"],
        "embedded": init["emb"][ids], "branch": o @ eff["/if/then/MatMul"][0],
    }
    for library in (True, False):
        got = dict(zip(expected, run(compressed, {"x": x, "ids": ids}, library), strict=True))
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-4 * np.abs(expected[name]).max())


def test_unknown_layer_name_is_an_error(rng):
    model = ir.from_proto(build_model(rng))
    with pytest.raises(Exception, match="no linear layer named 'nope'"):
        compress_graph(model, {"nope": slim_onnx.pack_weight(np.ones((8, 8), np.float32), 8, sparse=False)}, 0)


def test_merge_siblings_keeps_every_output(rng):
    """Three SlimMatMul nodes reading one input (int4 adapters) and one reading another: the three
    become one node and a Split whose outputs equal the separate nodes' (kernel and fallback, float32
    activations); the fourth stays."""
    from slim_onnx.node_builder import add_fallback_functions, make_slim_matmul_node
    from slim_onnx.passes import MergeSiblingLayersPass, run_passes

    parts = [random_weights(rng, K, n, group_size=32, adapter_format="int4", rank=8, bias=True) for n in (N, 8, 16)]
    nodes, inits = [], []
    for i, (w, a) in enumerate(zip(parts + [parts[0]], ["x", "x", "x", "x2"], strict=True)):
        node, tensors = make_slim_matmul_node(w, a, f"y{i}", f"layer{i}", accuracy_level=0)
        nodes.append(node)
        inits += tensors
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["b", w.n]) for i, w in enumerate(parts + [parts[0]])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", K]) for x in ("x", "x2")],
                              outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    add_fallback_functions(proto)
    model = ir.serde.deserialize_model(proto)
    merge = MergeSiblingLayersPass()
    run_passes(model, [merge])
    assert merge.merged == [["layer0", "layer1", "layer2"]]
    merged = ir.serde.serialize_model(model)
    onnx.checker.check_model(merged)
    assert [n.op_type for n in merged.graph.node].count("SlimMatMul") == 2
    feeds = {"x": rng.standard_normal((3, K)).astype(np.float32), "x2": rng.standard_normal((3, K)).astype(np.float32)}
    want = ort.InferenceSession(proto.SerializeToString(), slim_onnx.session_options()).run(None, feeds)
    for so in (slim_onnx.session_options(), ort.SessionOptions()):
        got = ort.InferenceSession(merged.SerializeToString(), so).run(None, feeds)
        for w, g in zip(want, got, strict=True):
            assert np.abs(g - w).max() / np.abs(w).max() < 1e-5


def swiglu_mlp(rng, gate_also_read: bool) -> onnx.ModelProto:
    """x -> gate, up SlimMatMuls (int4 adapters, bias) -> Mul(up, Mul(Sigmoid(gate), gate)) -> h;
    with `gate_also_read`, gate is a graph output too."""
    from slim_onnx.node_builder import add_fallback_functions, make_slim_matmul_node

    nodes, inits = [], []
    for name in ("gate", "up"):
        w = random_weights(rng, K, 32, group_size=16, adapter_format="int4", rank=8, bias=True)
        node, tensors = make_slim_matmul_node(w, "x", name, f"/mlp/{name}_proj/MatMul", accuracy_level=0)
        nodes.append(node)
        inits += tensors
    nodes += [helper.make_node("Sigmoid", ["gate"], ["sig"]), helper.make_node("Mul", ["sig", "gate"], ["act"]),
              helper.make_node("Mul", ["up", "act"], ["h"])]
    outputs = [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", 32])]
    if gate_also_read:
        outputs.append(helper.make_tensor_value_info("gate", TensorProto.FLOAT, ["b", 32]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])], outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    add_fallback_functions(proto)
    return proto


def test_swiglu_folds_into_the_merged_gate_up_layer(rng):
    """After the merge, Split + Sigmoid + two Muls become activation="swiglu" on the one SlimMatMul:
    same outputs as the export-shaped graph on both paths, a checker-clean model whose only functions
    are the variants in use."""
    proto = swiglu_mlp(rng, gate_also_read=False)
    model = ir.serde.deserialize_model(proto)
    rewrite = rewrite_graph(model, GraphOptions.only("merge_siblings", "fuse_swiglu"))
    assert len(rewrite.merged_siblings) == 1 and rewrite.swiglu_fused == 1
    fused = ir.serde.serialize_model(model)
    onnx.checker.check_model(fused)
    assert [n.op_type for n in fused.graph.node] == ["SlimMatMul"]
    node = fused.graph.node[0]
    assert node.overload.endswith("_swiglu") and {a.name: a.s for a in node.attribute}["activation"] == b"swiglu"
    assert [f.overload for f in fused.functions] == [node.overload]
    assert [o.name for o in fused.graph.output] == ["h"]
    feeds = {"x": rng.standard_normal((5, K)).astype(np.float32)}
    want = run(proto, feeds, library=False)[0]
    for library in (True, False):
        got = run(fused, feeds, library)[0]
        assert got.shape == (5, 32) and np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_swiglu_is_not_folded_when_the_gate_is_read_elsewhere(rng):
    model = ir.serde.deserialize_model(swiglu_mlp(rng, gate_also_read=True))
    rewrite = rewrite_graph(model, GraphOptions.only("merge_siblings", "fuse_swiglu"))
    assert len(rewrite.merged_siblings) == 1 and rewrite.swiglu_fused == 0
    assert sorted(n.op_type for n in model.graph) == ["Mul", "Mul", "Sigmoid", "SlimMatMul", "Split"]


# -- attention and RMSNorm fusion on hand-built export-shaped graphs --------------------------------


def attention_layer(rng, heads=4, kv_heads=2, head_size=8, present_is_output=True, softmax_axis=-1) -> onnx.ModelProto:
    """One decoder attention layer as Optimum exports it (without rotary): q/k/v projections split into
    heads, the caches concatenated, repeat_kv when heads > kv_heads, scaled Q.K^T plus the additive
    mask input, Softmax, probs.V, heads merged, o projection."""
    e, d = heads * head_size, head_size
    f = lambda *s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("wq", f(e, heads * d)), ("wk", f(e, kv_heads * d)), ("wv", f(e, kv_heads * d)), ("wo", f(heads * d, e)),
        ("q_shape", np.array([0, 0, heads, d])), ("kv_shape", np.array([0, 0, kv_heads, d])),
        ("merged", np.array([0, 0, -1])), ("axis2", np.array([2])), ("scale", np.array(d**-0.5, np.float32)),
        ("groups", np.array([1, 1, heads // kv_heads, 1, 1])), ("rep_shape", np.array([0, heads, -1, d])),
    )]
    nodes = []
    for name, w, shape in (("q", "wq", "q_shape"), ("k", "wk", "kv_shape"), ("v", "wv", "kv_shape")):
        nodes += [helper.make_node("MatMul", ["x", w], [f"{name}_p"], name=f"/{name}_proj/MatMul"),
                  helper.make_node("Reshape", [f"{name}_p", shape], [f"{name}_4d"]),
                  helper.make_node("Transpose", [f"{name}_4d"], [f"{name}_h"], perm=[0, 2, 1, 3])]
    present = {}
    for kind in ("key", "value"):
        present[kind] = f"present.0.{kind}"
        nodes.append(helper.make_node("Concat", [f"past_key_values.0.{kind}", f"{kind[0]}_h"], [present[kind]], axis=2))
        if heads > kv_heads:  # repeat_kv
            nodes += [helper.make_node("Unsqueeze", [present[kind], "axis2"], [f"{kind}_u"]),
                      helper.make_node("Expand", [f"{kind}_u", "groups"], [f"{kind}_e"]),
                      helper.make_node("Reshape", [f"{kind}_e", "rep_shape"], [f"{kind}_rep"])]
            present[kind] = f"{kind}_rep"
    nodes += [
        helper.make_node("Transpose", [present["key"]], ["k_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q_h", "k_t"], ["qk"]),
        helper.make_node("Mul", ["qk", "scale"], ["scores"]),
        helper.make_node("Add", ["scores", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=softmax_axis),
        helper.make_node("MatMul", ["probs", present["value"]], ["pv"]),
        helper.make_node("Transpose", ["pv"], ["pv_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["pv_t", "merged"], ["attn"]),
        helper.make_node("MatMul", ["attn", "wo"], ["y"], name="/o_proj/MatMul"),
    ]
    cache = lambda n, length: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", kv_heads, length, d])  # noqa: E731
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", e]),
              cache("past_key_values.0.key", "P"), cache("past_key_values.0.value", "P"),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", 1, "S", "T"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", e])]
    if present_is_output:
        outputs += [cache("present.0.key", "T"), cache("present.0.value", "T")]
    graph = helper.make_graph(nodes, "attention", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def causal_feeds(rng, model: onnx.ModelProto, batch: int, seq: int, past: int) -> dict:
    x_dim = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    kv_heads, d = (model.graph.input[1].type.tensor_type.shape.dim[i].dim_value for i in (1, 3))
    mask = np.where(np.arange(past + seq)[None, :] <= past + np.arange(seq)[:, None], 0, -np.inf).astype(np.float32)
    return {"x": rng.standard_normal((batch, seq, x_dim)).astype(np.float32),
            "past_key_values.0.key": rng.standard_normal((batch, kv_heads, past, d)).astype(np.float32),
            "past_key_values.0.value": rng.standard_normal((batch, kv_heads, past, d)).astype(np.float32),
            "mask": np.broadcast_to(mask, (batch, 1, seq, past + seq)).copy()}


def slice_mask_to_the_scores(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The mask input made wider and sliced to the scores' width, read as Shape(Q.K^T): a reader of
    the cache (through the scores) that feeds the fused op's own input."""
    graph = proto.graph
    graph.input[3].name = "mask_full"
    graph.initializer.extend([numpy_helper.from_array(np.array([v]), n) for n, v in (("zero1", 0), ("ax3", 3), ("four", 4))])
    nodes = list(graph.node)
    at = next(i for i, n in enumerate(nodes) if n.output[0] == "qk") + 1
    nodes[at:at] = [helper.make_node("Shape", ["qk"], ["qk_shape"]),
                    helper.make_node("Slice", ["qk_shape", "ax3", "four"], ["qk_len"]),
                    helper.make_node("Slice", ["mask_full", "zero1", "qk_len", "ax3"], ["mask"])]
    del graph.node[:]
    graph.node.extend(nodes)
    return proto


@pytest.mark.parametrize("heads,kv_heads,sliced_mask", [(4, 2, False), (2, 2, False), (4, 2, True)])
def test_attention_fusion_on_a_hand_built_layer(rng, heads, kv_heads, sliced_mask):
    """Fused into one GroupQueryAttention with the export's outputs (present caches included), on our
    kernel and on the fallback (com.microsoft's op), for a decode step and a prompt on a cache; also
    when the mask is sliced to the scores' width (the old scores stay for their shape: no cycle)."""
    proto = attention_layer(rng, heads, kv_heads)
    if sliced_mask:
        proto = slice_mask_to_the_scores(proto)
    model = ir.serde.deserialize_model(proto)
    assert rewrite_graph(model, GraphOptions.only("fuse_attention")).attention_fused == 1
    fused = ir.serde.serialize_model(model)
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("GroupQueryAttention") == 1 and "Softmax" not in ops and ("Concat" not in ops or sliced_mask)
    assert [o.name for o in fused.graph.output] == [o.name for o in proto.graph.output]
    for batch, seq, past in ((2, 1, 5), (1, 4, 3)):
        feeds = causal_feeds(rng, proto, batch, seq, past)
        if sliced_mask:
            feeds["mask_full"] = np.pad(feeds.pop("mask"), ((0, 0), (0, 0), (0, 0), (0, 3)))
        want = run(proto, feeds, library=False)
        for library in (True, False):
            got = run(fused, feeds, library)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", [
    dict(head_size=12),  # the fallback (onnxruntime's kernel) needs a head size that is a multiple of 8
    dict(present_is_output=False),  # the caches are not the graph's outputs
    dict(softmax_axis=2),  # not a softmax over the keys
    dict(heads=3, kv_heads=2),  # heads not a multiple of the kv heads
])
def test_attention_fusion_leaves_other_shapes_alone(rng, change):
    options = dict(heads=4, kv_heads=2, head_size=8) | change
    if options["heads"] % options["kv_heads"]:  # build with repeat_kv of 2, then claim 3 heads in the split
        proto = attention_layer(rng, heads=4, kv_heads=2)
        shape = next(i for i in proto.graph.initializer if i.name == "q_shape")
        shape.CopyFrom(numpy_helper.from_array(np.array([0, 0, 3, 8]), "q_shape"))
    else:
        proto = attention_layer(rng, **options)
    model = ir.serde.deserialize_model(proto)
    assert rewrite_graph(model, GraphOptions.only("fuse_attention")).attention_fused == 0
    assert sorted(n.op_type for n in model.graph) == sorted(n.op_type for n in proto.graph.node)


def rms_norm_block(rng, gamma_constant=True, mean_axis=-1, power=2.0, hidden=16) -> onnx.ModelProto:
    """h = a + b; out = RMSNorm(h) * gamma (Llama's export); the residual h is read again after it."""
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("two", np.array(power, np.float32)), ("axes", np.array([mean_axis])), ("eps", np.array(1e-6, np.float32)),
        ("one", np.array(1.0, np.float32)),
    )]
    gamma = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
    if gamma_constant:
        inits.append(numpy_helper.from_array(gamma, "gamma"))
    nodes = [
        helper.make_node("Add", ["a", "b"], ["h"]),
        helper.make_node("Pow", ["h", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], keepdims=1),
        helper.make_node("Add", ["mean", "eps"], ["var"]),
        helper.make_node("Sqrt", ["var"], ["rms"]),
        helper.make_node("Div", ["one", "rms"], ["inv"]),
        helper.make_node("Mul", ["h", "inv"], ["normed"]),
        helper.make_node("Mul", ["normed", "gamma"], ["out"]),
        helper.make_node("Add", ["h", "out"], ["next"]),
    ]
    value = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "S", hidden])  # noqa: E731
    inputs = [value("a"), value("b")]
    if not gamma_constant:
        inputs.append(helper.make_tensor_value_info("gamma", TensorProto.FLOAT, [hidden]))
    graph = helper.make_graph(nodes, "norm", inputs, [value("next")], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_skip_rms_norm_fusion_on_a_hand_built_block(rng):
    proto = rms_norm_block(rng)
    model = ir.serde.deserialize_model(proto)
    assert rewrite_graph(model, GraphOptions.only("fuse_norms")).skip_norms_fused == 1
    fused = ir.serde.serialize_model(model)
    assert sorted(n.op_type for n in fused.graph.node) == ["Add", "SkipSimplifiedLayerNormalization"]
    feeds = {"a": rng.standard_normal((2, 3, 16)).astype(np.float32), "b": rng.standard_normal((2, 3, 16)).astype(np.float32)}
    np.testing.assert_allclose(run(fused, feeds, library=False)[0], run(proto, feeds, library=False)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", [dict(gamma_constant=False), dict(mean_axis=1), dict(power=3.0)])
def test_skip_rms_norm_fusion_leaves_other_norms_alone(rng, change):
    proto = rms_norm_block(rng, **change)
    model = ir.serde.deserialize_model(proto)
    assert rewrite_graph(model, GraphOptions.only("fuse_norms")).skip_norms_fused == 0
    assert sorted(n.op_type for n in model.graph) == sorted(n.op_type for n in proto.graph.node)


def test_siblings_of_different_formats_stay_apart(rng):
    """Layers that read one input but differ in group size (or sparsity, or adapter kind) cannot share
    one node: nothing is merged."""
    from slim_onnx.node_builder import add_fallback_functions, make_slim_matmul_node
    from slim_onnx.passes import MergeSiblingLayersPass, run_passes

    nodes, inits = [], []
    for i, group in enumerate((16, 32)):
        node, tensors = make_slim_matmul_node(random_weights(rng, K, 16, group_size=group), "x", f"y{i}", f"layer{i}")
        nodes.append(node)
        inits += tensors
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["b", 16]) for i in range(2)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    add_fallback_functions(proto)
    model = ir.serde.deserialize_model(proto)
    merge = MergeSiblingLayersPass()
    run_passes(model, [merge])
    assert merge.merged == [] and [n.op_type for n in model.graph] == ["SlimMatMul", "SlimMatMul"]


def test_initializers_that_are_graph_inputs_stay(rng):
    """Older exporters list every initializer as a graph input too (a default the caller may
    override): such a weight must not be dropped when its layer is replaced, or the model would
    need it fed."""
    w, b = (rng.standard_normal(s).astype(np.float32) for s in ((K, N), (N,)))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["mm"], name="/q/MatMul"), helper.make_node("Add", ["mm", "b"], ["y"])],
        "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("x", ["n", K]), ("w", [K, N]), ("b", [N]))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", N])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    weights = {"/q/MatMul": slim_onnx.pack_weight(w, 16, sparse=False, bias=b)}
    compressed = ir.to_proto(compress_graph(model, weights, accuracy_level=0))
    assert {i.name for i in compressed.graph.initializer} >= {"w", "b"}
    x = rng.standard_normal((3, K)).astype(np.float32)
    for library in (True, False):  # x alone is enough
        np.testing.assert_allclose(run(compressed, {"x": x}, library)[0], x @ weights["/q/MatMul"].dense_weight() + b,
                                   rtol=1e-4, atol=1e-4)
