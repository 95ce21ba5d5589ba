"""`slim-onnx inspect --plot`: a budgeted model's per-layer bytes and sensitivity in one picture.

Top: each layer's packed bytes, coloured by the format the plan chose. Bottom (log scale): the
layer's sensitivity (model divergence per unit of its squared output error) and the predicted
damage of its chosen format, so that the layers the plan spent bytes on can be seen to be the ones
whose damage would have been largest. matplotlib is an optional extra (pip install 'slim-onnx[plot]').
"""

from __future__ import annotations

import os
from pathlib import Path

from slim_onnx.config import ConfigError
from slim_onnx.passes.linear import block_index


def plan_figure(plan: list[dict]):
    """The figure for plan rows {layer, format, bytes, sensitivity, predicted_damage} in graph order."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display is needed or wanted
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ConfigError("--plot needs matplotlib: pip install 'slim-onnx[plot]'") from error
    x = list(range(len(plan)))
    formats = list(dict.fromkeys(p["format"] for p in plan))
    colours = {f: f"C{i % 10}" for i, f in enumerate(formats)}
    figure = Figure(figsize=(max(8.0, 0.06 * len(plan)), 6.0), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True)
    for f in formats:
        chosen = [i for i in x if plan[i]["format"] == f]
        top.bar(chosen, [plan[i]["bytes"] / 2**20 for i in chosen], width=0.85, color=colours[f], label=f)
    top.set_yscale("log")  # lm_head and the MLP dwarf q/k/v on a linear scale
    top.set_ylabel("packed MiB")
    top.legend(title="format", fontsize="small", ncols=min(4, len(formats)))
    bottom.plot(x, [p["sensitivity"] for p in plan], "k.-", lw=0.8, label="sensitivity")
    bottom.plot(x, [p["predicted_damage"] for p in plan], "r.", label="predicted damage")
    bottom.set_yscale("log")
    bottom.set_ylabel("divergence")
    bottom.legend(fontsize="small")
    ticks = [i for i in x if block_index(plan[i]["layer"]) != (block_index(plan[i - 1]["layer"]) if i else None)]
    bottom.set_xticks(ticks, [block_index(plan[i]["layer"]) or plan[i]["layer"].split("/")[1] for i in ticks], fontsize="small")
    bottom.set_xlabel("layer (ticks at each block's first layer)")
    return figure


def save_plan_figure(plan: list[dict], path: str | os.PathLike) -> Path:
    """Draw plan_figure into `path` (format from its suffix: .png, .svg, .pdf), written whole or not at all."""
    path = Path(path)
    figure = plan_figure(plan)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        figure.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


__all__ = ["plan_figure", "save_plan_figure"]
