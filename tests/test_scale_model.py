"""tools/scale_model.py: the random Llama it writes computes the Llama forward pass (checked against
numpy), keeps its weights in the external data file, names its layers as Optimum exports do, and its
calibration .npz has the shapes the pipeline reads."""

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("scale_model", ROOT / "tools" / "scale_model.py")
scale_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale_model)

TINY = {"hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "blocks": 2, "vocab": 97}
THETA, EPS = 10000.0, 1e-5


def _llama_reference(w: dict, input_ids, attention_mask, position_ids, *, hidden, heads, kv_heads, blocks, **_):
    """The Llama forward pass as transformers computes it (float64): RMSNorm, rotate-half rotary
    embedding, grouped-query attention with a causal and padding mask, SwiGLU MLP."""
    d = hidden // heads

    def norm(x, gamma):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * gamma

    def rope(x, cos, sin):
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + np.concatenate([-x2, x1], -1) * sin

    batch, seq = input_ids.shape
    angles = position_ids[..., None] * (1.0 / THETA ** (np.arange(0, d, 2) / d))  # [B, S, D/2]
    angles = np.concatenate([angles, angles], -1)[:, None]  # [B, 1, S, D]
    cos, sin = np.cos(angles), np.sin(angles)
    visible = np.tril(np.ones((seq, seq), bool))[None, None] & attention_mask[:, None, None, :].astype(bool)

    h = w["model.embed_tokens.weight"][input_ids]
    for i in range(blocks):
        layer = f"model.layers.{i}."
        x = norm(h, w[layer + "input_layernorm.weight"])

        def project(name, count, x=x, layer=layer):  # [B, S, hidden] -> [B, count, S, D]
            return (x @ w[f"{layer}self_attn.{name}_proj.weight"]).reshape(batch, seq, count, d).transpose(0, 2, 1, 3)

        q = rope(project("q", heads), cos, sin)
        k = np.repeat(rope(project("k", kv_heads), cos, sin), heads // kv_heads, axis=1)
        v = np.repeat(project("v", kv_heads), heads // kv_heads, axis=1)
        # masked: a huge finite score, not -inf, so that padding queries (no visible key) stay finite
        scores = np.where(visible, q @ k.transpose(0, 1, 3, 2) / np.sqrt(d), -1e30)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, hidden)
        h = h + context @ w[layer + "self_attn.o_proj.weight"]
        x = norm(h, w[layer + "post_attention_layernorm.weight"])
        gate = x @ w[layer + "mlp.gate_proj.weight"]
        h = h + (gate / (1 + np.exp(-gate)) * (x @ w[layer + "mlp.up_proj.weight"])) @ w[layer + "mlp.down_proj.weight"]
    return norm(h, w["model.norm.weight"]) @ w["lm_head.weight"]


def test_random_llama_matches_numpy_reference(tmp_path):
    path = scale_model.write_llama(tmp_path, **TINY, seed=3, rope_theta=THETA, eps=EPS)
    assert path == tmp_path / "model.onnx"
    data = tmp_path / "model.onnx_data"
    assert data.stat().st_size > 4 * TINY["vocab"] * TINY["hidden"] * 2  # embedding + lm_head at least
    assert path.stat().st_size < 64 * 1024  # the graph alone: no weights inline
    assert (tmp_path / "config.json").exists()

    model = onnx.load(path, load_external_data=False)
    assert model.ir_version == 10
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]
    assert all(node.domain == "" for node in model.graph.node)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "position_ids"]
    assert [o.name for o in model.graph.output] == ["logits"]
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) == 3 + 9 * TINY["blocks"]  # embedding, final norm, lm_head; 7 linear + 2 norms a block
    for tensor in external:
        info = {e.key: e.value for e in tensor.external_data}
        assert info["location"] == "model.onnx_data" and int(info["offset"]) % 4096 == 0
    names = {node.name for node in model.graph.node}
    for i in range(TINY["blocks"]):
        for layer in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
                      "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"):
            assert f"/model/layers.{i}/{layer}/MatMul" in names
    assert {"/model/embed_tokens/Gather", "/lm_head/MatMul"} <= names

    weights = {t.name: numpy_helper.to_array(t).astype(np.float64)
               for t in onnx.load(path, load_external_data=True).graph.initializer}
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (64, 32)  # [K, N]
    assert weights["lm_head.weight"].shape == (64, 97)

    rng = np.random.default_rng(0)
    input_ids = rng.integers(0, TINY["vocab"], size=(2, 7))
    attention_mask = np.ones((2, 7), np.int64)
    attention_mask[1, :3] = 0  # left padding
    position_ids = np.maximum(attention_mask.cumsum(1) - 1, 0)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask,
                                   "position_ids": position_ids})
    assert logits.shape == (2, 7, 97) and logits.dtype == np.float32
    expected = _llama_reference(weights, input_ids, attention_mask, position_ids, **TINY)
    real = attention_mask.astype(bool)
    np.testing.assert_allclose(logits[real], expected[real], atol=1e-4, rtol=1e-4)
    assert 0.3 < logits[real].std() < 3  # the weight scaling keeps activations near unit size


def test_random_calibration_npz(tmp_path):
    path = scale_model.random_calibration_npz(tmp_path / "calib.npz", vocab=97, windows=3, seqlen=11, seed=1)
    arrays = np.load(path)
    assert sorted(arrays.files) == ["attention_mask", "input_ids", "position_ids"]
    for array in arrays.values():
        assert array.shape == (3, 1, 11) and array.dtype == np.int64
    assert arrays["input_ids"].min() >= 0 and arrays["input_ids"].max() < 97
    assert (arrays["attention_mask"] == 1).all()
    np.testing.assert_array_equal(arrays["position_ids"][2, 0], np.arange(11))


def _run(path, input_ids, attention_mask, position_ids, past=None) -> dict:
    """The model's outputs by name; past: the cache inputs by name (empty ones when None)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    for info in session.get_inputs()[3:]:
        dtype = np.float16 if info.type == "tensor(float16)" else np.float32
        feeds[info.name] = past[info.name] if past else np.zeros((len(input_ids), info.shape[1], 0, info.shape[3]), dtype)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def test_with_past_matches_the_model_without_cache(tmp_path):
    """Prefill through the cached graph gives the plain graph's logits; one decode step on its cache
    gives the plain graph's logits for the last of n + 1 tokens."""
    plain = scale_model.write_llama(tmp_path / "plain", **TINY, seed=5, rope_theta=THETA)
    cached = scale_model.write_llama(tmp_path / "cached", **TINY, seed=5, rope_theta=THETA, with_past=True)
    model = onnx.load(cached, load_external_data=False)
    blocks = range(TINY["blocks"])
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "position_ids", *(
        f"past_key_values.{i}.{kind}" for i in blocks for kind in ("key", "value"))]
    assert [o.name for o in model.graph.output] == ["logits", *(f"present.{i}.{kind}" for i in blocks for kind in ("key", "value"))]
    assert all(node.domain == "" for node in model.graph.node)

    ids = np.random.default_rng(1).integers(0, TINY["vocab"], size=(2, 9))
    n = ids.shape[1] - 1
    positions = np.broadcast_to(np.arange(n + 1), ids.shape)
    mask = np.ones(ids.shape, np.int64)
    expected = _run(plain, ids, mask, positions)["logits"]
    prefill = _run(cached, ids[:, :n], mask[:, :n], positions[:, :n])
    np.testing.assert_allclose(prefill["logits"], expected[:, :n], atol=1e-5, rtol=1e-5)
    head_dim = TINY["hidden"] // TINY["heads"]
    assert prefill["present.1.value"].shape == (2, TINY["kv_heads"], n, head_dim)

    past = {name.replace("present", "past_key_values"): v for name, v in prefill.items() if name != "logits"}
    step = _run(cached, ids[:, n:], mask, positions[:, n:], past)
    np.testing.assert_allclose(step["logits"][:, 0], expected[:, n], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(step["present.0.key"][:, :, :n], past["past_key_values.0.key"])
    assert step["present.0.key"].shape == (2, TINY["kv_heads"], n + 1, head_dim)


def test_float16_holds_the_float32_weights_rounded(tmp_path):
    full = scale_model.write_llama(tmp_path / "fp32", **TINY, seed=2, with_past=True)
    half = scale_model.write_llama(tmp_path / "fp16", **TINY, seed=2, with_past=True, dtype="float16")
    assert (tmp_path / "fp16" / "model.onnx_data").stat().st_size < (tmp_path / "fp32" / "model.onnx_data").stat().st_size
    model = onnx.load(half, load_external_data=False)
    float16 = onnx.TensorProto.FLOAT16
    assert {t.data_type for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL} == {float16}
    assert all(v.type.tensor_type.elem_type == float16 for v in [*model.graph.input[3:], *model.graph.output])

    ids = np.random.default_rng(2).integers(0, TINY["vocab"], size=(1, 6))
    feeds = (ids, np.ones(ids.shape, np.int64), np.arange(6)[None])
    reference, logits = _run(full, *feeds)["logits"], _run(half, *feeds)["logits"]
    assert logits.dtype == np.float16
    np.testing.assert_allclose(logits.astype(np.float32), reference, atol=0.05 * reference.std())
