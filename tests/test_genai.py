"""onnxruntime-genai: a folder made by its model builder, compressed, generates through og.Model
and og.Generator with our kernels (genai_config.json names the library, copied into the folder)."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import genai_build, tiny_llama_export

import slim_onnx
from slim_onnx.calibration import model_feeds
from slim_onnx.pipeline import load_model, resolve_model_path
from slim_onnx.sensitivity import output_divergence

og = pytest.importorskip("onnxruntime_genai")
os.environ["HF_HUB_OFFLINE"] = "1"
PROMPT = [5, 17, 42, 9, 77, 120]
STEPS = 16


def cli(*args):
    return subprocess.run([sys.executable, "-m", "slim_onnx.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(root, the genai float folder, it compressed, the Optimum export compressed alike)."""
    root = tiny_llama_export(tmp_path_factory.mktemp("genai"), initializer_range=0.2)  # decisive logits
    float_dir = genai_build(root / "hf", root / "genai")
    common = ["--calib", root / "calib.txt", "--calib-samples", 8, "--seqlen", 64, "-q"]
    for src, out in ((float_dir, root / "genai_slim"), (root / "onnx", root / "optimum_slim")):
        res = cli("compress", src, out, *common)
        assert res.returncode == 0, res.stderr
    return root, float_dir, root / "genai_slim", root / "optimum_slim"


def og_generate(folder):
    """og's greedy tokens after PROMPT, and the last position's logits it chose each one from."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + STEPS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([PROMPT], dtype=np.int32))
    logits = []
    while not generator.is_done():
        logits.append(np.asarray(generator.get_logits())[0, -1].astype(np.float64))
        generator.generate_next_token()
    return list(generator.get_sequence(0)[len(PROMPT):]), logits


def ort_logits(folder, ids, library=True):
    """Each position's logits of `ids` from the folder's model.onnx in onnxruntime (empty past)."""
    path = resolve_model_path(folder)
    config = json.loads((path.parent / "genai_config.json").read_text()) if (path.parent / "genai_config.json").exists() else None
    so = slim_onnx.session_options() if library else ort.SessionOptions()
    session = ort.InferenceSession(str(path), so)
    model = load_model(path)
    head = config["model"]["decoder"]["head_size"] if config else None
    feeds = next(model_feeds(model, np.array([ids]), head))
    return session.run(["logits"], feeds)[0][0].astype(np.float64)


def test_compressed_genai_folder_carries_our_library_and_keeps_its_graph(models):
    _, float_dir, slim_dir, _ = models
    config = json.loads((slim_dir / "genai_config.json").read_text())
    original = json.loads((float_dir / "genai_config.json").read_text())
    library = config["model"]["decoder"]["session_options"].pop("custom_ops_library")
    assert config == original  # nothing else changed
    assert (slim_dir / library).read_bytes() == open(slim_onnx.library_path(), "rb").read()
    ops = [n.op_type for n in onnx.load(str(slim_dir / "model.onnx"), load_external_data=False).graph.node]
    before = [n.op_type for n in onnx.load(str(float_dir / "model.onnx"), load_external_data=False).graph.node]
    # the packed QKV, o, gate/up (merged, SwiGLU folded), down per block, and lm_head; GQA kept
    assert ops.count("SlimMatMul") == 2 * 4 + 1 and "MatMul" not in ops
    assert ops.count("GroupQueryAttention") == before.count("GroupQueryAttention") == 2


def test_og_generates_with_our_kernels_as_onnxruntime_runs_them(models):
    """og's cached, step-by-step generation on the compressed folder gives the tokens and logits
    that onnxruntime gives running the same model.onnx over each whole prefix (our kernels both)."""
    _, _, slim_dir, _ = models
    tokens, logits = og_generate(slim_dir)
    assert len(tokens) == STEPS
    ids = PROMPT + tokens
    reference = ort_logits(slim_dir, ids)
    for step, got in enumerate(logits):
        want = reference[len(PROMPT) - 1 + step]
        spread = want.max() - want.min()
        np.testing.assert_allclose(got, want, atol=2e-2 * spread)
        top2 = np.sort(want)[-2:]
        if top2[1] - top2[0] > 2 * np.abs(got - want).max():
            assert tokens[step] == int(want.argmax()), step


def test_compressed_genai_model_is_as_close_to_float_as_the_optimum_path(models):
    """The genai float model is the model Optimum exports (same logits); compressed, each drifts
    from its float model by a comparable KL on the same tokens (the weights are compressed alike:
    genai's packed QKV is q, k and v side by side)."""
    root, float_dir, slim_dir, optimum_slim = models
    ids = PROMPT + og_generate(float_dir)[0]
    genai_float, optimum_float = ort_logits(float_dir, ids, False), ort_logits(root / "onnx", ids, False)
    np.testing.assert_allclose(genai_float, optimum_float, atol=1e-3 * np.ptp(optimum_float))
    kl_genai = output_divergence(genai_float, ort_logits(slim_dir, ids), True)
    kl_optimum = output_divergence(optimum_float, ort_logits(optimum_slim, ids), True)
    assert 0 < kl_genai < 2 * kl_optimum + 0.02, (kl_genai, kl_optimum)


def test_a_matmulnbits_build_is_refused(models, tmp_path):
    root, _, _, _ = models
    int4 = genai_build(root / "hf", tmp_path / "int4", precision="int4")
    res = cli("compress", int4, tmp_path / "out", "--calib", root / "calib.txt", "--calib-samples", 4, "--seqlen", 32)
    assert res.returncode == 2 and "already quantized (MatMulNBits)" in res.stderr and "-p fp32" in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config,message", [("{not json", "is not a readable onnxruntime-genai config"),
                                            ('{"model": {}}', "is not a readable onnxruntime-genai config"),
                                            ('{"model": {"decoder": {"head_size": -3}}}', "is not a head size")])
def test_a_damaged_genai_config_is_named(models, tmp_path, config, message):
    import shutil

    root, float_dir, _, _ = models
    src = tmp_path / "genai"
    shutil.copytree(float_dir, src)
    (src / "genai_config.json").write_text(config)
    res = cli("compress", src, tmp_path / "out", "--calib", root / "calib.txt", "--calib-samples", 4, "--seqlen", 32)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not (tmp_path / "out").exists() and (src / "genai_config.json").read_text() == config
