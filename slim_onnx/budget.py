"""Per-layer formats under a byte budget: the least predicted damage for the bytes the user allows.

Every layer l can take one of a ladder of formats c the kernels run (2:4 or dense 4-bit weights,
int4 adapters of rank 0 up to a quarter of min(K, N)), each with exact bytes b[l][c]
(layout.packed_nbytes) and a predicted loss increase d[l][c]. Choosing one format per layer,

    minimise  sum_l d[l][c_l]   subject to   sum_l b[l][c_l] <= B,

is a multiple-choice knapsack. It is solved exactly by dynamic programming over the budget counted
in units of u bytes (every candidate's bytes rounded up to whole units, so the choice never exceeds
B): best_l(x) = min_c best_{l-1}(x - b[l][c]) + d[l][c], with best_0 = 0, about 65536 units whatever
the model's size (u = B / 65536), one vectorised pass per layer and candidate.

The prediction d[l][c] = s_l * e[l][c] takes e, the layer's output error tr(E^T H E) of candidate c
under the layer's input statistics (algorithms/candidates.py), and s_l, the layer's sensitivity: how
much the model's output moves per unit of that layer's output error (sensitivity.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from slim_onnx.algorithms.layer import candidate_errors
from slim_onnx.calibration import collect_statistics
from slim_onnx.config import ConfigError, SlimConfig
from slim_onnx.layout import packed_nbytes
from slim_onnx.sensitivity import SensitivityProbe

BUDGET_UNITS = 1 << 16


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One format a layer may take: its sparsity and its adapter rank (a ratio of min(K, N))."""

    sparsity: str
    rank: float

    def config(self, base: SlimConfig) -> SlimConfig:
        """`base` with this format (its pruning setting goes unused where the format is dense)."""
        adapters = {"rank": self.rank} if self.rank else {"rank": 0, "adapter_format": "none"}
        if self.rank and base.adapter_format == "none":
            adapters["adapter_format"] = "int4"
        return dataclasses.replace(base, sparsity=self.sparsity, **adapters)

    @property
    def label(self) -> str:
        return f"{self.sparsity}+r{self.rank:g}"


# 2:4 and dense 4-bit, each without adapters and with int4 adapters of rank 0.05, 0.1 and 0.25.
LADDER = tuple(Candidate(s, r) for s in ("2:4", "none") for r in (0, 0.05, 0.1, 0.25))


def candidate_bytes(k: int, n: int, candidate: Candidate, base: SlimConfig, bias: bool = False) -> int:
    """Packed bytes of a [K, N] layer in this format (as packing.pack_layer would write it)."""
    config = candidate.config(base)
    rank = config.resolve_rank(k, n)
    return packed_nbytes(k, n, config.group_size, config.sparsity == "2:4", rank,
                         config.adapter_format if rank else "none", config.adapter_group_size, bias)


def budget_bytes(weights: int, *, bits: float | None = None, size_ratio: float | None = None) -> int:
    """The byte budget for `weights` compressed weights: `bits` per weight on average (adapters and
    scales included), or `size_ratio` of their float16 bytes."""
    if (bits is None) == (size_ratio is None):
        raise ConfigError("give exactly one of bits per weight (--budget) or a size ratio (--size-ratio)")
    if bits is not None:
        if not 0 < bits < 16:
            raise ConfigError(f"--budget {bits}: expected average bits per weight between 0 and 16, e.g. 3.8")
        return int(weights * bits / 8)
    if not 0 < size_ratio < 1:
        raise ConfigError(f"--size-ratio {size_ratio}: expected a fraction of the float16 size, e.g. 0.3")
    return int(weights * 2 * size_ratio)


def choose_formats(costs: np.ndarray, sizes: np.ndarray, budget: int, units: int = BUDGET_UNITS) -> list[int]:
    """For costs and sizes [layers, candidates] (np.inf marks a candidate a layer cannot take), the
    candidate index per layer with the least total cost whose total size is at most `budget` (see
    the module doc; exact when every size is a multiple of budget / units, else for sizes rounded
    up to whole units). Raises ConfigError when even the smallest choice does not fit."""
    costs, sizes = np.asarray(costs, dtype=np.float64), np.asarray(sizes, dtype=np.int64)
    layers, _ = costs.shape
    smallest = int(np.where(np.isfinite(costs), sizes, np.iinfo(np.int64).max).min(axis=1).sum())
    if smallest > budget:
        raise ConfigError(f"the budget of {budget} bytes is below the smallest formats' {smallest} bytes: "
                          "allow more bytes (a larger --budget or --size-ratio)")
    unit = max(1, -(-budget // units))
    need = -(-sizes // unit)  # whole units, rounded up: the choice can only be smaller than it looks
    span = budget // unit
    best = np.zeros(span + 1)  # best[x]: least cost of the layers so far within x units
    picks = np.zeros((layers, span + 1), dtype=np.int16)
    for layer in range(layers):
        new = np.full(span + 1, np.inf)
        for c, (cost, size) in enumerate(zip(costs[layer], need[layer])):
            if not np.isfinite(cost) or size > span:
                continue
            option = np.full(span + 1, np.inf)
            option[size:] = best[: span + 1 - size] + cost
            better = option < new
            new[better], picks[layer, better] = option[better], c
        best = new
    if not np.isfinite(best[span]):  # the rounding to units made the smallest choice overflow
        raise ConfigError(f"the budget of {budget} bytes is too tight to place every layer: allow a little more")
    choice, x = [0] * layers, span
    for layer in reversed(range(layers)):
        choice[layer] = int(picks[layer, x])
        x -= need[layer, choice[layer]]
    return choice


@dataclasses.dataclass
class LayerPlan:
    """The format chosen for one layer, and why: its bytes, the output error e = tr(E^T H E) (mean
    squared error per token, on the dense model's statistics) of every candidate by label, the
    layer's sensitivity s and the predicted damage s * e of the chosen one."""

    candidate: Candidate
    config: SlimConfig
    bytes: int
    errors: dict[str, float]
    sensitivity: float

    def report(self) -> dict:
        error = self.errors[self.candidate.label]
        return {"format": self.candidate.label, "bytes": self.bytes, "squared_output_error": error,
                "sensitivity": self.sensitivity, "predicted_damage": self.sensitivity * error,
                "candidate_squared_output_errors": self.errors}


def sibling_groups(layers) -> list[list[int]]:
    """Indices of `layers` grouped by the activation they read (q/k/v, gate/up): the layers that
    passes/siblings.py merges into one node when they share a format."""
    groups: dict[int, list[int]] = {}
    for i, layer in enumerate(layers):
        groups.setdefault(id(layer.node.inputs[0]), []).append(i)
    return list(groups.values())


def plan_formats(model_path, model, layers, feeds: list[dict], base: SlimConfig, budget: int, workdir, *,
                 providers=("CPUExecutionProvider",), sensitivity_windows: int = 4, ladder=LADDER,
                 same_format_for_siblings: bool = True, log=lambda msg: None) -> dict[str, LayerPlan]:
    """A LayerPlan per layer (by name) for a byte budget: every candidate of `ladder` evaluated on
    the dense model's statistics, each layer's sensitivity measured with `base` (its default format)
    on the first `sensitivity_windows` feeds, then choose_formats. same_format_for_siblings: layers
    reading one activation are one choice (their costs and bytes summed), so that they stay one
    merged node (one pass over the activation, the SwiGLU fold, packed attention)."""
    log(f"planning formats: statistics of {len(layers)} layers on {len(feeds)} batches")
    stats = collect_statistics(model, layers, feeds, hessian=True, device=base.device, providers=providers)
    probe = SensitivityProbe(model_path, [layer.name for layer in layers], feeds[:sensitivity_windows], workdir, providers)
    costs = np.full((len(layers), len(ladder)), np.inf)
    sizes = np.zeros((len(layers), len(ladder)), dtype=np.int64)
    errors, sensitivities = [], []
    for i, layer in enumerate(layers):
        w, bias = layer.weight_array(), layer.bias_array()
        allowed = [j for j, c in enumerate(ladder) if c.sparsity == "none" or layer.k % 4 == 0]
        configs = [ladder[j].config(base) for j in allowed]
        if base not in configs:  # the sensitivity is measured in the base format
            configs.append(base)
        at_base = configs.index(base)
        e, base_weight = candidate_errors(w, stats[layer.name], configs, layer.name, weight_of=at_base)
        damage = probe.divergence(layer.name, base_weight)
        s = damage / e[at_base] if e[at_base] > 0 else 0.0
        for j, error in zip(allowed, e):
            costs[i, j] = s * error
        sizes[i] = [candidate_bytes(layer.k, layer.n, c, base, bias is not None) for c in ladder]
        errors.append({ladder[j].label: error for j, error in zip(allowed, e)})
        sensitivities.append(s)
        log(f"[{i + 1}/{len(layers)}] {layer.name}: sensitivity {s:.3g} (KL {damage:.3g} at {base.sparsity}+r{base.rank:g})")
    groups = sibling_groups(layers) if same_format_for_siblings else [[i] for i in range(len(layers))]
    group_choice = choose_formats(np.array([costs[g].sum(axis=0) for g in groups]),
                                  np.array([sizes[g].sum(axis=0) for g in groups]), budget)
    choice = {i: c for g, c in zip(groups, group_choice) for i in g}
    return {layer.name: LayerPlan(ladder[choice[i]], ladder[choice[i]].config(base), int(sizes[i, choice[i]]), errors[i],
                                  sensitivities[i])
            for i, layer in enumerate(layers)}


__all__ = ["BUDGET_UNITS", "Candidate", "LADDER", "LayerPlan", "budget_bytes", "candidate_bytes", "choose_formats", "plan_formats",
           "sibling_groups"]
