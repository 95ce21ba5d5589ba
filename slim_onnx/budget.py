"""Per-layer formats under a byte budget: the least predicted damage for the bytes the user allows.

Every layer l can take one of a ladder of formats c the kernels run (2:4 or dense 4-bit weights,
int4 adapters of rank 0 up to a quarter of min(K, N)), each with exact bytes b[l][c]
(layout.packed_nbytes) and a predicted loss increase d[l][c]. Choosing one format per layer,

    minimise  sum_l d[l][c_l]   subject to   sum_l b[l][c_l] <= B,

is a multiple-choice knapsack. It is solved exactly by dynamic programming over the budget counted
in units of u bytes (every candidate's bytes rounded up to whole units, so the choice never exceeds
B): best_l(x) = min_c best_{l-1}(x - b[l][c]) + d[l][c], with best_0 = 0, about 65536 units whatever
the model's size (u = B / 65536), one vectorised pass per layer and candidate.

The prediction d[l][c] = s_l * e[l][c] takes e, the layer's relative squared output error
tr(E^T H E) / tr(W^T H W) of candidate c under the layer's input statistics
(algorithms/layer.py candidate_errors), and s_l, the layer's sensitivity: how much the model's
output moves per unit of that layer's error (sensitivity.py).
"""

from __future__ import annotations

import collections
import dataclasses
import math

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


@dataclasses.dataclass(frozen=True)
class Budget:
    """What the user asks of the plan: exactly one of a size (bits per compressed weight on average,
    adapters and scales included, or a fraction of their float16 bytes) or a quality on the
    calibration text (the largest mean KL divergence of the next-token distributions from the dense
    model's, or the largest ratio of perplexities). For a quality, the plan is the smallest one found
    whose measured divergence meets it (plan_formats)."""

    bits: float | None = None
    size_ratio: float | None = None
    max_kl: float | None = None
    ppl_ratio: float | None = None

    def __post_init__(self):
        given = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
        if len(given) != 1:
            raise ConfigError("give exactly one of --budget BITS, --size-ratio R, --max-kl K or --target-ppl-ratio R")
        if self.bits is not None and not 0 < self.bits < 16:
            raise ConfigError(f"--budget {self.bits}: expected average bits per weight between 0 and 16, e.g. 3.8")
        if self.size_ratio is not None and not 0 < self.size_ratio < 1:
            raise ConfigError(f"--size-ratio {self.size_ratio}: expected a fraction of the float16 size, e.g. 0.3")
        if self.max_kl is not None and not 0 < self.max_kl < math.inf:
            raise ConfigError(f"--max-kl {self.max_kl}: expected a positive divergence in nats, e.g. 0.2")
        if self.ppl_ratio is not None and not 1 < self.ppl_ratio < math.inf:
            raise ConfigError(f"--target-ppl-ratio {self.ppl_ratio}: expected a ratio above 1, e.g. 1.2")

    @property
    def is_quality(self) -> bool:
        return self.max_kl is not None or self.ppl_ratio is not None

    def bytes(self, weights: int) -> int:
        """The byte budget of a size goal for `weights` compressed weights."""
        if self.bits is not None:
            return int(weights * self.bits / 8)
        if self.size_ratio is not None:
            return int(weights * 2 * self.size_ratio)
        raise ConfigError("a quality goal (--max-kl, --target-ppl-ratio) has no byte budget of its own")

    def divergence_goal(self) -> float:
        """The quality goal as a KL divergence: a perplexity ratio R is a mean log-likelihood loss of
        ln R per token, which the KL approximates (ln R was 0.93-1.03x the KL on SmolLM2 held-out text, docs/algorithms.md)."""
        return self.max_kl if self.max_kl is not None else math.log(self.ppl_ratio)


def _knapsack(costs: np.ndarray, sizes: np.ndarray, budget: int, units: int):
    """The dynamic programme of the module doc: (best [span + 1], the least total cost within x
    units for every x; picks [layers, span + 1]; sizes in units; the unit in bytes)."""
    layers, _ = costs.shape
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
    return best, picks, need, unit


def _smallest_sizes(costs: np.ndarray, sizes: np.ndarray) -> int:
    return int(np.where(np.isfinite(costs), sizes, np.iinfo(np.int64).max).min(axis=1).sum())


def choose_formats(costs: np.ndarray, sizes: np.ndarray, budget: int, units: int = BUDGET_UNITS) -> list[int]:
    """For costs and sizes [layers, candidates] (np.inf marks a candidate a layer cannot take), the
    candidate index per layer with the least total cost whose total size is at most `budget` (see
    the module doc; exact when every size is a multiple of budget / units, else for sizes rounded
    up to whole units). Raises ConfigError when even the smallest choice does not fit."""
    costs, sizes = np.asarray(costs, dtype=np.float64), np.asarray(sizes, dtype=np.int64)
    smallest = _smallest_sizes(costs, sizes)
    if smallest > budget:
        raise ConfigError(f"the budget of {budget} bytes is below the smallest formats' {smallest} bytes: "
                          "allow more bytes (a larger --budget or --size-ratio)")
    best, picks, need, _ = _knapsack(costs, sizes, budget, units)
    x = len(best) - 1
    if not np.isfinite(best[x]):  # the rounding to units made the smallest choice overflow
        raise ConfigError(f"the budget of {budget} bytes is too tight to place every layer: allow a little more")
    choice = [0] * len(costs)
    for layer in reversed(range(len(costs))):
        choice[layer] = int(picks[layer, x])
        x -= need[layer, choice[layer]]
    return choice


def smallest_budget(costs: np.ndarray, sizes: np.ndarray, cost: float, units: int = BUDGET_UNITS) -> int:
    """The fewest bytes (to 1/units of the largest useful budget) within which choose_formats
    reaches a total cost of at most `cost`; the bytes of the least-cost choice where none reaches
    it. One dynamic programme gives the least cost for every budget at once."""
    costs, sizes = np.asarray(costs, dtype=np.float64), np.asarray(sizes, dtype=np.int64)
    # the least-cost candidate of every layer, the largest the budget needs to be
    top = int(np.take_along_axis(sizes, np.argmin(costs, axis=1)[:, None], axis=1).sum())
    largest = max(top, _smallest_sizes(costs, sizes))
    best, _, _, unit = _knapsack(costs, sizes, largest, units)
    reached = np.flatnonzero(best <= cost)
    return largest if not len(reached) else min(largest, int(reached[0]) * unit)


@dataclasses.dataclass
class LayerPlan:
    """The format chosen for one layer, and why: its bytes, the relative squared output error
    e = tr(E^T H E) / tr(W^T H W) (on the dense model's statistics) of every candidate by label, the
    layer's sensitivity s and the predicted damage s * e of the chosen one."""

    candidate: Candidate
    config: SlimConfig
    bytes: int
    errors: dict[str, float]
    sensitivity: float

    @property
    def predicted_damage(self) -> float:
        return self.sensitivity * self.errors[self.candidate.label]

    def report(self) -> dict:
        error = self.errors[self.candidate.label]
        return {"format": self.candidate.label, "bytes": self.bytes, "predicted_output_error": math.sqrt(error),
                "sensitivity": self.sensitivity, "predicted_damage": self.predicted_damage,
                "candidate_squared_output_errors": self.errors}


@dataclasses.dataclass
class Plan:
    """A LayerPlan per layer (by name), the byte budget it was chosen for, and for a quality goal
    the search's rounds (bytes, predicted and measured divergence of each plan tried)."""

    layers: dict[str, LayerPlan]
    budget: int
    search: list[dict] = dataclasses.field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.layers.values())

    def summary(self, weights: int) -> dict:
        """The budget, the bytes chosen, how many layers took each format (most first), the rounds."""
        counts = collections.Counter(p.candidate.label for p in self.layers.values())
        return {"bytes": self.budget, "bits_per_weight": 8 * self.budget / weights, "bytes_chosen": self.bytes,
                "formats": dict(counts.most_common())} | ({"search": self.search} if self.search else {})


def sibling_groups(layers) -> list[list[int]]:
    """Indices of `layers` grouped by the activation they read (q/k/v, gate/up): the layers that
    passes/siblings.py merges into one node when they share a format."""
    groups: dict[int, list[int]] = {}
    for i, layer in enumerate(layers):
        groups.setdefault(id(layer.node.inputs[0]), []).append(i)
    return list(groups.values())


@dataclasses.dataclass
class CandidateTable:
    """Every layer's candidates: predicted damage costs[l, c] (np.inf where layer l cannot take c)
    and bytes sizes[l, c], the errors and sensitivities behind them, and the groups of layers that
    take one format together."""

    layers: list
    ladder: tuple
    base: SlimConfig
    costs: np.ndarray
    sizes: np.ndarray
    errors: list[dict]
    sensitivities: list[float]
    groups: list[list[int]]

    def _grouped(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([self.costs[g].sum(axis=0) for g in self.groups]),
                np.array([self.sizes[g].sum(axis=0) for g in self.groups]))

    def choose(self, budget: int) -> Plan:
        """The least predicted damage within `budget` bytes."""
        group_choice = choose_formats(*self._grouped(), budget)
        choice = {i: c for g, c in zip(self.groups, group_choice) for i in g}
        return Plan({layer.name: LayerPlan(self.ladder[choice[i]], self.ladder[choice[i]].config(self.base),
                                           int(self.sizes[i, choice[i]]), self.errors[i], self.sensitivities[i])
                     for i, layer in enumerate(self.layers)}, budget)

    def budget_for(self, damage: float) -> int:
        """The fewest bytes whose plan's predicted damage is at most `damage` (smallest_budget)."""
        return smallest_budget(*self._grouped(), damage)

    @staticmethod
    def predicted(plan: Plan) -> float:
        return sum(p.predicted_damage for p in plan.layers.values())


def measure_candidates(model_path, model, layers, feeds: list[dict], base: SlimConfig, workdir, *,
                       providers=("CPUExecutionProvider",), sensitivity_windows: int = 4, ladder=LADDER,
                       same_format_for_siblings: bool = True, log=lambda msg: None):
    """(CandidateTable, the layers' statistics, the SensitivityProbe): every candidate of `ladder`
    evaluated on the dense model's statistics, each layer's sensitivity measured with `base` (its
    default format) on the first `sensitivity_windows` feeds. same_format_for_siblings: layers
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
        # the sensitivity is measured in the base format (dense where K % 4 rules out 2:4)
        own_base = base if layer.k % 4 == 0 else dataclasses.replace(base, sparsity="none")
        if own_base not in configs:
            configs.append(own_base)
        at_base = configs.index(own_base)
        e, base_weight = candidate_errors(w, stats[layer.name], configs, layer.name, weight_of=at_base)
        damage = probe.measure({layer.name: base_weight}).divergence
        s = damage / e[at_base] if e[at_base] > 0 else 0.0
        for j, error in zip(allowed, e):
            costs[i, j] = s * error
        sizes[i] = [candidate_bytes(layer.k, layer.n, c, base, bias is not None) for c in ladder]
        errors.append({ladder[j].label: error for j, error in zip(allowed, e)})
        sensitivities.append(s)
        log(f"[{i + 1}/{len(layers)}] {layer.name}: sensitivity {s:.3g} (divergence {damage:.3g} at {own_base.sparsity}+r{base.rank:g})")
    groups = sibling_groups(layers) if same_format_for_siblings else [[i] for i in range(len(layers))]
    table = CandidateTable(layers, ladder, base, costs, sizes, errors, sensitivities, groups)
    return table, stats, probe


# A quality goal's search: plans are measured until one is within this fraction below the goal.
QUALITY_SEARCH_ROUNDS = 6
QUALITY_CLOSE_ENOUGH = 0.85
QUALITY_MIN_STEP = 0.95


def _search_quality(table: CandidateTable, stats: dict, probe: SensitivityProbe, goal: Budget, log) -> Plan:
    """The smallest plan found whose measured divergence on the probe's windows meets `goal`.

    The predicted damage (sum of s_l * e_l) underestimates what the whole plan measures, since the
    layers' errors compound (1.3-1.5x on SmolLM2), so it only steers: each round asks the table for
    the fewest bytes predicted to reach a damage d, measures that plan (every layer's weight in its
    chosen format at once), and sets the next d to the plan's prediction times goal / measured (at
    least 5% away from it). Rounds stop when a plan meets the goal within QUALITY_CLOSE_ENOUGH of
    it, when a plan repeats, or after QUALITY_SEARCH_ROUNDS."""
    if goal.ppl_ratio is not None and probe.dense_nll[0] is None:
        raise ConfigError("--target-ppl-ratio needs a decoder (a logits output and input_ids): use --max-kl, which for "
                          "other models bounds the relative squared error of the first output")
    want = goal.divergence_goal()
    layers = {layer.name: layer for layer in table.layers}
    weights: dict[str, tuple[str, np.ndarray]] = {}  # layer -> (label, the matrix it multiplies by)
    damage, best, tried, rounds = want, None, set(), []
    for _ in range(QUALITY_SEARCH_ROUNDS):
        plan = table.choose(table.budget_for(damage))
        key = tuple(p.candidate.label for p in plan.layers.values())
        if key in tried:
            break
        tried.add(key)
        for name, chosen in plan.layers.items():
            if weights.get(name, ("",))[0] != chosen.candidate.label:
                layer = layers[name]
                _, w = candidate_errors(layer.weight_array(), stats[name], [chosen.config], name, weight_of=0)
                weights[name] = (chosen.candidate.label, w)
        measured = probe.measure({name: w for name, (_, w) in weights.items()})
        # a perplexity goal is met by the perplexity itself; the KL steers either way
        reached = measured.divergence if goal.ppl_ratio is None else math.log(measured.ppl_ratio)
        rounds.append({"bytes": plan.bytes, "predicted": table.predicted(plan), "divergence": measured.divergence}
                      | ({"ppl_ratio": measured.ppl_ratio} if measured.ppl_ratio is not None else {}))
        log(f"quality search: {plan.bytes / 2**20:.2f} MiB, predicted divergence {rounds[-1]['predicted']:.4g}, "
            f"measured {measured.divergence:.4g}" + (f", perplexity x{measured.ppl_ratio:.4f}" if measured.ppl_ratio else ""))
        if reached <= want and (best is None or plan.bytes < best.bytes):
            best = plan
        if reached <= want and reached >= QUALITY_CLOSE_ENOUGH * want:
            break
        # the measured / predicted ratio of this plan calibrates the next prediction; the step goes
        # at least a little past this plan's prediction, so that the next plan differs from it
        predicted = rounds[-1]["predicted"]
        if reached > want:
            damage = min(predicted * want / reached, predicted * QUALITY_MIN_STEP)
        else:
            damage = max(predicted * want / reached if reached > 0 else 2 * predicted, predicted / QUALITY_MIN_STEP)
    if best is None:
        what = "--max-kl" if goal.ppl_ratio is None else "--target-ppl-ratio"
        least = min(rounds, key=lambda r: r["divergence"])
        raise ConfigError(f"no plan reached {what} {goal.max_kl or goal.ppl_ratio} on the calibration windows; the most "
                          f"accurate one tried measured divergence {least['divergence']:.4g}"
                          + (f" (perplexity x{least['ppl_ratio']:.4f})" if "ppl_ratio" in least else "")
                          + f": allow more ({what} larger), or keep more layers dense with --exclude")
    best.search = rounds
    return best


def plan_formats(model_path, model, layers, feeds: list[dict], base: SlimConfig, goal: Budget, workdir, *,
                 providers=("CPUExecutionProvider",), sensitivity_windows: int = 4, ladder=LADDER,
                 same_format_for_siblings: bool = True, log=lambda msg: None) -> Plan:
    """The Plan for `goal`: for a size, the least predicted damage within its bytes; for a quality,
    the smallest plan found that meets it on the calibration windows (_search_quality). The
    keywords are measure_candidates'."""
    table, stats, probe = measure_candidates(model_path, model, layers, feeds, base, workdir, providers=providers,
                                             sensitivity_windows=sensitivity_windows, ladder=ladder,
                                             same_format_for_siblings=same_format_for_siblings, log=log)
    if goal.is_quality:
        return _search_quality(table, stats, probe, goal, log)
    return table.choose(goal.bytes(sum(layer.k * layer.n for layer in layers)))


__all__ = ["BUDGET_UNITS", "Budget", "Candidate", "CandidateTable", "LADDER", "LayerPlan", "Plan", "candidate_bytes",
           "choose_formats", "measure_candidates", "plan_formats", "sibling_groups", "smallest_budget"]
