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
import onnxruntime as ort

from slim_onnx.calibration import CalibrationError, load_tokenizer, model_feeds, read_text
from slim_onnx.genai import past_head_size, read_genai_config
from slim_onnx.pipeline import InputError, load_model, resolve_model_path
from slim_onnx.runtime import session_options
from slim_onnx.sensitivity import log_softmax


def _session(path: Path, with_library: bool) -> ort.InferenceSession:
    so = session_options() if with_library else ort.SessionOptions()
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's errors share no base class
        raise InputError(f"onnxruntime cannot load {path} ({error}); is it damaged or incomplete?") from None


def _check_window_options(seqlen: int, max_windows: int | None) -> None:
    if seqlen < 2:  # the first token of a window predicts nothing
        raise CalibrationError(f"--seqlen {seqlen}: expected at least 2 tokens per window")
    if max_windows is not None and max_windows < 1:
        raise CalibrationError(f"--windows {max_windows}: expected at least 1 window")


def evaluate(model_dir, text_path, reference_dir=None, seqlen: int = 512, max_windows: int | None = None,
             with_library: bool = True, tokenizer_dir=None, progress=None, log=None) -> dict:
    """log: called with warnings about the text (default: print to stderr)."""
    _check_window_options(seqlen, max_windows)
    path = resolve_model_path(model_dir)
    model = load_model(path)  # its graph inputs tell model_feeds what to feed
    tokenizer = load_tokenizer(tokenizer_dir or path.parent)
    ids = np.asarray(tokenizer(read_text(text_path, log))["input_ids"], dtype=np.int64)
    count = len(ids) // seqlen if max_windows is None else min(max_windows, len(ids) // seqlen)
    if count < 1:
        raise CalibrationError(f"the text has {len(ids)} tokens, fewer than one window of {seqlen}")
    windows = ids[: count * seqlen].reshape(count, seqlen)
    session = _session(path, with_library)
    ref = _session(resolve_model_path(reference_dir), with_library) if reference_dir else None
    bar = progress("evaluating", count) if progress else None  # progress: a factory (label, total)
    output_names = [o.name for o in session.get_outputs()]
    causal = "logits" in output_names
    nll, kl, agree, cosines, tokens = 0.0, 0.0, 0, [], 0
    name = "logits" if causal else output_names[0]
    if ref is not None and name not in [o.name for o in ref.get_outputs()]:
        raise InputError(f"the reference {reference_dir} has no output {name!r}: is it an export of the same model?")
    for window, feeds in zip(windows, model_feeds(model, windows, past_head_size(read_genai_config(path.parent)))):
        out = session.run([name], feeds)[0][0]
        ref_out = ref.run([name], feeds)[0][0] if ref is not None else None
        if ref_out is not None and ref_out.shape != out.shape:
            raise InputError(f"the reference's {name!r} has shape {list(ref_out.shape)}, this model's "
                             f"{list(out.shape)}: is the reference an export of the same model?")
        if causal:
            logp = log_softmax(out[:-1])
            nll -= logp[np.arange(seqlen - 1), window[1:]].sum()
            tokens += seqlen - 1
            if ref_out is not None:
                ref_logp = log_softmax(ref_out[:-1])
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
