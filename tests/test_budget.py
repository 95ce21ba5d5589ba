"""Per-layer formats under a byte budget: exact bytes, the knapsack against brute force, and the
candidates' predicted errors against compressing the layer with each one."""

import itertools

import numpy as np
import pytest
from helpers import random_weights

from slim_onnx.algorithms.layer import candidate_errors, compress_layer
from slim_onnx.algorithms.stats import LayerStatistics
from slim_onnx.budget import LADDER, Budget, Candidate, candidate_bytes, choose_formats, sibling_groups, smallest_budget
from slim_onnx.config import ConfigError, SlimConfig
from slim_onnx.layout import packed_nbytes
from slim_onnx.packing import pack_layer


@pytest.mark.parametrize("k,n", [(64, 48), (100, 33), (576, 192)])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("adapter_format,rank", [("none", 0), ("int4", 8), ("int4", 20), ("float16", 5)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_nbytes_is_what_packing_writes(rng, k, n, sparse, adapter_format, rank, bias):
    if sparse and k % 4:
        pytest.skip("2:4 needs K % 4 == 0")
    w = random_weights(rng, k, n, sparse=sparse, adapter_format=adapter_format, rank=rank, bias=bias)
    assert packed_nbytes(k, n, w.group_size, sparse, w.rank, w.adapter_format, w.adapter_group_size, bias) == w.nbytes()


def brute_force(costs, sizes, budget):
    best = (np.inf, None)
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        size = sum(sizes[l][c] for l, c in enumerate(choice))
        cost = sum(costs[l][c] for l, c in enumerate(choice))
        if size <= budget and cost < best[0]:
            best = (cost, choice)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_choose_formats_is_the_exact_optimum(seed):
    """Small random instances against every combination (units fine enough to count single bytes)."""
    rng = np.random.default_rng(seed)
    layers, candidates = 5, 4
    sizes = rng.integers(1, 40, size=(layers, candidates))
    costs = rng.random((layers, candidates)) * 10
    costs[rng.random((layers, candidates)) < 0.1] = np.inf  # some formats a layer cannot take
    costs[:, 0] = rng.random(layers) * 10  # every layer keeps one
    lo = sizes[:, 0].sum()
    for budget in (lo, lo + 7, lo + 30, sizes.max(axis=1).sum()):
        choice = choose_formats(costs, sizes, int(budget), units=int(budget))
        cost, _ = brute_force(costs, sizes, budget)
        assert sum(sizes[l, c] for l, c in enumerate(choice)) <= budget
        assert sum(costs[l, c] for l, c in enumerate(choice)) == pytest.approx(cost)


def test_choose_formats_with_coarse_units_stays_within_budget():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1000, 100000, size=(50, 8))
    costs = rng.random((50, 8))
    budget = int(sizes.mean(axis=1).sum())
    choice = choose_formats(costs, sizes, budget, units=64)
    assert sum(sizes[l, c] for l, c in enumerate(choice)) <= budget


def test_choose_formats_refuses_an_impossible_budget():
    with pytest.raises(ConfigError, match="below the smallest"):
        choose_formats(np.ones((2, 2)), np.array([[10, 20], [10, 20]]), 19)


def test_budget_goals():
    assert Budget(bits=4).bytes(1000) == 500
    assert Budget(size_ratio=0.25).bytes(1000) == 500
    assert Budget(ppl_ratio=1.5).divergence_goal() == pytest.approx(np.log(1.5))
    assert Budget(max_kl=0.2).is_quality and not Budget(bits=3).is_quality
    with pytest.raises(ConfigError, match="exactly one"):
        Budget()
    with pytest.raises(ConfigError, match="exactly one"):
        Budget(bits=4, max_kl=0.1)
    with pytest.raises(ConfigError, match="fraction of the float16 size"):
        Budget(size_ratio=1.5)
    with pytest.raises(ConfigError, match="ratio above 1"):
        Budget(ppl_ratio=0.9)
    with pytest.raises(ConfigError, match="no byte budget"):
        Budget(max_kl=0.1).bytes(1000)


@pytest.mark.parametrize("seed", range(8))
def test_smallest_budget_is_the_fewest_bytes_reaching_a_cost(seed):
    """Against every combination: the least total size among the choices whose cost is within the
    goal, and the least-cost choice's size where no choice reaches it."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 40, size=(4, 4))
    costs = rng.random((4, 4)) * 10
    combos = [(sum(sizes[l, c] for l, c in enumerate(ch)), sum(costs[l, c] for l, c in enumerate(ch)))
              for ch in itertools.product(range(4), repeat=4)]
    for goal in (5.0, 10.0, 20.0, 0.0):
        fits = [size for size, cost in combos if cost <= goal]
        want = min(fits) if fits else min(combos, key=lambda sc: sc[1])[0]
        got = smallest_budget(costs, sizes, goal, units=int(sizes.max(axis=1).sum()))
        assert got == want
        if fits:
            choice = choose_formats(costs, sizes, got, units=got)
            assert sum(costs[l, c] for l, c in enumerate(choice)) <= goal


def test_candidate_bytes_match_the_compressed_layer(rng):
    k, n = 256, 96
    w = rng.standard_normal((k, n)).astype(np.float32)
    base = SlimConfig(pruning="magnitude", quantizer="absmax", lowrank="naive")
    for candidate in LADDER:
        layer = compress_layer(w, None, candidate.config(base))
        assert candidate_bytes(k, n, candidate, base) == pack_layer(layer).nbytes(), candidate.label


def test_candidate_errors_are_the_layers_output_errors(rng):
    """Each candidate's predicted tr(E^T H E) / tr(W^T H W) is what compressing the layer with that
    format gives (the report's relative output error, squared); more rank or no sparsity lowers it."""
    import torch

    k, n = 128, 96
    x = rng.standard_normal((512, k)).astype(np.float32) * (1 + rng.random(k).astype(np.float32) * 3)
    w = rng.standard_normal((k, n)).astype(np.float32)
    stats = LayerStatistics(k)
    stats.update(torch.from_numpy(x))
    base = SlimConfig()
    configs = [c.config(base) for c in LADDER]
    predicted, _ = candidate_errors(w, stats, configs)
    for config, error in zip(configs, predicted):
        measured = compress_layer(w, stats, config).report["output_error"] ** 2
        assert error == pytest.approx(measured, rel=1e-3)
    by_label = dict(zip((c.label for c in LADDER), predicted))
    # the matrix it multiplies by, and the reference code's re-quantization after the adapters, as compress_layer
    requantized = Candidate("2:4", 0.1).config(SlimConfig(requantize=True))
    (error,), weight = candidate_errors(w, stats, [requantized], weight_of=0)
    layer = compress_layer(w, stats, requantized)
    assert error == pytest.approx(layer.report["output_error"] ** 2, rel=1e-3)
    np.testing.assert_allclose(weight, layer.effective_weight(), rtol=1e-5, atol=1e-5)
    assert by_label["2:4+r0.25"] < by_label["2:4+r0.1"] < by_label["2:4+r0"]
    assert by_label["none+r0"] < by_label["2:4+r0"]


def test_candidate_config_switches_only_the_format():
    base = SlimConfig()
    dense = Candidate("none", 0).config(base)
    assert dense.sparsity == "none" and not dense.has_adapters and dense.quantizer == base.quantizer
    assert Candidate("2:4", 0.25).config(SlimConfig(rank=0, adapter_format="none")).adapter_format == "int4"


def test_sensitivity_probe_measures_one_layer_at_a_time(tmp_path):
    """The probe's dense run is the model's own output; replacing one layer's weight moves the
    output by the KL the model itself gives with that weight (checked on a copy with the weight
    really replaced), and a tied lm_head can be probed without touching the embedding."""
    import onnx_ir as ir
    import onnxruntime as ort
    from helpers import tiny_llama_export

    from slim_onnx.calibration import model_feeds
    from slim_onnx.passes import find_linear_layers
    from slim_onnx.sensitivity import SensitivityProbe, output_divergence

    root = tiny_llama_export(tmp_path)
    path = root / "onnx" / "model.onnx"
    model = ir.load(path)
    layers = {layer.name: layer for layer in find_linear_layers(model)}
    feeds = list(model_feeds(model, np.array([np.arange(3, 19), np.arange(40, 56)])))
    names = ["/model/layers.1/mlp/down_proj/MatMul", "/lm_head/MatMul"]
    probe = SensitivityProbe(path, names, feeds, tmp_path)
    dense = [ort.InferenceSession(str(path)).run(["logits"], f)[0] for f in feeds]
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(dense, probe.dense))
    for name in names:
        w = layers[name].weight_array()
        assert probe.measure({name: w}).divergence == pytest.approx(0, abs=1e-9)
        noisy = w + np.random.default_rng(1).standard_normal(w.shape).astype(np.float32) * 0.05
        expected = 0.0
        for feed, d in zip(feeds, dense):  # the same change made in the model itself
            changed = ir.load(path)
            layer = {l.name: l for l in find_linear_layers(changed)}[name]
            new = ir.Value(name="replaced", shape=ir.Shape(noisy.shape), type=ir.TensorType(ir.DataType.FLOAT),
                           const_value=ir.tensor(noisy, name="replaced"))
            changed.graph.register_initializer(new)
            layer.node.replace_input_with(1, new)  # MatMul(x, W [K, N]), also where a tied lm_head read a Transpose
            proto = ir.serde.serialize_model(changed)
            out = ort.InferenceSession(proto.SerializeToString()).run(["logits"], feed)[0]
            expected += output_divergence(d, out, True) / len(feeds)
        assert expected > 0 and probe.measure({name: noisy}).divergence == pytest.approx(expected, rel=1e-4)
    # a whole plan: both layers replaced at once, and the perplexity of the windows' next tokens
    # against torch's cross entropy on the same change made in the model itself
    import torch

    noisy = {name: layers[name].weight_array() * 1.5 for name in names}
    changed = ir.load(path)
    for layer in (l for l in find_linear_layers(changed) if l.name in names):
        new = ir.Value(name=f"replaced{layer.name}", shape=ir.Shape(noisy[layer.name].shape), type=ir.TensorType(ir.DataType.FLOAT),
                       const_value=ir.tensor(noisy[layer.name], name=f"replaced{layer.name}"))
        changed.graph.register_initializer(new)
        layer.node.replace_input_with(1, new)
    session = ort.InferenceSession(ir.serde.serialize_model(changed).SerializeToString())
    kl, nll = 0.0, 0.0
    for feed, d in zip(feeds, dense):
        out = session.run(["logits"], feed)[0]
        kl += output_divergence(d, out, True) / len(feeds)
        ids = torch.from_numpy(feed["input_ids"][:, 1:]).reshape(-1)
        for logits, sign in ((out, 1), (d, -1)):
            flat = torch.from_numpy(logits[:, :-1]).double().reshape(-1, logits.shape[-1])
            nll += sign * float(torch.nn.functional.cross_entropy(flat, ids)) / len(feeds)
    measured = probe.measure(noisy)
    assert measured.divergence == pytest.approx(kl, rel=1e-4)
    assert measured.ppl_ratio == pytest.approx(np.exp(nll), rel=1e-5) and measured.ppl_ratio > 1


def test_sibling_groups_are_the_layers_reading_one_activation():
    import onnx_ir as ir

    x, y = ir.Value(name="x"), ir.Value(name="y")

    class Layer:
        def __init__(self, value):
            self.node = ir.node("MatMul", [value, None])

    layers = [Layer(x), Layer(x), Layer(y), Layer(x), Layer(y)]
    assert sibling_groups(layers) == [[0, 1, 3], [2, 4]]


def test_plan_figure_draws_each_layers_bytes_and_sensitivity(tmp_path):
    """The bars are the layers' bytes by format, the line their sensitivities, in layer order, and
    the file is written whole (inspect --plot on real models: test_pipeline)."""
    pytest.importorskip("matplotlib")
    from slim_onnx.plot import plan_figure, save_plan_figure

    plan = [{"layer": f"/model/layers.{i // 3}/l{i % 3}/MatMul", "format": ("2:4+r0.1", "none+r0")[i % 2],
             "bytes": 1000 * (i + 1), "sensitivity": 0.1 / (i + 1), "predicted_damage": 0.01 * i} for i in range(9)]
    top, bottom = plan_figure(plan).axes
    bars = sorted((round(b.get_x() + b.get_width() / 2), b.get_height()) for b in top.patches)
    assert bars == [(i, p["bytes"] / 2**20) for i, p in enumerate(plan)]
    assert {t.get_text() for t in top.get_legend().get_texts()} == {"2:4+r0.1", "none+r0"}
    np.testing.assert_allclose(bottom.lines[0].get_ydata(), [p["sensitivity"] for p in plan])
    assert [t.get_text() for t in bottom.get_xticklabels()] == ["0", "1", "2"]
    path = save_plan_figure(plan, tmp_path / "plan.svg")
    assert path.read_text().lstrip().startswith("<?xml") and [p.name for p in tmp_path.iterdir()] == ["plan.svg"]


def test_layers_that_cannot_be_2of4_take_dense_formats_under_a_budget(tmp_path):
    """K = 6 rules out 2:4: without a budget such a layer stays float, with one it is planned among
    the dense 4-bit formats and compressed, and the model computes close to the float one."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    import slim_onnx
    from slim_onnx.config import GraphOptions

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((6, 64)).astype(np.float32), rng.standard_normal((64, 32)).astype(np.float32) / 8
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="/model/layers.0/up/MatMul"),
         helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"], name="/model/layers.0/down/MatMul")],
        "k6", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 32])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    src = tmp_path / "k6.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), src)
    feeds = [{"x": rng.standard_normal((2, 16, 6)).astype(np.float32)} for _ in range(6)]
    options = dict(graph=GraphOptions(accuracy_level=0), calibration_mode="one-pass", log=lambda msg: None)
    uniform = slim_onnx.compress(src, tmp_path / "uniform", slim_onnx.SlimConfig(), feeds, **options)
    assert uniform["kept_dense"] == ["/model/layers.0/up/MatMul"]
    planned = slim_onnx.compress(src, tmp_path / "planned", slim_onnx.SlimConfig(), feeds, budget=Budget(size_ratio=0.4), **options)
    formats = {layer["layer"]: layer["plan"]["format"] for layer in planned["layers"]}
    assert formats["/model/layers.0/up/MatMul"].startswith("none+") and planned["kept_dense"] == []
    session = ort.InferenceSession(str(tmp_path / "planned" / "k6.onnx"), slim_onnx.session_options())
    want = np.maximum(feeds[0]["x"] @ w1, 0) @ w2
    got = session.run(["y"], feeds[0])[0]
    assert np.abs(got - want).max() < 0.2 * np.abs(want).max()
