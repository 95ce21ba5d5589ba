"""examples/: the edge script and the streaming HTTP server on a compressed tiny Llama, against the
same model run over each whole prefix without a cache; neither imports torch or transformers."""

import http.client
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from helpers import tiny_llama_export

import slim_onnx
from slim_onnx.generate import CachedDecoder

tokenizers = pytest.importorskip("tokenizers")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PROMPT = "The history of the city"
STEPS = 12


@pytest.fixture(scope="module")
def slim(tmp_path_factory) -> Path:
    root = tiny_llama_export(tmp_path_factory.mktemp("examples"), initializer_range=0.2)  # decisive logits
    out = root / "slim"
    res = subprocess.run([sys.executable, "-m", "slim_onnx.cli", "compress", str(root / "onnx"), str(out), "--calib",
                          str(root / "calib.txt"), "--calib-samples", "8", "--seqlen", "64", "-q"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return out


def prompt_ids(slim: Path) -> list[int]:
    return tokenizers.Tokenizer.from_file(str(slim / "tokenizer.json")).encode(PROMPT).ids


def expected_text(slim: Path) -> str:
    tokens = list(CachedDecoder(slim).tokens(prompt_ids(slim), STEPS))
    return tokenizers.Tokenizer.from_file(str(slim / "tokenizer.json")).decode(tokens)


def test_cached_decoder_generates_what_the_whole_prefix_gives(slim):
    """Greedy tokens with the cache kept in OrtValues against running the model over the whole
    prefix with an empty past at every step: equal wherever the prefix's top-2 margin exceeds 1% of
    its logit range (the two runs differ only in the attention's summation order, which moves the
    logits far less: measured bit-identical on AVX2)."""
    session = ort.InferenceSession(str(slim / "model.onnx"), slim_onnx.session_options())
    inputs = {i.name: i for i in session.get_inputs()}
    ids = prompt_ids(slim)
    tokens = list(CachedDecoder(slim).tokens(ids, STEPS))
    assert len(tokens) == STEPS
    checked = 0
    for step, token in enumerate(tokens):
        prefix = ids + tokens[:step]
        feeds = {"input_ids": np.array([prefix]), "attention_mask": np.ones((1, len(prefix)), dtype=np.int64),
                 "position_ids": np.arange(len(prefix))[None]}
        feeds.update({n: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32) for n, i in inputs.items()
                      if n.startswith("past_key_values")})
        logits = session.run(["logits"], feeds)[0][0, -1]
        top2 = np.sort(logits)[-2:]
        if top2[1] - top2[0] > 0.01 * (logits.max() - logits.min()):
            assert token == int(logits.argmax()), step
            checked += 1
    assert checked >= STEPS // 2


def test_cached_decoder_refuses_a_model_without_a_cache(tmp_path):
    from helpers import attention_model

    (tmp_path / "model.onnx").write_bytes(attention_model(2, 2, 8, False, 0.5))
    with pytest.raises(ValueError, match="not a decoder with a KV cache"):
        CachedDecoder(tmp_path, library=False)


def test_edge_script_prints_the_generation(slim):
    res = subprocess.run([sys.executable, str(EXAMPLES / "edge.py"), str(slim), PROMPT, "--max-new-tokens", str(STEPS),
                          "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected_text(slim) + "\n"
    assert f"[{STEPS} tokens in" in res.stderr


def test_server_streams_a_request_on_loopback(slim):
    server = subprocess.Popen([sys.executable, str(EXAMPLES / "serve.py"), str(slim), "--port", "0", "--threads", "1",
                               "--max-new-tokens", "32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()  # "listening on http://127.0.0.1:PORT"
        assert line.startswith("listening on http://127.0.0.1:"), (line, server.stderr.read() if server.poll() else "")
        port = int(line.rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("GET", "/health")
        assert connection.getresponse().read() == b"ok"
        connection.request("POST", "/generate", body=json.dumps({"prompt": PROMPT, "max_new_tokens": STEPS}))
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Transfer-Encoding") == "chunked"
        pieces = []
        while chunk := response.read1():
            pieces.append(chunk)
        assert b"".join(pieces).decode() == expected_text(slim)
        assert len(pieces) > 1  # streamed, not sent at the end
        for bad in ({"prompt": ""}, {"prompt": PROMPT, "max_new_tokens": 33}, {"max_new_tokens": 3}):
            connection.request("POST", "/generate", body=json.dumps(bad))
            response = connection.getresponse()
            assert response.status == 400 and b"bad request" in response.read()
        connection.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_deployment_path_imports_neither_torch_nor_transformers(slim):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import edge, serve; from slim_onnx.generate import CachedDecoder; "
            "CachedDecoder(sys.argv[2]); print(sorted(m for m in ('torch', 'transformers', 'slim_onnx.pipeline') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code, str(EXAMPLES), str(slim)], capture_output=True, text=True,
                         env=dict(os.environ), timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
