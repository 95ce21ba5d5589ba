"""How far the model's output moves when one layer alone is compressed: the per-layer sensitivity
that weights the predicted errors in budget.py.

For layer l compressed alone (the others dense), the model's output on a few calibration windows is
compared with the dense model's: the mean KL divergence of the next-token distributions for a
decoder (an output named "logits"), the relative squared error of the first output otherwise.
Divided by the layer's own output error e_l = tr(E^T H E), it is s_l, the damage per unit of layer
error. budget.py predicts candidate c's damage as s_l * e[l][c]: damage linear in e (KL is second
order in a small perturbation, as e is) and adding over layers.

One session serves every layer: each layer's weight becomes an initializer that is also a graph
input (ONNX's overridable initializer), so a run feeds one layer's compressed weight and leaves the
others dense. The same session measures a whole plan (every layer's weight fed at once) for a
quality goal, with the perplexity of the windows' own next tokens beside the divergence.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from slim_onnx.passes import find_linear_layers

PROBE_FILE = "sensitivity.onnx"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _kl(lp: np.ndarray, lq: np.ndarray) -> float:
    return float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())


def output_divergence(dense: np.ndarray, changed: np.ndarray, logits: bool) -> float:
    """Mean KL(dense || changed) over tokens for logits, else ||changed - dense||^2 / ||dense||^2."""
    if logits:
        return _kl(log_softmax(dense), log_softmax(changed))
    dense64 = dense.astype(np.float64)
    return float(((changed - dense64) ** 2).sum() / max((dense64**2).sum(), 1e-30))


def _next_token_nll(lp: np.ndarray, feed: dict) -> float:
    """next_token_nll from the log-probabilities lp [B, T, V] of every position."""
    ids = feed["input_ids"]
    keep = np.ones(ids.shape, dtype=bool) if "attention_mask" not in feed else feed["attention_mask"].astype(bool)
    keep = keep[:, :-1] & keep[:, 1:]
    picked = np.take_along_axis(lp[:, :-1], ids[:, 1:, None].astype(np.int64), axis=-1)[..., 0]
    return float(-picked[keep].mean())


def next_token_nll(logits: np.ndarray, feed: dict) -> float:
    """Mean negative log-likelihood of each next input token under `logits` [B, T, V], over the
    positions whose token and next token the attention mask keeps."""
    return _next_token_nll(log_softmax(logits), feed)


@dataclasses.dataclass(frozen=True)
class Measurement:
    """divergence: output_divergence against the dense model; ppl_ratio: perplexity of the input
    text over the dense model's (decoders with input_ids only, else None)."""

    divergence: float
    ppl_ratio: float | None


class SensitivityProbe:
    """The model at `model_path` with the named layers' weights overridable, and its dense outputs
    on `feeds`; measure({layer: w}) runs it with those layers' weights replaced."""

    def __init__(self, model_path: Path, layer_names: list[str], feeds: list[dict], workdir: Path,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)):
        model = ir.load(model_path)
        graph = model.graph
        wanted = set(layer_names)
        self.inputs: dict[str, tuple[str, bool, np.dtype]] = {}
        for i, layer in enumerate(l for l in find_linear_layers(model) if l.name in wanted):
            old = layer.weight
            value = ir.Value(name=f"slim_sensitivity.{i}", shape=old.shape, type=old.type, const_value=old.const_value)
            graph.register_initializer(value)
            graph.inputs.append(value)
            consumer = layer.transpose_node or layer.node  # a tied lm_head reads the embedding through a Transpose
            for index, read in enumerate(consumer.inputs):
                if read is old:
                    consumer.replace_input_with(index, value)
            if not any(True for _ in old.uses()):
                graph.initializers.pop(old.name)
            self.inputs[layer.name] = (value.name, layer.transposed, old.const_value.dtype.numpy())
        path = workdir / PROBE_FILE
        ir.save(model, path, external_data=PROBE_FILE + ".data")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # overridable initializers are the point here, not a warning per layer
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        names = [o.name for o in self.session.get_outputs()]
        self.output = "logits" if "logits" in names else names[0]
        self.feeds = feeds
        self.dense = [self.session.run([self.output], feed)[0] for feed in feeds]
        logits = self.output == "logits" and all("input_ids" in feed for feed in feeds)
        self.dense_nll = [next_token_nll(d, feed) if logits else None for d, feed in zip(self.dense, feeds)]

    def measure(self, weights: dict[str, np.ndarray]) -> Measurement:
        """The model's output with each named layer multiplying by weights[name] [K, N] instead of
        its dense weight (the others dense) against the dense output, averaged over the feeds."""
        replaced = {}
        for layer_name, weight in weights.items():
            name, transposed, dtype = self.inputs[layer_name]
            replaced[name] = np.ascontiguousarray(weight.T if transposed else weight, dtype=dtype)
        divergence, nll = 0.0, 0.0
        for feed, dense, dense_nll in zip(self.feeds, self.dense, self.dense_nll):
            changed = self.session.run([self.output], {**feed, **replaced})[0]
            if self.output != "logits":
                divergence += output_divergence(dense, changed, False)
                continue
            lq = log_softmax(changed)  # once, for both the KL and the likelihood
            divergence += _kl(log_softmax(dense), lq)
            if dense_nll is not None:
                nll += _next_token_nll(lq, feed) - dense_nll
        n = len(self.feeds)
        return Measurement(divergence / n, math.exp(nll / n) if self.dense_nll[0] is not None else None)


__all__ = ["Measurement", "SensitivityProbe", "log_softmax", "next_token_nll", "output_divergence"]
