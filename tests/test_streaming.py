"""Block streaming (slim_onnx/streaming.py, blocks.py) on a model with its weights in external data
(tools/scale_model.py's random Llama): segments, the activation cache, packed weights moved to disk,
and the input left as it was."""

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

import slim_onnx
from slim_onnx import SlimConfig
from slim_onnx.blocks import STATIC, Submodel, assign_segments
from slim_onnx.passes import find_linear_layers
from slim_onnx.pipeline import InputError, transformer_blocks
from slim_onnx.streaming import ActivationCache

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("scale_model", ROOT / "tools" / "scale_model.py")
scale_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale_model)

SHAPES = {"hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "blocks": 3, "vocab": 97}
FAST = SlimConfig(rank=8)


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("random_llama")
    scale_model.write_llama(root / "model", **SHAPES, rope_theta=10000.0)
    npz = scale_model.random_calibration_npz(root / "calib.npz", vocab=SHAPES["vocab"], windows=3, seqlen=16)
    return root / "model", npz


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _initializers(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path), load_external_data=True)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_segments_follow_the_blocks(random_llama):
    """Static nodes are those no layer feeds (embedding, mask, rotary, block 0's norm); every other
    node sits in the segment of the latest layer it depends on; a block's statistics sub-model holds
    its own layers' inputs' producers and no layer of any other block."""
    model = ir.load(random_llama[0] / "model.onnx")
    groups = transformer_blocks(find_linear_layers(model))
    assert [len(g) for g in groups] == [7, 7, 7, 1]
    group_of = {layer.node: g for g, group in enumerate(groups) for layer in group}
    segment = assign_segments(model.graph, group_of.get)
    by_name = {node.name: s for node, s in segment.items()}
    assert by_name["/model/embed_tokens/Gather"] == STATIC and by_name["/model/mask/Where"] == STATIC
    assert by_name["/model/rotary_emb/Cos"] == STATIC and by_name["/model/layers.0/input_layernorm/Mul_1"] == STATIC
    assert by_name["/model/layers.0/Add_1"] == 0 and by_name["/model/layers.1/input_layernorm/Mul_1"] == 0
    assert by_name["/model/layers.1/self_attn/o_proj/MatMul"] == 1 and by_name["/model/norm/Mul_1"] == 2
    for node, s in segment.items():  # a node is never in an earlier segment than what it reads
        for value in node.inputs:
            if value is not None and value.producer() is not None:
                assert segment[value.producer()] <= s

    block = groups[1]
    part = Submodel(model, list({layer.node.inputs[0]: None for layer in block}), lambda node: segment[node] < 1)
    others = {layer.node for g, group in enumerate(groups) if g != 1 for layer in group}
    own = {layer.node for layer in block if layer.name.endswith(("q_proj/MatMul", "k_proj/MatMul", "v_proj/MatMul",
                                                                 "gate_proj/MatMul", "up_proj/MatMul"))}
    assert not others & set(part.nodes) and own <= set(part.nodes)  # o_proj, down_proj inputs need these
    cut = {v.name: segment[v.producer()] for v in part.cut_values}
    assert {name for name, s in cut.items() if s == 0} == {  # from block 0: the residual and the normed input
        "/model/layers.0/Add_1_output_0", "/model/layers.1/input_layernorm/Mul_1_output_0"}
    assert {name for name, s in cut.items() if s == STATIC} == {  # and the static part's mask and rotary tables
        "/model/mask/Where_output_0", "/model/rotary_emb/Cos_output_0", "/model/rotary_emb/Sin_output_0"}


def test_activation_cache_spills_past_its_budget(tmp_path):
    """Arrays over the budget go to .npy files and come back equal; dropping them deletes the files."""
    rng = np.random.default_rng(0)
    arrays = {(w, name): rng.standard_normal((1, 5, 8)).astype(np.float32) for w in range(3) for name in "ab"}
    cache = ActivationCache(tmp_path / "cache", budget=2 * 160)
    for (w, name), array in arrays.items():
        cache.put(w, name, array)
    assert cache.memory_bytes == 320 and cache.disk_bytes == 4 * 160 and len(list((tmp_path / "cache").iterdir())) == 4
    for (w, name), array in arrays.items():
        np.testing.assert_array_equal(cache.get(w, [name])[name], array)
    cache.keep_only({"b"})
    assert cache.names() == {"b"} and cache.memory_bytes + cache.disk_bytes == 3 * 160
    assert len(list((tmp_path / "cache").iterdir())) == 2
    cache.keep_only(set())
    assert not list((tmp_path / "cache").iterdir())
    for budget in (8, 0):  # a 0-d value (a shape computation's scalar) stays 0-d, in memory and on disk
        cache = ActivationCache(tmp_path / "scalar", budget=budget)
        cache.put(0, "length", np.array(24, np.int64))
        assert cache.get(0, ["length"])["length"].shape == () and cache.get(0, ["length"])["length"] == 24


def test_streaming_with_external_weights_moves_packed_weights_to_disk(random_llama, tmp_path, monkeypatch):
    """A model with external data: each block's packed weights go to the scratch file as the block is
    done, the output is written with external data, equal tensor for tensor to a run that keeps them
    in memory; the input folder is untouched and the scratch folder removed."""
    from slim_onnx import pipeline

    model, npz = random_llama
    before = _digests(model)
    report = slim_onnx.compress(model, tmp_path / "spilled", FAST, str(npz), log=lambda msg: None)
    assert report["calibration"] == "stream" and report["streaming"]["spilled_weight_bytes"] > 0
    assert len(report["streaming"]["blocks"]) == 4
    real = pipeline.stream_blocks
    monkeypatch.setattr(pipeline, "stream_blocks", lambda *a, **kw: real(*a, **(kw | {"spill_weights": False})))
    kept = slim_onnx.compress(model, tmp_path / "memory", FAST, str(npz), log=lambda msg: None)
    assert kept["streaming"]["spilled_weight_bytes"] == 0
    assert (tmp_path / "spilled" / "model.onnx_data").is_file()
    spilled, memory = _initializers(tmp_path / "spilled" / "model.onnx"), _initializers(tmp_path / "memory" / "model.onnx")
    assert spilled.keys() == memory.keys()
    for name, array in spilled.items():
        np.testing.assert_array_equal(array, memory[name], err_msg=name)
    assert _digests(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory", "spilled"]


def test_streamed_model_tracks_the_dense_model(random_llama, tmp_path):
    """The streamed output runs with our kernels, and its logits stay close to the dense model's (a
    random model with 16-token windows: a loose bound that a broken block order or cache would miss)."""
    import onnxruntime as ort

    model, npz = random_llama
    slim_onnx.compress(model, tmp_path / "slim", FAST, str(npz), log=lambda msg: None)
    feeds = {k: v[0] for k, v in np.load(npz).items()}
    dense = ort.InferenceSession(str(model / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    slim = ort.InferenceSession(str(tmp_path / "slim" / "model.onnx"), slim_onnx.session_options(),
                                providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    cosine = (dense * slim).sum() / np.linalg.norm(dense) / np.linalg.norm(slim)
    assert cosine > 0.9, cosine


def test_layers_inside_subgraphs_cannot_be_calibrated(tmp_path, rng):
    """A layer inside an If branch (Optimum's merged decoder) cannot be calibrated: one clear error
    with the fix, before any work, and no output."""
    from onnx import TensorProto, helper

    def branch(name):
        w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), f"{name}_w")
        return helper.make_graph([helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"], name=f"/{name}/MatMul")],
                                 name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)], [w])

    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else"))], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(tmp_path / "m.onnx"))
    feeds = [{"x": rng.standard_normal((2, 8)).astype(np.float32), "cond": np.array(True)}]
    with pytest.raises(InputError, match="inside If/Loop subgraphs.*--no-post-process"):
        slim_onnx.compress(tmp_path / "m.onnx", tmp_path / "out", FAST, feeds, log=lambda msg: None)
    assert not (tmp_path / "out").exists()


def test_an_encoder_streams_block_by_block(tmp_path, monkeypatch):
    """A BERT export (`/encoder/layer.N/` blocks, attention mask and token types read by every block,
    a pooler after them): each block's statistics come from its own sub-model on the compressed
    earlier blocks, equal to a run of the whole model, and the output stays close to the dense one."""
    import onnxruntime as ort
    import torch
    from transformers import BertConfig, BertModel

    from helpers import check_streamed_statistics, export
    from slim_onnx.calibration import model_feeds

    torch.manual_seed(0)
    config = BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=64)
    src = export(BertModel(config), tmp_path, "feature-extraction")
    model = ir.load(src / "model.onnx")
    feeds = list(model_feeds(model, np.random.default_rng(0).integers(0, 128, size=(4, 24))))
    seen = check_streamed_statistics(monkeypatch, src / "model.onnx")
    report = slim_onnx.compress(src, tmp_path / "slim", SlimConfig(rank=8), feeds, log=lambda msg: None)
    assert [len(names) for names, _ in seen][:2] == [6, 6] and len(report["streaming"]["blocks"]) == len(seen)
    dense = ort.InferenceSession(str(src / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
    slim = ort.InferenceSession(str(tmp_path / "slim" / "model.onnx"), slim_onnx.session_options(),
                                providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
    cosine = (dense * slim).sum(-1) / np.linalg.norm(dense, axis=-1) / np.linalg.norm(slim, axis=-1)
    assert cosine.min() > 0.9, cosine.min()
