"""onnxruntime-genai model folders (made by its model builder): what compress reads from their
genai_config.json, and the config it writes so that `og.Model(folder)` loads our kernels.

A genai folder holds model.onnx (packed QKV MatMul -> GroupQueryAttention with the rotary inside,
SkipSimplifiedLayerNormalization, lm_head) and genai_config.json, which names the decoder's inputs
and its head size (the past inputs' last dimension is symbolic there). onnxruntime-genai loads a
custom-op library named by `custom_ops_library` in the decoder's session options only from inside
the model folder, so the compressed folder carries a copy of ours.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

GENAI_CONFIG = "genai_config.json"


class GenaiConfigError(ValueError):
    """A genai_config.json that cannot be read or lacks what compress needs."""


def read_genai_config(folder: Path) -> dict | None:
    """The folder's genai_config.json as a dict, or None when there is none."""
    path = Path(folder) / GENAI_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
        decoder = config["model"]["decoder"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise GenaiConfigError(f"{path} is not a readable onnxruntime-genai config ({type(error).__name__}: {error}): "
                               "rebuild the folder with onnxruntime_genai.models.builder") from error
    if not isinstance(decoder, dict):
        raise GenaiConfigError(f"{path}: model.decoder must be an object")
    return config


def past_head_size(config: dict | None) -> int | None:
    """The head size that sizes an empty past (model.decoder.head_size), or None."""
    if config is None:
        return None
    size = config["model"]["decoder"].get("head_size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= 4096:
        raise GenaiConfigError(f"{GENAI_CONFIG}: model.decoder.head_size {size!r} is not a head size")
    return size


def with_custom_ops_library(config: dict, library_name: str) -> dict:
    """A copy of `config` whose decoder session loads `library_name` from the model folder."""
    config = copy.deepcopy(config)
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["custom_ops_library"] = library_name
    return config


def write_genai_folder(folder: Path, config: dict, library: str | None) -> None:
    """Write genai_config.json into `folder`, naming and holding a copy of `library` if given
    (without it the SlimMatMul nodes run as their standard-op fallback functions)."""
    if library is not None:
        shutil.copy2(library, Path(folder) / Path(library).name)
        config = with_custom_ops_library(config, Path(library).name)
    (Path(folder) / GENAI_CONFIG).write_text(json.dumps(config, indent=4))


__all__ = ["GENAI_CONFIG", "GenaiConfigError", "past_head_size", "read_genai_config", "with_custom_ops_library",
           "write_genai_folder"]
