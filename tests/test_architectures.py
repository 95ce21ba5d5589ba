"""Tiny random Optimum exports of the architectures users ship, compressed and run.

Structure: only the weight MatMul/Gemm layers become SlimMatMul (a bias Add or Gemm bias is folded
in), rotary and attention MatMuls stay, graph inputs and outputs are unchanged, the checker passes.

Numerics: with full-rank float16 adapters (rank = min(K, N) = the hidden size, plain SVD of the
residual) every compressed layer equals its dense weight up to float16 rounding of the adapters
and scales (relative 2^-11 per element), so the compressed model must reproduce the dense model's
outputs to ~1e-3; 1e-2 relative is the sanity bound. This is the check that the rewrite put each
weight, bias and transpose in the right place; the kernel and fallback paths must then agree too.
"""

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import FLOAT_GRAPH, HIDDEN, LOSSLESS, export, feeds_for, outputs

import slim_onnx
import slim_onnx.passes
from slim_onnx.config import GraphOptions


def compress_and_compare(src: Path, out: Path, vocab: int, **graph_options) -> onnx.ModelProto:
    graph = dataclasses.replace(FLOAT_GRAPH, **graph_options)
    slim_onnx.compress(src, out, LOSSLESS, None, graph=graph, log=lambda msg: None)
    feeds = feeds_for(src / "model.onnx", vocab)
    dense = outputs(src / "model.onnx", feeds, library=False)
    kernel = outputs(out / "model.onnx", feeds, library=True)
    fallback = outputs(out / "model.onnx", feeds, library=False)
    for d, k, f in zip(dense, kernel, fallback, strict=True):
        assert k.dtype == d.dtype
        # kernel and fallback differ by rounding: float32 sums, or ~one float16 ulp of the output
        paths_tol = 2e-3 if d.dtype == np.float16 else 1e-4
        d, k, f = (x.astype(np.float64) for x in (d, k, f))
        scale = np.abs(d).max() + 1e-6
        assert np.abs(k - d).max() / scale < 1e-2, np.abs(k - d).max() / scale
        assert np.abs(k - f).max() / scale < paths_tol
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model)
    original = onnx.load(str(src / "model.onnx"), load_external_data=False)
    assert [i.name for i in model.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in model.graph.output] == [o.name for o in original.graph.output]
    return model


def small_decoder(config_cls, model_cls, tie_word_embeddings: bool):
    """A seeded 2-block decoder with grouped-query attention (k/v narrower than q)."""
    import torch

    torch.manual_seed(0)
    config = config_cls(vocab_size=128, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie_word_embeddings,
                        max_position_embeddings=64)
    return model_cls(config)


def op_count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(n.op_type == op_type for n in model.graph.node)


def test_qwen2_folds_qkv_biases(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    src = export(small_decoder(Qwen2Config, Qwen2ForCausalLM, False), tmp_path, "text-generation-with-past")
    original = onnx.load(str(src / "model.onnx"))
    # only the layers change; one SlimMatMul per layer
    model = compress_and_compare(src, tmp_path / "slim", 128, fuse_attention=False, fuse_norms=False,
                                 merge_siblings=False)
    assert op_count(model, "SlimMatMul") == 2 * 7 + 1
    biased = [n for n in model.graph.node if n.op_type == "SlimMatMul" and len(n.input) > 3 and n.input[3]]
    assert len(biased) == 2 * 3  # q, k, v of each block carry their bias (most reach it through Identity aliases)
    # merged: q/k/v and gate/up of each block share one node, the biases side by side; the SwiGLU
    # after gate/up folded into it (only the q/k/v Splits remain)
    merged = compress_and_compare(src, tmp_path / "merged", 128, fuse_attention=False, fuse_norms=False)
    assert op_count(merged, "SlimMatMul") == 2 * 4 + 1 and op_count(merged, "Split") == 2
    assert op_count(merged, "Sigmoid") == 0
    assert op_count(model, "Add") == op_count(original, "Add") - 2 * 3


def test_gpt2_gemm_layers(tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64)
    src = export(GPT2LMHeadModel(config), tmp_path, "text-generation-with-past")
    assert op_count(onnx.load(str(src / "model.onnx")), "Gemm") == 2 * 4  # Conv1D layers export as Gemm
    model = compress_and_compare(src, tmp_path / "slim", 128)
    assert op_count(model, "SlimMatMul") == 2 * 4 + 1  # c_attn, c_proj, c_fc, mlp c_proj per block; tied lm_head
    assert op_count(model, "Gemm") == 0


def test_bert_encoder(tmp_path):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
    src = export(BertModel(config), tmp_path, "feature-extraction")
    model = compress_and_compare(src, tmp_path / "slim", 128)
    # q/k/v (merged into one node), attention output, intermediate, output per block (the export keeps
    # last_hidden_state only)
    assert op_count(model, "SlimMatMul") == 2 * 4 and op_count(model, "Split") == 2


def test_untied_llama_with_external_data(tmp_path):
    """Weights in an external data file: read without modifying the input; lm_head untied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    exported = export(small_decoder(LlamaConfig, LlamaForCausalLM, False), tmp_path, "text-generation-with-past")
    src = tmp_path / "external"
    src.mkdir()
    onnx.save(onnx.load(str(exported / "model.onnx")), str(src / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0)
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    model = compress_and_compare(src, tmp_path / "slim", 128)
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before
    assert (tmp_path / "slim" / "model.onnx_data").is_file()  # the output keeps external data, like its input
    assert op_count(model, "SlimMatMul") == 2 * 4 + 1  # q/k/v and gate/up merged per block
    assert any(i.name == "model.embed_tokens.weight" for i in model.graph.initializer)
    assert any(n.name == "/model/rotary_emb/MatMul" and n.op_type == "MatMul" for n in model.graph.node)


def test_float16_export(tmp_path):
    """A float16 model: SlimMatMul takes and returns float16 (the kernel computes in float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    src = export(small_decoder(LlamaConfig, LlamaForCausalLM, True), tmp_path, "text-generation-with-past", dtype="fp16")
    assert onnx.load(str(src / "model.onnx")).graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    model = compress_and_compare(src, tmp_path / "slim", 128)
    assert op_count(model, "SlimMatMul") == 2 * 4 + 1  # q/k/v and gate/up merged per block


def cache_feeds(session: ort.InferenceSession, batch: int, past: int, seq: int, pad: int, rng) -> dict:
    """Random tokens and cache; the last row is left-padded by `pad` positions, as Optimum pads a batch."""
    feeds = {}
    mask = np.ones((batch, past + seq), dtype=np.int64)
    mask[-1, :pad] = 0
    positions = np.cumsum(mask, -1) - 1
    positions[mask == 0] = 1
    for value in session.get_inputs():
        if value.name == "input_ids":
            feeds[value.name] = rng.integers(0, 128, (batch, seq))
        elif value.name == "attention_mask":
            feeds[value.name] = mask
        elif value.name == "position_ids":
            feeds[value.name] = positions[:, past:]
        else:
            float_type = np.float16 if value.type == "tensor(float16)" else np.float32
            feeds[value.name] = rng.standard_normal((batch, value.shape[1], past, value.shape[3])).astype(float_type)
    return feeds


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_attention_fusion_reproduces_the_export(tmp_path, family):
    """The dense export with its attention fused into GroupQueryAttention (no compression) against the
    export itself (assert_cached_runs_match): everything agrees to float rounding (the fused op sums
    in another order)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    src = export(small_decoder(*classes, True), tmp_path, "text-generation-with-past")
    model = ir.load(str(src / "model.onnx"))
    rewrite = slim_onnx.passes.rewrite_graph(model, GraphOptions.only("fuse_attention", "fuse_norms"))
    # every RMSNorm after a residual Add: both of layer 1, layer 0's second, the final one
    assert (rewrite.attention_fused, rewrite.skip_norms_fused) == (2, 4)
    ir.save(model, tmp_path / "fused.onnx")
    fused_proto = onnx.load(str(tmp_path / "fused.onnx"))
    onnx.checker.check_model(fused_proto)
    assert op_count(fused_proto, "GroupQueryAttention") == 2 and op_count(fused_proto, "Softmax") == 0
    assert op_count(fused_proto, "Expand") < op_count(onnx.load(str(src / "model.onnx")), "Expand")  # no repeat_kv copies
    # q and k rotary of both layers folded into RotaryEmbedding; no head split or merge is left
    assert op_count(fused_proto, "RotaryEmbedding") == 4
    perms = [list(a.ints) for n in fused_proto.graph.node if n.op_type == "Transpose" for a in n.attribute]
    assert [0, 2, 1, 3] not in perms

    assert_cached_runs_match(src / "model.onnx", tmp_path / "fused.onnx", 1e-4)


def assert_cached_runs_match(export_path: Path, fused_path: Path, tol: float) -> None:
    """Our kernels (slim_onnx::GroupQueryAttention, SlimMatMul) and, without the library, the fallback
    functions (onnxruntime's com.microsoft::GroupQueryAttention) against the export: a left-padded
    batched prompt, cached decode steps with and without padding, a multi-token continuation, a long
    cache. Padding positions carry no meaning and are skipped; the rest agrees within `tol`
    relative to each output's scale."""
    reference = ort.InferenceSession(str(export_path), providers=["CPUExecutionProvider"])
    paths = {
        "kernel": ort.InferenceSession(str(fused_path), slim_onnx.session_options(), providers=["CPUExecutionProvider"]),
        "fallback": ort.InferenceSession(str(fused_path), providers=["CPUExecutionProvider"]),
    }
    names = [o.name for o in reference.get_outputs()]
    assert all(names == [o.name for o in fused.get_outputs()] for fused in paths.values())
    rng = np.random.default_rng(0)
    cases = [(2, 0, 9, 3), (2, 7, 1, 0), (2, 7, 1, 4), (1, 7, 4, 0), (1, 40, 1, 0), (2, 7, 4, 2)]
    for batch, past, seq, pad in cases:
        feeds = cache_feeds(reference, batch, past, seq, pad, rng)
        valid = feeds["attention_mask"].astype(bool)
        expected = reference.run(None, feeds)
        for path, fused in paths.items():
            if path == "fallback" and batch > 1 and past > 0 and seq > 1:
                continue  # onnxruntime's CPU kernel refuses this shape (module doc of passes/attention.py)
            for name, want, got in zip(names, expected, fused.run(None, feeds), strict=True):
                keep = valid[:, past:] if name == "logits" else valid  # present.*: [B, heads, past + seq, D]
                want, got = (np.moveaxis(x, 2, 1)[keep] if name != "logits" else x[keep] for x in (want, got))
                err = np.abs(want.astype(np.float64) - got).max() / np.abs(want).max()
                assert err < tol, (path, name, batch, past, seq, pad, err)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_compressed_decoder_feeds_packed_qkv_to_the_attention(tmp_path, family):
    """All graph passes on a compressed decoder (near-lossless weights, float32 activations): the
    merged q/k/v product goes straight into the attention, which also does the rotary (no Split or
    RotaryEmbedding left; Qwen2's q/k/v biases inside the product), and the SwiGLU
    sits in the gate/up node; the same cached runs as above agree with the export on both paths."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    src = export(small_decoder(*classes, True), tmp_path, "text-generation-with-past")
    report = slim_onnx.compress(src, tmp_path / "slim", LOSSLESS, None, graph=FLOAT_GRAPH, log=lambda msg: None)
    assert (report["attention_fused"], report["attention_packed"], report["swiglu_fused"]) == (2, 2, 2)
    model = onnx.load(str(tmp_path / "slim" / "model.onnx"))
    onnx.checker.check_model(model)
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == 2 and all(n.overload.startswith("packed_rotary_") and n.input[1:3] == ["", ""] for n in attention)
    assert all(op_count(model, op) == 0 for op in ("RotaryEmbedding", "Split", "Sigmoid"))
    assert_cached_runs_match(src / "model.onnx", tmp_path / "slim" / "model.onnx", 1e-2)


def test_attention_fusion_leaves_other_attention_alone(tmp_path):
    """A float16 export computes its attention and RMSNorms in float32 (Casts around the scores and V,
    around each norm), which the fused ops cannot express: nothing is touched."""
    from transformers import LlamaConfig, LlamaForCausalLM

    src = export(small_decoder(LlamaConfig, LlamaForCausalLM, True), tmp_path, "text-generation-with-past", dtype="fp16")
    model = ir.load(str(src / "model.onnx"))
    before = len(model.graph)
    # float16 gammas: SkipSimplifiedLayerNorm would change the math
    rewrite = slim_onnx.passes.rewrite_graph(model, GraphOptions.only("fuse_attention", "fuse_norms"))
    assert (rewrite.attention_fused, rewrite.skip_norms_fused, len(model.graph)) == (0, 0, before)
