"""Block-streaming compression: one calibration pass over the model, whatever its depth.

The layers come in groups, one per transformer block (segments, blocks.py). First, once, the static
part of the graph runs (what no layer feeds: embedding, attention mask, rotary tables), and the
values of it that the blocks read are cached per calibration window. Then for each block b:
  1. statistics: run block b's part of the graph (its uncompressed layers) on every calibration
     window, reading what the static part and earlier blocks produced from the cache; fold its
     layers' inputs into LayerStatistics
  2. compress its layers; they become SlimMatMul nodes in the graph (the caller's compress_block)
  3. run block b again, compressed (our kernels), for what later blocks read - the residual stream
     and the next block's normed input - and replace the cache with it. So block b+1's statistics
     see the error of blocks <= b, as in SparseGPT's and SLiM's reference code, and each block runs
     twice in all instead of once per later block.
  4. move the block's packed weights to a file on disk, read back memory-mapped when the model is
     written.
What is held at any time: one block's statistics and weights (onnxruntime's session), the cached
activations (ActivationCache: in memory up to a budget, beyond it in .npy files read back
memory-mapped), the graph, and the weights of the model memory-mapped (onnx-ir external tensors).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from slim_onnx.algorithms.stats import LayerStatistics
from slim_onnx.blocks import STATIC, Submodel, assign_segments, closure, weights_folder
from slim_onnx.calibration import CalibrationError, collect_statistics
from slim_onnx.passes.linear import LinearLayer
from slim_onnx.schema import DOMAIN, SLIM_MATMUL

DEFAULT_CACHE_BUDGET = 2 << 30  # bytes of cached activations kept in memory; the rest goes to disk


class ActivationCache:
    """Carried values of each calibration window by name: arrays in memory while their total stays
    under `budget` bytes, beyond it .npy files under `folder`, read back memory-mapped."""

    def __init__(self, folder: Path, budget: int = DEFAULT_CACHE_BUDGET):
        self.folder, self.budget = folder, budget
        self.entries: dict[tuple[int, str], np.ndarray] = {}
        self.memory_bytes = self.disk_bytes = self.peak_bytes = 0
        self._files = 0

    def put(self, window: int, name: str, array: np.ndarray) -> None:
        array = np.asarray(array, order="C")  # (ascontiguousarray would make a 0-d shape value 1-d)
        if self.memory_bytes + array.nbytes <= self.budget:
            self.memory_bytes += array.nbytes
            self.entries[window, name] = array
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{self._files}.npy"
            self._files += 1
            np.save(path, array)
            self.disk_bytes += array.nbytes
            self.entries[window, name] = np.load(path, mmap_mode="r")
        self.peak_bytes = max(self.peak_bytes, self.memory_bytes + self.disk_bytes)

    def get(self, window: int, names: list[str]) -> dict[str, np.ndarray]:
        """One window's values; those on disk read into memory (one window at a time)."""
        return {name: np.array(self.entries[window, name]) if isinstance(self.entries[window, name], np.memmap)
                else self.entries[window, name] for name in names}

    def names(self) -> set[str]:
        return {name for _, name in self.entries}

    def keep_only(self, names: set[str]) -> None:
        for key in [key for key in self.entries if key[1] not in names]:
            array = self.entries.pop(key)
            if isinstance(array, np.memmap):
                self.disk_bytes -= array.nbytes
                path = array.filename
                del array
                os.remove(path)
            else:
                self.memory_bytes -= array.nbytes


class WeightSpill:
    """Packed weights moved out of memory: appended to one file, and the graph's tensors replaced by
    external tensors that point at it (what writing the model reads, memory-mapped)."""

    ALIGN = 4096

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.name = folder, "packed_weights.bin"
        self.bytes = 0

    def spill(self, values: list[ir.Value]) -> None:
        with open(self.folder / self.name, "ab") as file:
            for value in values:
                tensor = value.const_value
                data = tensor.tobytes()
                offset = -(-file.tell() // self.ALIGN) * self.ALIGN
                file.write(b"\0" * (offset - file.tell()))
                file.write(data)
                self.bytes += len(data)
                value.const_value = ir.ExternalTensor(
                    self.name, offset, len(data), tensor.dtype, shape=tensor.shape, name=tensor.name or value.name,
                    base_dir=self.folder,
                )


@dataclasses.dataclass
class BlockTiming:
    layers: int
    statistics_s: float
    compression_s: float
    next_inputs_s: float

    @property
    def seconds(self) -> float:
        return self.statistics_s + self.compression_s + self.next_inputs_s


def _packed_initializers(graph: ir.Graph, names: set[str]) -> list[ir.Value]:
    """The in-memory initializers of the SlimMatMul nodes named in `names`."""
    found = []
    for node in graph:
        if node.domain == DOMAIN and node.op_type == SLIM_MATMUL and node.name in names:
            found += [v for v in node.inputs[1:]
                      if v is not None and v.is_initializer() and not isinstance(v.const_value, ir.ExternalTensor)]
    return found


def stream_blocks(
    model: ir.Model,
    groups: list[list[LinearLayer]],
    feeds: list[dict[str, np.ndarray]],
    compress_block: Callable[[list[LinearLayer], dict[str, LayerStatistics]], None],
    *,
    hessian: bool,
    device: str = "cpu",
    workdir: Path,
    cache_budget: int = DEFAULT_CACHE_BUDGET,
    spill_weights: bool = False,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
    log: Callable[[str], None] = lambda msg: None,
    step: Callable[[], None] | None = None,
) -> dict:
    """Calibrate and compress `groups` (in graph order, each in the main graph) block by block, as the
    module doc says. compress_block(layers, stats) compresses them and replaces them in the graph.
    device: where the statistics are summed (torch); providers: where onnxruntime runs the blocks.
    Returns a summary for the report: per-block seconds, cache and spill bytes."""
    graph = model.graph
    group_of_node = {layer.node: g for g, group in enumerate(groups) for layer in group}
    group_of_name = {layer.name: g for g, group in enumerate(groups) for layer in group}

    def layer_segment(node: ir.Node) -> int | None:
        if node.domain == DOMAIN and node.op_type == SLIM_MATMUL:
            return group_of_name.get(node.name)
        return group_of_node.get(node)

    folder = weights_folder(model)
    cache = ActivationCache(workdir / "activations", cache_budget)
    log(f"streaming {len(groups)} blocks over {len(feeds)} calibration batches; cached activations beyond "
        f"{cache_budget / 2**20:.0f} MiB go to {cache.folder}")
    spill = WeightSpill(workdir / "weights") if spill_weights else None
    timings: list[BlockTiming] = []
    start = time.perf_counter()
    segment = assign_segments(graph, layer_segment)
    _advance_cache(model, groups, STATIC, segment, feeds, cache, folder, providers)
    static_s = time.perf_counter() - start
    for b, group in enumerate(groups):
        t0 = time.perf_counter()
        stats = collect_statistics(model, group, feeds, hessian, device=device, cut=lambda node: segment[node] < b,
                                   carried=cache.get, providers=providers)
        t1 = time.perf_counter()
        compress_block(group, stats)
        del stats
        t2 = time.perf_counter()
        segment = assign_segments(graph, layer_segment)  # block b's nodes are new
        if b + 1 < len(groups):
            _advance_cache(model, groups[b + 1:], b, segment, feeds, cache, folder, providers)
        if spill is not None:
            spill.spill(_packed_initializers(graph, {layer.name for layer in group}))
        timings.append(BlockTiming(len(group), t1 - t0, t2 - t1, time.perf_counter() - t2))
        elapsed = time.perf_counter() - start
        eta = elapsed / (b + 1) * (len(groups) - b - 1)
        t = timings[-1]
        log(f"block {b + 1}/{len(groups)}: {t.layers} layers in {t.seconds:.1f} s (statistics {t.statistics_s:.1f} s, "
            f"compression {t.compression_s:.1f} s, next inputs {t.next_inputs_s:.1f} s); "
            f"cached activations {cache.memory_bytes / 2**20:.0f} MiB in memory, {cache.disk_bytes / 2**20:.0f} MiB "
            f"on disk; eta {eta:.0f} s")
        if step is not None:
            step()
    cache.keep_only(set())
    return {
        "static_inputs_s": round(static_s, 2),
        "blocks": [dataclasses.asdict(t) | {"seconds": round(t.seconds, 2)} for t in timings],
        "activation_cache_peak_bytes": cache.peak_bytes,
        "activation_cache_budget_bytes": cache_budget,
        "spilled_weight_bytes": spill.bytes if spill else 0,
    }


def _advance_cache(model: ir.Model, later: list[list[LinearLayer]], b: int, segment: dict[ir.Node, int], feeds,
                   cache: ActivationCache, folder, providers) -> None:
    """Replace the cache by what the `later` blocks read from segments <= b, running segment b (the
    compressed block b; with b = STATIC, the nodes no layer feeds: embedding, mask, rotary tables)
    for the values it produces. Static values are computed once and kept while a later block reads
    them: recomputing them would put the embedding table in every block's sub-model."""
    graph = model.graph
    targets = [layer.node.inputs[0] for group in later for layer in group]
    _, carried = closure(graph, targets, lambda node: segment[node] <= b)
    new = [v for v in carried if segment[v.producer()] == b]
    kept = {v.name for v in carried if segment[v.producer()] < b}
    if not kept <= cache.names():
        raise AssertionError(f"segment {b + 1} reads values no earlier segment cached: {sorted(kept - cache.names())}")
    if new:
        part = Submodel(model, new, lambda node: segment[node] < b)
        cut = [v.name for v in part.cut_values]
        session = part.session(cache.get(0, cut), folder, providers)
        for i, feed in enumerate(feeds):
            try:
                outputs = session.run(feed, cache.get(i, cut))
            except Exception as error:  # onnxruntime's errors share no base class
                what = "the model's static part" if b == STATIC else f"compressed block {b + 1}"
                raise CalibrationError(f"onnxruntime could not run the calibration batch at index {i}: {error} "
                                       f"(running {what})") from None
            for name, array in outputs.items():
                cache.put(i, name, array)
    cache.keep_only(kept | {v.name for v in new})


__all__ = ["DEFAULT_CACHE_BUDGET", "ActivationCache", "BlockTiming", "WeightSpill", "stream_blocks"]
