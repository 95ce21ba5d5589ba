"""`slim-onnx eval`: quality of an exported (or compressed) model, through onnxruntime.

Causal LMs: perplexity over consecutive non-overlapping windows of `seqlen` tokens of a text
(every next-token prediction inside a window counts), and with a reference model folder, the mean
KL divergence KL(reference || model) of the next-token distributions and their top-1 agreement.
Encoders (a `last_hidden_state` output): the cosine similarity of mean-pooled embeddings against the
reference, per window.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from slim_onnx.calibration import CalibrationError, model_feeds, read_text
from slim_onnx.pipeline import resolve_model_path
from slim_onnx.runtime import session_options


def _session(model_dir, with_library: bool) -> ort.InferenceSession:
    so = session_options() if with_library else ort.SessionOptions()
    return ort.InferenceSession(str(resolve_model_path(model_dir)), so, providers=["CPUExecutionProvider"])


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def evaluate(model_dir, text_path, reference_dir=None, seqlen: int = 512, max_windows: int | None = None,
             with_library: bool = True, tokenizer_dir=None, progress=None) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or Path(resolve_model_path(model_dir)).parent)
    ids = np.asarray(tokenizer(read_text(text_path))["input_ids"], dtype=np.int64)
    count = len(ids) // seqlen if max_windows is None else min(max_windows, len(ids) // seqlen)
    if count < 1:
        raise CalibrationError(f"the text has {len(ids)} tokens, fewer than one window of {seqlen}")
    windows = ids[: count * seqlen].reshape(count, seqlen)
    session = _session(model_dir, with_library)
    model = ir.load(resolve_model_path(model_dir))  # its graph inputs tell model_feeds what to feed
    ref = _session(reference_dir, with_library) if reference_dir else None
    bar = progress("evaluating", count) if progress else None  # progress: a factory (label, total)
    output_names = [o.name for o in session.get_outputs()]
    causal = "logits" in output_names
    nll, kl, agree, cosines, tokens = 0.0, 0.0, 0, [], 0
    name = "logits" if causal else output_names[0]
    for window, feeds in zip(windows, model_feeds(model, windows)):
        out = session.run([name], feeds)[0][0]
        ref_out = ref.run([name], feeds)[0][0] if ref is not None else None
        if causal:
            logp = _log_softmax(out[:-1])
            nll -= logp[np.arange(seqlen - 1), window[1:]].sum()
            tokens += seqlen - 1
            if ref_out is not None:
                ref_logp = _log_softmax(ref_out[:-1])
                kl += (np.exp(ref_logp) * (ref_logp - logp)).sum()
                agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
        elif ref_out is not None:
            a, b = out.mean(0), ref_out.mean(0)
            cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
        if bar:
            bar()
    result = {"model": str(model_dir), "windows": count, "seqlen": seqlen, "library": with_library}
    if causal:
        result.update(perplexity=float(np.exp(nll / tokens)), tokens=tokens)
        if ref is not None:
            result.update(reference=str(reference_dir), kl=float(kl / tokens), top1_agreement=agree / tokens)
    elif ref is not None:
        result.update(reference=str(reference_dir), cosine=float(np.mean(cosines)))
    return result
