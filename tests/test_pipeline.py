"""The user's path: Optimum export -> `slim-onnx compress` -> onnxruntime / ORTModelForCausalLM."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import slim_onnx
from slim_onnx import SlimConfig
from helpers import check_streamed_statistics, tiny_llama_export

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama with tied embeddings and a small BPE tokenizer, exported with past key values."""
    return tiny_llama_export(tmp_path_factory.mktemp("tiny_llama"))


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "slim_onnx.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def compressed(tiny_llama) -> Path:
    out = tiny_llama / "slim"
    res = cli("compress", tiny_llama / "onnx", out, "--calib", tiny_llama / "calib.txt", "--calib-samples", 16, "--seqlen", 64)
    assert res.returncode == 0, res.stderr
    return out


def test_compress_writes_a_complete_folder(tiny_llama, compressed):
    names = {p.name for p in compressed.iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "generation_config.json", "slim_report.json"} <= names
    model = onnx.load(str(compressed / "model.onnx"))
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    # q/k/v and gate/up merged: (qkv, o, gate/up, down) per block, and lm_head; the SwiGLU folded
    # into gate/up, and q/k/v fed packed to the attention, which does the rotary: no Split is left
    assert ops.count("SlimMatMul") == 2 * 4 + 1 and ops.count("Split") == 0
    assert "Sigmoid" not in ops and "RotaryEmbedding" not in ops and ops.count("GroupQueryAttention") == 2
    assert any(n.name == "/model/rotary_emb/MatMul" and n.op_type == "MatMul" for n in model.graph.node)
    assert "Gather" in ops and any(i.name == "model.embed_tokens.weight" for i in model.graph.initializer)
    original = onnx.load(str(tiny_llama / "onnx" / "model.onnx"))
    assert [i.name for i in model.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in model.graph.output] == [o.name for o in original.graph.output]
    report = json.loads((compressed / "slim_report.json").read_text())
    assert report["totals"]["layers"] == 15 and report["totals"]["bytes_packed"] < report["totals"]["bytes_float16"]
    assert [len(group) for group in report["merged_siblings"]] == [3, 2, 3, 2] and report["swiglu_fused"] == 2
    assert report["attention_fused"] == report["attention_packed"] == 2
    assert all(0 < layer["output_error"] < 1 for layer in report["layers"])


def test_optimum_generates_the_same_tokens_with_and_without_the_library(tiny_llama):
    """With float32 activations (--accuracy-level 0) the kernel and the fallback agree to rounding, so
    greedy decoding matches token for token. (The default int8 path can flip near-ties, as
    MatMulNBits accuracy_level 4 does; this random model's logits are nearly flat.)"""
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    compressed = tiny_llama / "slim_acc0"
    res = cli("compress", tiny_llama / "onnx", compressed, "--calib", tiny_llama / "calib.txt", "--calib-samples", 16,
              "--seqlen", 64, "--accuracy-level", 0, "-q")
    assert res.returncode == 0, res.stderr
    tok = AutoTokenizer.from_pretrained(compressed)
    runs = []
    for prompt in ("The Python language", "A function definition", "Exceptions are"):
        ids = tok(prompt, return_tensors="pt", return_token_type_ids=False)
        tokens = []
        for so in (slim_onnx.session_options(), ort.SessionOptions()):
            model = ORTModelForCausalLM.from_pretrained(compressed, session_options=so)
            tokens.append(model.generate(**ids, max_new_tokens=20, do_sample=False)[0].tolist())
        runs.append(tokens)
    assert all(a == b for a, b in runs)


def test_compressed_logits_stay_close_to_dense(tiny_llama, compressed):
    """A sanity bound: 2:4 + 4-bit + adapters on a random 64-wide model keeps the logits' direction."""
    from slim_onnx.calibration import model_feeds
    import onnx_ir as ir

    feeds = next(model_feeds(ir.load(tiny_llama / "onnx" / "model.onnx"), np.arange(5, 37)[None]))
    dense = ort.InferenceSession(str(tiny_llama / "onnx" / "model.onnx")).run(["logits"], feeds)[0]
    slim = ort.InferenceSession(str(compressed / "model.onnx"), slim_onnx.session_options()).run(["logits"], feeds)[0]
    cos = (dense * slim).sum(-1) / np.linalg.norm(dense, axis=-1) / np.linalg.norm(slim, axis=-1)
    assert cos.mean() > 0.9


def test_inspect_lists_layers(compressed):
    res = cli("inspect", compressed, "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["layers"]
    assert sum("2:4 int4" in r["format"] for r in rows) == 2 * 4 + 1  # nodes: q/k/v and gate/up merged
    # a uniform compression has no per-layer plan to draw
    res = cli("inspect", compressed, "--plot", compressed.parent / "plan.png")
    assert res.returncode == 2 and "holds no per-layer plan" in res.stderr
    assert not (compressed.parent / "plan.png").exists()


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "does not exist"),
        ("not_onnx", "is not a readable ONNX model"),
        ("truncated", "is not a readable ONNX model"),
        ("output_exists", "exists: choose another output folder or pass --overwrite"),
        ("short_text", "fewer than one window"),
        ("already", "is already compressed"),
        ("no_layers", "has no weight MatMul/Gemm layer"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tiny_llama, compressed, tmp_path, case, message):
    src = tiny_llama / "onnx"
    calib = tiny_llama / "calib.txt"
    out = tmp_path / "out"
    if case == "missing":
        src = tmp_path / "nope.onnx"
    elif case == "not_onnx":
        src = tmp_path / "model.onnx"
        src.write_text("hello")
    elif case == "truncated":
        data = (tiny_llama / "onnx" / "model.onnx").read_bytes()
        src = tmp_path / "model.onnx"
        src.write_bytes(data[: len(data) // 2])
    elif case == "output_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "short_text":
        calib = tmp_path / "short.txt"
        calib.write_text("too short")
    elif case == "already":
        src = compressed
    elif case == "no_layers":
        from onnx import TensorProto, helper

        g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        src = tmp_path / "relu.onnx"
        onnx.save(helper.make_model(g), str(src))
    before = sorted(p.name for p in tmp_path.iterdir())
    res = cli("compress", src, out, "--calib", calib, "--calib-samples", 4, "--seqlen", 64)
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written (no temp folder left)
    if case == "output_exists":
        assert (out / "keep.txt").read_text() == "mine"


def test_eval_reports_perplexity_and_agreement(tiny_llama, compressed):
    """Perplexity computed by `slim-onnx eval` equals a direct numpy computation on the dense model."""
    text = tiny_llama / "calib.txt"
    res = cli("eval", compressed, "--text", text, "--reference", tiny_llama / "onnx", "--seqlen", 32, "--windows", 3, "--json")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["tokens"] == 3 * 31 and 0 <= result["kl"] < 0.5 and 0.5 < result["top1_agreement"] <= 1

    from transformers import AutoTokenizer
    from slim_onnx.calibration import model_feeds
    import onnx_ir as ir

    dense = json.loads(cli("eval", tiny_llama / "onnx", "--text", text, "--seqlen", 32, "--windows", 3, "--json").stdout)
    ids = np.asarray(AutoTokenizer.from_pretrained(tiny_llama / "onnx")(text.read_text())["input_ids"][: 3 * 32]).reshape(3, 32)
    session = ort.InferenceSession(str(tiny_llama / "onnx" / "model.onnx"))
    nll = 0.0
    for window, feeds in zip(ids, model_feeds(ir.load(tiny_llama / "onnx" / "model.onnx"), ids), strict=True):
        logits = session.run(["logits"], feeds)[0][0].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        nll -= logp[np.arange(31), window[1:]].sum()
    assert dense["perplexity"] == pytest.approx(float(np.exp(nll / 93)), rel=1e-6)


def test_streaming_calibrates_each_block_on_the_compressed_prefix(tiny_llama, tmp_path, monkeypatch):
    """Each block's statistics, taken by running only that block on the cached output of the blocks
    before it, equal those of a run of the whole model as it is then (earlier blocks already
    SlimMatMul); from block 1 on they differ from the dense model's, so they do see the earlier error."""
    from slim_onnx import calibration

    seen = check_streamed_statistics(monkeypatch, tiny_llama / "onnx" / "model.onnx")
    calib = calibration.TextCalibration(tiny_llama / "calib.txt", samples=4, seqlen=32)
    report = slim_onnx.compress(tiny_llama / "onnx", tmp_path / "seq", calibration=calib, log=lambda msg: None)
    assert report["calibration"] == "stream" and report["totals"]["layers"] == 15
    assert [len(names) for names, _ in seen] == [7, 7, 1]  # block 0, block 1, lm_head
    assert seen[0][1] == set()
    assert seen[1][1] == set(seen[0][0])  # block 0 replaced before block 1 is calibrated
    assert seen[2][1] == set(seen[0][0]) | set(seen[1][0])
    assert all("/layers.1/" in name for name in seen[1][0])
    assert len(report["streaming"]["blocks"]) == 3


def test_streaming_gives_the_same_model_with_its_cache_on_disk(tiny_llama, tmp_path, monkeypatch):
    """A cache budget of 0 puts every cached activation in .npy files: the compressed model is the
    same, byte for byte, and the scratch files are gone afterwards."""
    from slim_onnx import calibration, pipeline

    calib = calibration.TextCalibration(tiny_llama / "calib.txt", samples=4, seqlen=32)
    fast = SlimConfig(rank=8)
    memory = slim_onnx.compress(tiny_llama / "onnx", tmp_path / "memory", fast, calib, log=lambda msg: None)
    real = pipeline.stream_blocks
    monkeypatch.setattr(pipeline, "stream_blocks", lambda *a, **kw: real(*a, **(kw | {"cache_budget": 0})))
    disk = slim_onnx.compress(tiny_llama / "onnx", tmp_path / "disk", fast, calib, log=lambda msg: None)
    assert memory["streaming"]["activation_cache_peak_bytes"] == disk["streaming"]["activation_cache_peak_bytes"] > 0
    assert (tmp_path / "memory" / "model.onnx").read_bytes() == (tmp_path / "disk" / "model.onnx").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "memory"]  # no work folder left


def test_streaming_agrees_with_one_pass_on_the_first_block(tiny_llama, tmp_path):
    """Block 0 sees the dense model in both modes: its layers come out identical; later blocks differ."""
    import json

    from slim_onnx import calibration

    calib = calibration.TextCalibration(tiny_llama / "calib.txt", samples=4, seqlen=32)
    errors = {}
    for mode in ("stream", "one-pass"):
        slim_onnx.compress(tiny_llama / "onnx", tmp_path / mode, SlimConfig(rank=8), calib, calibration_mode=mode,
                           log=lambda msg: None)
        report = json.loads((tmp_path / mode / "slim_report.json").read_text())
        errors[mode] = {r["layer"]: r["output_error"] for r in report["layers"]}
    block0 = [name for name in errors["stream"] if "/layers.0/" in name]
    later = [name for name in errors["stream"] if "/layers.0/" not in name]
    assert len(block0) == 7
    for name in block0:
        assert errors["stream"][name] == pytest.approx(errors["one-pass"][name], rel=1e-4)
    assert any(errors["stream"][name] != pytest.approx(errors["one-pass"][name], rel=1e-3) for name in later)


def test_fused_attention_generates_like_the_exported_attention_in_a_padded_batch(tiny_llama, tmp_path):
    """The same compressed weights with the attention fused (default) and as exported
    (--no-fuse-attention), through ORTModelForCausalLM on a left-padded batch of two prompts: the
    logits at every non-padding position agree to float rounding (the fused op masks padding with the
    model's own mask), and greedy generation gives the same tokens."""
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    fast = ["--rank", 0, "--pruning", "magnitude", "--quantizer", "absmax", "--accuracy-level", 0, "-q"]  # no calibration
    fused, plain = tmp_path / "fused", tmp_path / "plain"
    for out, extra in ((fused, []), (plain, ["--no-fuse-attention"])):
        res = cli("compress", tiny_llama / "onnx", out, *fast, *extra)
        assert res.returncode == 0, res.stderr
    assert json.loads((fused / "slim_report.json").read_text())["attention_fused"] == 2
    assert json.loads((plain / "slim_report.json").read_text())["attention_fused"] == 0
    ops = {out: [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node] for out in (fused, plain)}
    assert ops[fused].count("GroupQueryAttention") == 2 and ops[plain].count("GroupQueryAttention") == 0

    tok = AutoTokenizer.from_pretrained(tiny_llama / "hf")
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    batch = tok(["The Python language is", "Exceptions"], padding=True, return_tensors="pt", return_token_type_ids=False)
    assert (batch["attention_mask"] == 0).any()
    logits, tokens = [], []
    for out in (fused, plain):
        model = ORTModelForCausalLM.from_pretrained(out, session_options=slim_onnx.session_options())
        logits.append(model(**batch).logits.numpy()[batch["attention_mask"].numpy().astype(bool)])
        tokens.append(model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id).tolist())
    assert np.abs(logits[0] - logits[1]).max() < 1e-4 * np.abs(logits[1]).max()
    assert tokens[0] == tokens[1]


def test_calibration_runs_only_what_the_layer_inputs_need(tiny_llama):
    """The calibration sub-model keeps only the nodes the requested layer inputs depend on (no lm_head,
    no later block), and the statistics equal those read from the whole model's outputs."""
    import onnx_ir as ir
    from onnx import helper

    from slim_onnx.blocks import Submodel
    from slim_onnx.calibration import collect_statistics, model_feeds
    from slim_onnx.passes import find_linear_layers

    model = ir.load(tiny_llama / "onnx" / "model.onnx")
    layers = find_linear_layers(model)
    block0 = [layer for layer in layers if "/layers.0/" in layer.name]
    part = Submodel(model, list({layer.node.inputs[0]: None for layer in block0}), cut=lambda node: False)
    names = {n.name for n in part.nodes}
    assert not any("/layers.1/" in n or "lm_head" in n for n in names) and any("/layers.0/" in n for n in names)
    assert 0 < len(part.initializers) < len(model.graph.initializers)

    feeds = list(model_feeds(model, np.arange(5, 69).reshape(2, 32)))
    stats = collect_statistics(model, layers, feeds)
    whole = ir.to_proto(model)
    inputs = sorted({layer.node.inputs[0].name for layer in layers})
    whole.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in inputs)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(whole.SerializeToString(), so, providers=["CPUExecutionProvider"])
    xtx = {n: 0.0 for n in inputs}
    for feed in feeds:
        for n, x in zip(inputs, session.run(inputs, feed), strict=True):
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            xtx[n] = xtx[n] + x.T @ x
    for layer in layers:
        want = xtx[layer.node.inputs[0].name]
        np.testing.assert_allclose(stats[layer.name].xtx.numpy(), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_size_ratio_chooses_formats_within_the_bytes(tiny_llama, tmp_path):
    """--size-ratio: each layer gets a format of the ladder whose packed bytes are what the plan
    counted, the total stays within the budget, siblings share a format, the plan is in the report,
    and the bigger budget brings the model's logits closer to the dense model's (KL on held-out text)."""
    from slim_onnx.calibration import model_feeds
    from slim_onnx.sensitivity import output_divergence
    import onnx_ir as ir

    feeds = list(model_feeds(ir.load(tiny_llama / "onnx" / "model.onnx"), np.arange(5, 69).reshape(2, 32)))
    dense = [ort.InferenceSession(str(tiny_llama / "onnx" / "model.onnx")).run(["logits"], f)[0] for f in feeds]
    kl = {}
    for ratio in (0.24, 0.4):
        out = tmp_path / f"r{ratio}"
        res = cli("compress", tiny_llama / "onnx", out, "--calib", tiny_llama / "calib.txt", "--calib-samples", 8,
                  "--seqlen", 64, "--size-ratio", ratio, "--accuracy-level", 0, "-q")
        assert res.returncode == 0, res.stderr
        report = json.loads((out / "slim_report.json").read_text())
        layers, budget = report["layers"], report["budget"]["bytes"]
        assert budget == int(ratio * report["totals"]["bytes_float16"])
        assert all(layer["bytes_packed"] == layer["plan"]["bytes"] for layer in layers)
        assert sum(layer["bytes_packed"] for layer in layers) <= budget
        shown = json.loads(cli("inspect", out, "--json", "--plot", out.parent / f"plan{ratio}.png").stdout)["plan"]
        assert [(p["layer"], p["format"]) for p in shown] == [(l["layer"], l["plan"]["format"]) for l in layers]
        assert all(p["output_error"] == l["output_error"] and 0 < p["predicted_output_error"] < 1 for p, l in zip(shown, layers))
        assert (out.parent / f"plan{ratio}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert sum(report["budget"]["formats"].values()) == len(layers) == 15
        # siblings (q/k/v, gate/up) share one format, so they are still merged into one node each
        assert [len(group) for group in report["merged_siblings"]] == [3, 2, 3, 2]
        session = ort.InferenceSession(str(out / "model.onnx"), slim_onnx.session_options())
        kl[ratio] = np.mean([output_divergence(d, session.run(["logits"], f)[0], True) for f, d in zip(feeds, dense)])
    assert kl[0.4] < kl[0.24], kl


def test_quality_goals_choose_the_smallest_plan_that_measures_within_them(tmp_path):
    """--max-kl / --target-ppl-ratio: the search measures whole plans on the first calibration
    windows and keeps the smallest that meets the goal; with one-pass statistics the written model
    is that plan, so its own KL and perplexity on those windows are what the search measured.
    A goal no plan reaches is refused with the best found, and nothing is written."""
    import onnx_ir as ir
    from slim_onnx.budget import Budget
    from slim_onnx.calibration import model_feeds
    from slim_onnx.config import ConfigError, GraphOptions
    from slim_onnx.sensitivity import next_token_nll, output_divergence

    import torch
    from transformers import LlamaForCausalLM

    root = tiny_llama_export(tmp_path / "wide", initializer_range=0.2)  # decisive logits
    src = root / "onnx" / "model.onnx"
    # text the model itself writes (sampled), on which a compressed model's perplexity can only rise on average
    torch.manual_seed(0)
    start = torch.from_numpy(np.random.default_rng(3).integers(3, 250, size=(16, 1)))
    ids = LlamaForCausalLM.from_pretrained(root / "hf").generate(start, do_sample=True, max_length=32, min_length=32)
    ids = ids.numpy().reshape(8, 2, 32)
    feeds = [f for batch in ids for f in model_feeds(ir.load(src), batch)]
    dense = [ort.InferenceSession(str(src)).run(["logits"], f)[0] for f in feeds[:4]]

    def measure(out):  # KL and perplexity ratio of a written model on the probe's windows
        session = ort.InferenceSession(str(out / "model.onnx"), slim_onnx.session_options())
        logits = [session.run(["logits"], f)[0] for f in feeds[:4]]
        kl = np.mean([output_divergence(d, x, True) for d, x in zip(dense, logits)])
        nll = np.mean([next_token_nll(x, f) - next_token_nll(d, f) for d, x, f in zip(dense, logits, feeds)])
        return kl, np.exp(nll)

    run = dict(calibration_mode="one-pass", graph=GraphOptions(accuracy_level=0), log=lambda msg: None)
    slim_onnx.compress(src, tmp_path / "uniform", SlimConfig(), feeds, **run)
    uniform_kl, uniform_ppl = measure(tmp_path / "uniform")
    for goal in (Budget(max_kl=uniform_kl / 3), Budget(ppl_ratio=1 + (uniform_ppl - 1) / 3)):
        out = tmp_path / f"goal{goal.max_kl or goal.ppl_ratio}"
        report = slim_onnx.compress(src, out, SlimConfig(), feeds, budget=goal, **run)
        rounds = report["budget"]["search"]
        value = "divergence" if goal.max_kl else "ppl_ratio"
        limit = goal.max_kl or goal.ppl_ratio
        met = [r for r in rounds if r[value] <= limit]
        assert met and report["budget"]["bytes_chosen"] == min(r["bytes"] for r in met)
        chosen = next(r for r in met if r["bytes"] == report["budget"]["bytes_chosen"])
        kl, ppl = measure(out)
        assert kl == pytest.approx(chosen["divergence"], rel=2e-2) and ppl == pytest.approx(chosen["ppl_ratio"], rel=1e-3)
        assert (kl if goal.max_kl else ppl) <= limit * 1.001
    with pytest.raises(ConfigError, match="no plan reached --max-kl"):
        slim_onnx.compress(src, tmp_path / "unreachable", SlimConfig(), feeds, budget=Budget(max_kl=1e-12), **run)
    assert not (tmp_path / "unreachable").exists()
