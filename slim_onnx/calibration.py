"""Calibration: the statistics of every layer's input, from running the original model in onnxruntime.

The part of the model the chosen layers' inputs depend on (blocks.Submodel) runs in onnxruntime
batch by batch with those inputs as its outputs, and each batch's activations are folded into
LayerStatistics at once, so no batch is kept. Layers that share an input (q/k/v, gate/up) share one
LayerStatistics. This is the one-pass mode; streaming.py runs the blocks one at a time.

Feeds come from text (a file or a folder of .txt files, tokenized with the export's tokenizer and cut
into windows of `seqlen` tokens with a fixed seed) or from an .npz of ready inputs. Decoder exports
with past key values get an empty past, position ids and an attention mask; encoders get
attention_mask and token_type_ids.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

from slim_onnx.algorithms.stats import LayerStatistics
from slim_onnx.blocks import Submodel, weights_folder
from slim_onnx.passes.linear import LinearLayer


class CalibrationError(ValueError):
    """Calibration data that cannot drive the model (too short, wrong inputs, missing tokenizer)."""


@dataclasses.dataclass
class TextCalibration:
    path: str | os.PathLike
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    tokenizer: str | os.PathLike | None = None  # default: the model folder

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise CalibrationError(f"--calib-samples {self.samples}: expected at least 1 token window")
        if self.seqlen < 1:
            raise CalibrationError(f"--seqlen {self.seqlen}: expected at least 1 token per window")


# What a text file should not hold: U+FFFD (what errors="replace" puts for bytes that are not
# UTF-8) and control characters other than whitespace (NUL-padded or other binary data that happens
# to be valid UTF-8).
_NOT_TEXT = re.compile("[\x00-\x08\x0e-\x1f\x7f\ufffd]")
BINARY_SHARE = 0.3  # above this share of such characters a file is refused as binary


def _read_text_file(path: Path, log) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    bad = _NOT_TEXT.subn("", text)[1]
    if bad:
        share = bad / len(text)
        percent = f"{share:.1%}" if share >= 1e-3 else "under 0.1%"
        problem = f"{path}: {percent} of its characters are not UTF-8 text"
        if share > BINARY_SHARE:
            raise CalibrationError(f"{problem}: is it a binary file? Pass a text file (or a folder of .txt files), "
                                   "or an .npz of model inputs")
        log(f"warning: {problem}")
    return text


def read_text(path: str | os.PathLike, log=None) -> str:
    """A text file, or a folder's .txt files joined; a file that is mostly not UTF-8 text is refused,
    one with some such characters gets a warning through `log` (default: stderr)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    p = Path(path)
    if p.is_dir():
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise CalibrationError(f"{p} holds no .txt file")
        return "\n\n".join(_read_text_file(f, log) for f in files)
    if not p.is_file():
        raise CalibrationError(f"calibration text {p} does not exist")
    return _read_text_file(p, log)


def load_tokenizer(folder: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # transformers raises OSError, ValueError, ... for a missing or broken tokenizer
        raise CalibrationError(f"no usable tokenizer in {folder} ({error}); pass --tokenizer PATH") from None


def token_windows(ids: np.ndarray, samples: int, seqlen: int, seed: int) -> np.ndarray:
    """`samples` windows of `seqlen` tokens at random, non-overlapping positions (fixed seed)."""
    available = len(ids) // seqlen
    if available < 1:
        raise CalibrationError(
            f"the calibration text has {len(ids)} tokens, fewer than one window of --seqlen {seqlen}: "
            "give more text or a smaller --seqlen"
        )
    rng = np.random.default_rng(seed)
    starts = rng.choice(available, size=min(samples, available), replace=False) * seqlen
    return np.stack([ids[s : s + seqlen] for s in sorted(starts)])


def _input_dims(value: ir.Value) -> list[int | None]:
    return [d if isinstance(d, int) else None for d in (value.shape or [])]


def model_feeds(model: ir.Model, windows: np.ndarray, past_head_size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One feed per token window, filling the inputs an Optimum export (or an onnxruntime-genai
    model, whose past inputs leave the head size symbolic: `past_head_size`) declares."""
    for window in windows:
        seq = len(window)
        feeds = {}
        for value in model.graph.inputs:
            name = value.name
            dtype = value.dtype.numpy() if value.dtype is not None else np.int64
            if name == "input_ids":
                feeds[name] = window[None].astype(dtype)
            elif name == "attention_mask":
                feeds[name] = np.ones((1, seq), dtype=dtype)
            elif name == "position_ids":
                feeds[name] = np.arange(seq, dtype=dtype)[None]
            elif name == "token_type_ids":
                feeds[name] = np.zeros((1, seq), dtype=dtype)
            elif name.startswith("past_key_values") or name.startswith("past_"):
                dims = _input_dims(value)
                if len(dims) == 4 and dims[3] is None:
                    dims[3] = past_head_size
                if len(dims) != 4 or dims[1] is None or dims[3] is None:
                    raise CalibrationError(f"cannot build an empty past for input {name} of shape {value.shape}")
                feeds[name] = np.zeros((1, dims[1], 0, dims[3]), dtype=dtype)
            elif name == "use_cache_branch":
                feeds[name] = np.array([False])
            else:
                raise CalibrationError(f"do not know how to feed model input {name!r}: give an .npz of inputs")
        yield feeds


NPZ_CONVENTION = "one array per model input, named as the input, with a leading axis that indexes the batches"


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise CalibrationError(f"calibration data {path} does not exist")
    try:
        data = np.load(path)  # allow_pickle stays False: an .npz must not run code
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                return {name: data[name] for name in data.files}
    except Exception as error:  # zipfile, zlib, pickle and format errors: the file is not a usable .npz
        raise CalibrationError(f"{path} is not a readable .npz ({type(error).__name__}: {error}); "
                               f"expected {NPZ_CONVENTION}") from None
    raise CalibrationError(f"{path} holds one array (.npy), not an .npz archive: expected {NPZ_CONVENTION}")


def _in_brackets(dims) -> str:
    return "[" + ", ".join(map(str, dims)) + "]"


def _check_npz_array(path: Path, name: str, array: np.ndarray, value: ir.Value) -> None:
    """The array must be a batch axis followed by one feed of the input: its rank, fixed sizes and dtype."""
    if value.shape is not None:
        problem = (f"{path}: array {name!r} has shape {_in_brackets(array.shape)}, but input {name!r} is "
                   f"{_in_brackets(value.shape)}: expected {_in_brackets(['batches', *value.shape])} "
                   f"({NPZ_CONVENTION})")
        if array.ndim != len(value.shape) + 1:
            raise CalibrationError(problem)
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, int) and array.shape[axis + 1] != dim:
                raise CalibrationError(problem)
    elif array.ndim == 0:
        raise CalibrationError(f"{path}: array {name!r} is a scalar: {NPZ_CONVENTION}")
    if value.dtype is not None and array.dtype != value.dtype.numpy():
        raise CalibrationError(f"{path}: array {name!r} is {array.dtype}, but input {name!r} is "
                               f"{value.dtype.numpy()}: convert it with .astype(np.{value.dtype.numpy()})")


def npz_feeds(path: str | os.PathLike, model: ir.Model) -> list[dict[str, np.ndarray]]:
    """Feeds from an .npz: one array per model input, named as the input; a leading axis indexes the
    batches. Each array is checked against the model's input of its name."""
    path = Path(path)
    arrays = _load_npz(path)
    inputs = {value.name: value for value in model.graph.inputs}
    if not arrays:
        raise CalibrationError(f"{path} holds no array: expected {NPZ_CONVENTION}")
    for name, array in arrays.items():
        if name not in inputs:
            raise CalibrationError(f"{path}: array {name!r} is not an input of the model (its inputs: "
                                   f"{', '.join(inputs)}); expected {NPZ_CONVENTION}")
        _check_npz_array(path, name, array, inputs[name])
    # an input that is also an initializer has a default value; the others must be fed
    missing = [name for name in inputs if name not in arrays and name not in model.graph.initializers]
    if missing:
        raise CalibrationError(f"{path} has no array for model input {', '.join(map(repr, missing))}: "
                               f"expected {NPZ_CONVENTION}")
    counts = {name: len(array) for name, array in arrays.items()}
    if len(set(counts.values())) != 1:
        raise CalibrationError(f"{path}: every array needs the same number of batches (leading axis), got "
                               + ", ".join(f"{name}: {count}" for name, count in counts.items()))
    batches = counts.popitem()[1]
    if batches == 0:
        raise CalibrationError(f"{path} holds no batch (its arrays' leading axis has length 0)")
    return [{name: array[i] for name, array in arrays.items()} for i in range(batches)]


def collect_statistics(
    model: ir.Model, layers: list[LinearLayer], feeds: Iterable[dict[str, np.ndarray]], hessian: bool = True,
    progress=None, *, device: str = "cpu", cut: Callable[[ir.Node], bool] = lambda node: False,
    carried: Callable[[int, list[str]], dict[str, np.ndarray]] | None = None,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
) -> dict[str, LayerStatistics]:
    """LayerStatistics for each layer (by name) whose input lives in the main graph, from one run of
    the part of the model those inputs depend on (no logits: lm_head is the largest product of a
    small LLM). Streaming cuts the graph where cut(node) and reads those nodes' outputs for batch i
    from carried(i, names); statistics are summed on `device`, the model runs on `providers`."""
    by_value: dict[ir.Value, list[LinearLayer]] = {}
    for layer in layers:
        if layer.graph is model.graph and layer.node.inputs[0] is not None:
            by_value.setdefault(layer.node.inputs[0], []).append(layer)
    if not by_value:
        return {}
    shared = {value.name: LayerStatistics(group[0].k, hessian=hessian, device=device, name=group[0].name)
              for value, group in by_value.items()}
    part = Submodel(model, list(by_value), cut)
    names = [v.name for v in part.cut_values]
    read = (lambda i: carried(i, names)) if names else (lambda i: {})
    session = part.session(read(0), weights_folder(model), providers)
    for i, feed in enumerate(feeds):
        try:
            outputs = session.run(feed, read(i))
        except Exception as error:  # onnxruntime's errors share no base class; sizes that disagree, ...
            raise CalibrationError(f"onnxruntime could not run the calibration batch at index {i}: {error}") from None
        for name, x in outputs.items():
            shared[name].update(x.astype(np.float32, copy=False))
        if progress is not None:
            progress()
    return {layer.name: shared[value.name] for value, group in by_value.items() for layer in group}
