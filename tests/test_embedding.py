"""Token-embedding tables as int8 rows (slim_onnx/passes/embedding.py), on a tiny Llama export with
a vocabulary large enough to be rewritten."""

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import FLOAT_GRAPH, LOSSLESS, export, feeds_for, outputs

import slim_onnx
from slim_onnx.passes import embedding
from slim_onnx.passes.embedding import MIN_ROWS, dequantize_rows, group_size, quantize_rows_int8


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=MIN_ROWS + 24, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=64)
    return export(LlamaForCausalLM(config), tmp_path_factory.mktemp("llama"), "text-generation-with-past")


@pytest.mark.parametrize("row_chunk", [8192, 7])  # one chunk, or 8 of them (rows are independent)
def test_quantize_rows_int8_bounds_the_error(monkeypatch, row_chunk):
    monkeypatch.setattr(embedding, "ROW_CHUNK", row_chunk)
    table = np.random.default_rng(0).standard_normal((50, 96)).astype(np.float32)
    table[3, :32] = 0  # an all-zero group
    q, scales = quantize_rows_int8(table, group_size(96))
    assert q.dtype == np.int8 and q.shape == (50, 3, 32) and scales.shape == (50, 3, 1)
    assert np.abs(q).max() <= 127 and not np.isnan(dequantize_rows(q, scales)).any()
    # half a step of each group's own scale (plus the float16 rounding of that scale)
    step = np.abs(table.reshape(50, 3, 32)).max(-1, keepdims=True) / 127
    err = np.abs(dequantize_rows(q, scales) - table).reshape(50, 3, 32)
    assert (err <= step * (0.5 + 128 * 2**-11)).all()


def test_group_size_divides_hidden():
    assert [group_size(h) for h in (576, 80, 24, 7)] == [32, 16, 8, 7]


def test_compressed_embedding_gathers_int8_rows(llama, tmp_path):
    report = slim_onnx.compress(llama, tmp_path / "slim", LOSSLESS, None, graph=FLOAT_GRAPH, log=lambda msg: None)
    (embedding,) = report["embeddings"]
    assert embedding["rows"] == MIN_ROWS + 24 and embedding["group_size"] == 32
    # int8 values plus a float16 scale per 32: (1 + 2/32) / 4 of the float32 table
    assert embedding["bytes_after"] == embedding["bytes_before"] * (1 + 2 / 32) / 4
    model = onnx.load(str(tmp_path / "slim" / "model.onnx"))
    tables = {t.name: t for t in model.graph.initializer}
    assert "model.embed_tokens.weight" not in tables  # the float table is gone (lm_head is SlimMatMul)
    assert tables["model.embed_tokens.weight/int8"].data_type == onnx.TensorProto.INT8

    # Against the export whose Gather reads what the int8 rows stand for (lm_head keeps the float
    # table): LOSSLESS makes every other change float16 rounding, so this is the rewrite's own error.
    src = ir.load(str(llama / "model.onnx"))
    table = src.graph.initializers["model.embed_tokens.weight"]
    (gather,) = [use.node for use in table.uses() if use.node.op_type == "Gather"]
    q, scales = quantize_rows_int8(table.const_value.numpy(), 32)
    rows = ir.Value(name="dequantized", const_value=ir.tensor(dequantize_rows(q, scales), name="dequantized"))
    src.graph.register_initializer(rows)
    gather.replace_input_with(0, rows)
    ir.save(src, tmp_path / "dequantized.onnx")
    feeds = feeds_for(llama / "model.onnx", MIN_ROWS + 24)
    want = outputs(tmp_path / "dequantized.onnx", feeds, library=False)
    dense = outputs(llama / "model.onnx", feeds, library=False)
    for library in (True, False):
        for w, g, d in zip(want, outputs(tmp_path / "slim" / "model.onnx", feeds, library), dense, strict=True):
            assert np.abs(g - w).max() / np.abs(w).max() < 5e-3  # float16 rounding of LOSSLESS's adapters
            assert np.abs(g - d).max() / np.abs(d).max() < 2e-2  # and int8 rows stay close to the export


def test_table_read_by_a_dense_lm_head_is_kept(llama, tmp_path):
    report = slim_onnx.compress(llama, tmp_path / "slim", LOSSLESS, None, compress_lm_head=False,
                                graph=FLOAT_GRAPH, log=lambda msg: None)
    assert report["embeddings"] == []
    model = onnx.load(str(tmp_path / "slim" / "model.onnx"))
    assert "model.embed_tokens.weight" in {t.name for t in model.graph.initializer}
    session = ort.InferenceSession(str(tmp_path / "slim" / "model.onnx"), slim_onnx.session_options())
    assert session.run(None, feeds_for(llama / "model.onnx", MIN_ROWS + 24))[0].shape[-1] == MIN_ROWS + 24


def test_no_quantize_embeddings_keeps_the_table(llama, tmp_path):
    report = slim_onnx.compress(llama, tmp_path / "slim", LOSSLESS, None,
                                graph=dataclasses.replace(FLOAT_GRAPH, quantize_embeddings=False), log=lambda msg: None)
    assert report["embeddings"] == []
