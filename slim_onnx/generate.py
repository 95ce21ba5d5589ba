"""Text generation from a KV-cached decoder in plain onnxruntime: the loop a deployment script runs
on a compressed Optimum export (or any decoder with `past_key_values.*` inputs and `present.*`
outputs), without torch, Optimum or the compressor.

Step 0 feeds the prompt with an empty past; every later step feeds one token, the attention mask
and positions where the model takes them, and the previous step's `present.*` outputs as the past.
The cache stays in onnxruntime's OrtValues from step to step (never copied out to numpy), and only
the last position's logits are read back.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort

from slim_onnx.runtime import session_options


class CachedDecoder:
    """One onnxruntime session of a decoder and its generation loop. `model`: a .onnx file, or a
    folder holding model.onnx; threads: onnxruntime's intra-op threads (None: its default);
    library: register our SlimMatMul kernels (False: stock onnxruntime, the fallback functions);
    options: SessionOptions to start from (e.g. a shared thread pool)."""

    def __init__(self, model: str | os.PathLike, *, threads: int | None = None, library: bool = True,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",), options: ort.SessionOptions | None = None):
        path = Path(model)
        self.path = path / "model.onnx" if path.is_dir() else path
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist: give a decoder .onnx file or a folder holding model.onnx")
        so = options if options is not None else ort.SessionOptions()
        if library:
            session_options(so)
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), so, providers=list(providers))
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        missing = {"input_ids", "logits"} - set(self.inputs) - set(self.outputs)
        if missing or not any(n.startswith("past_key_values") for n in self.inputs):
            raise ValueError(f"{self.path} is not a decoder with a KV cache (input_ids, past_key_values.*, logits): "
                             "export it with --task text-generation-with-past")
        self._types = {name: np.int32 if "int32" in info.type else np.int64 for name, info in self.inputs.items()}

    def empty_past(self) -> dict[str, np.ndarray]:
        """The past inputs of the first step: every cache with no entries."""
        past = {}
        for name, info in self.inputs.items():
            if name.startswith("past_key_values"):
                heads, head_size = info.shape[1], info.shape[3]
                if not isinstance(heads, int) or not isinstance(head_size, int):
                    raise ValueError(f"input {name} has shape {info.shape}: its heads and head size must be fixed")
                dtype = np.float16 if "float16" in info.type else np.float32
                past[name] = np.zeros((1, heads, 0, head_size), dtype=dtype)
        return past

    def feeds(self, ids, past: dict, past_len: int) -> dict:
        """One step's inputs: token ids `ids` (a sequence) after `past_len` cached ones, with the
        attention mask and positions where the model takes them, and `past` (numpy or OrtValues)."""
        seq = len(ids)
        feeds = {"input_ids": np.array([ids], dtype=self._types["input_ids"])}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((1, past_len + seq), dtype=self._types["attention_mask"])
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(past_len, past_len + seq, dtype=self._types["position_ids"])[None]
        return feeds | past

    def run_ort_values(self, feeds: dict) -> dict[str, ort.OrtValue]:
        """The model's outputs by name as OrtValues (numpy inputs are wrapped, OrtValues passed on)."""
        feeds = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
        return dict(zip(self.outputs, self.session.run_with_ort_values(self.outputs, feeds)))

    def tokens(self, prompt: list[int], max_new_tokens: int, eos: set[int] = frozenset(), temperature: float = 0.0,
               seed: int | None = None) -> Iterator[int]:
        """Yield up to `max_new_tokens` tokens after `prompt` (token ids), stopping after one in `eos`:
        the most likely token each step (temperature 0), or one sampled from softmax(logits / T)."""
        if not prompt:
            raise ValueError("the prompt holds no tokens")
        rng = np.random.default_rng(seed)
        past, ids, past_len = self.empty_past(), list(prompt), 0
        for _ in range(max_new_tokens):
            out = self.run_ort_values(self.feeds(ids, past, past_len))
            logits = out["logits"].numpy()[0, -1].astype(np.float64)
            if temperature > 0:
                p = np.exp((logits - logits.max()) / temperature)
                token = int(rng.choice(len(p), p=p / p.sum()))
            else:
                token = int(logits.argmax())
            yield token
            if token in eos:
                return
            past_len += len(ids)
            past = {n.replace("present", "past_key_values", 1): v for n, v in out.items() if n.startswith("present")}
            ids = [token]


__all__ = ["CachedDecoder"]
