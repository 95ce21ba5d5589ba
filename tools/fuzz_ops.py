"""Fuzzing slim_onnx's custom ops (SlimMatMul, GroupQueryAttention) under AddressSanitizer and UBSan.

A model file is untrusted input: whatever a model holds, the library must answer with an error, never
a crash or an out-of-bounds access. This harness looks for models that break that rule:

1. Build: the library with -DSLIM_ONNX_SANITIZE=ON -DSLIM_ONNX_CUDA=OFF into a cached folder
   (build/sanitize; CMake rebuilds only what changed), unless --library names one.
2. Cases: case i of seed s is drawn from its own generator, np.random.default_rng([s, i]), so that any
   case can be remade alone. It is a valid one-node model of one of the ops (random sizes, some of them
   0, and a random variant: sparse or dense, adapters, bias, swiglu, packed q/k/v, rotary caches, ...),
   then up to three mutations: of its attributes (values, types, presence), of its inputs (shapes,
   dtypes, bytes, special values, absence, extra ones, constant or fed at run time) or of its outputs.
3. Runs: tools/fuzz_worker.py processes load the sanitized library with libasan (and libstdc++, see
   preloads()) preloaded, one per kernel table (SLIM_ONNX_KERNEL unset, =avx2, =scalar). Each is fed
   by a thread of this process with the cases i whose i % 3 picks its table: the thread sends a case
   and waits for the answer (an onnxruntime error is a pass, like a run, or like an allocation too
   large for the machine). When the worker dies or hangs instead, or its stderr shows a sanitizer
   report, the thread saves a finding, the model (.onnx), its feeds (.npz) and the report (.txt)
   under --out/<kind and place>/, prints it (the first of its kind), and starts a new worker.

Exit status: 0 no finding, 1 findings, 77 the toolchain cannot build with sanitizers (the test skips).
Replay a saved case: --replay FINDING.onnx [--kernel avx2|scalar] runs it once and prints the report.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import pickle
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, helper, numpy_helper

from slim_onnx.packing import pack_quantized
from slim_onnx.schema import DOMAIN, IR_VERSION, OPSET

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "fuzz_worker.py"
TOOLCHAIN_MISSING = 77
KERNEL_TABLES = ("default", "avx2", "scalar")  # the value of SLIM_ONNX_KERNEL ("default": unset)
EXAMPLES_PER_FINDING = 3
SANITIZER_MARKERS = ("AddressSanitizer:", "runtime error:")
OVERSIZED = re.compile(r"AddressSanitizer: (allocator is out of memory|requested allocation size|out of memory)")

# Python and onnxruntime keep memory until exit by design (detect_leaks=0). A model may ask for a
# tensor of terabytes: allocations above max_allocation_size_mb fail (malloc returns null, `new`
# aborts: see outcome()), and the RSS limit stops a run that fills the machine's memory anyway.
# handle_abort gives std::terminate a stack trace.
ASAN_OPTIONS = ("detect_leaks=0:allocator_may_return_null=1:max_allocation_size_mb=1024:"
                "hard_rss_limit_mb=4096:handle_abort=1")
UBSAN_OPTIONS = "print_stacktrace=1:halt_on_error=1"

# Attribute values that break size arithmetic: signs, int32 and int64 limits, and values whose product
# with a small power of two wraps around to a small number (2^61 + 1 heads of size 8 "are" 8 wide).
EDGE_INTS = (0, -1, 1, 2, 3, 7, 8, 9, 16, 17, 64, 127, 128, 2**16, 2**16 + 1, 2**31 - 1, 2**31, -2**31,
             2**32, 2**32 + 8, 2**61 + 1, 2**62, 2**63 - 1, -2**63)
EDGE_INT32 = (-2**31, -2**31 + 1, -2, -1, 0, 1, 2, 3, 5, 16, 2**15, 2**20, 2**31 - 1)
EDGE_STRINGS = ("", "none", "float16", "int4", "swiglu", "SWIGLU", "int4\0", "x" * 4096, b"\xff\xfe")
EDGE_FLOATS = (0.0, -0.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e-45, 3.4e38)
SPECIAL_VALUES = {np.dtype(np.float32): (np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45, -0.0),
                  np.dtype(np.float16): (np.nan, np.inf, -np.inf, 65504, -65504, 6e-8, -0.0)}
HUGE_DIMS = (2**31, 2**32 + 1, 2**40, 2**59 + 1)  # only next to a 0 dim: numpy caps the byte count at 2^63
MAX_ELEMENTS = 2**16  # per tensor, so that thousands of cases run per minute
DTYPES = tuple(map(np.dtype, (np.float32, np.float16, np.float64, np.uint8, np.int8, np.int32, np.int64, np.bool_)))
# A value of another type for an attribute of each type (an empty list needs its type spelled out).
RETYPED_VALUES = (1, 4, 2**61 + 1, 0.5, 4.0, "4", "int4", [4], [4, 4], [0.5], ["int4"], [],
                  numpy_helper.from_array(np.array(4)))


@dataclass
class Case:
    """One model: a single node, its inputs' values, and how the graph presents them."""

    op: str
    inputs: list[str]  # the node's inputs in the op's order, "" where an optional one is absent
    values: dict[str, np.ndarray]  # the value of every named input
    attributes: list[AttributeProto]
    outputs: list[str]
    constant: set[str] = field(default_factory=set)  # inputs stored as initializers; the others are fed
    declared_shapes: str = "exact"  # what graph inputs declare: "exact", "symbolic" (dim_params) or "none"
    description: list[str] = field(default_factory=list)  # the valid model, then each mutation


# ---- valid models ----------------------------------------------------------------------------------

def pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def random_values(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    low = 0 if dtype.kind == "u" else -4
    return rng.integers(low, 16, shape).astype(dtype)


def random_2of4(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    """int4 values [K, N] with at most 2 nonzeros in each group of 4 consecutive k."""
    q = rng.integers(-8, 8, (k, n)).astype(np.int8)
    groups = -(-k // 4)
    noise = rng.random((groups, 4, n))
    kept = noise <= np.sort(noise, axis=1)[:, 1:2]
    return q * kept.reshape(groups * 4, n)[:k]


def slim_matmul_case(rng: np.random.Generator) -> Case:
    sparse = bool(rng.random() < 0.6)
    swiglu = bool(rng.random() < 0.25)
    k = pick(rng, (1, 3, 8, 13, 16, 24, 40, 64))
    n = pick(rng, (16, 32)) if swiglu else pick(rng, (1, 5, 8, 16, 24, 33))
    group_size = pick(rng, (8, 16, 32, 128))
    adapter_format = pick(rng, ("none", "float16", "int4"))
    rank = 0 if adapter_format == "none" else pick(rng, (1, 3, 8))
    q = random_2of4(rng, k, n) if sparse else rng.integers(-8, 8, (k, n)).astype(np.int8)
    scales = (rng.random((-(-k // group_size), n)) * 0.1 + 0.01).astype(np.float16)
    adapters = None if rank == 0 else (rng.standard_normal((k, rank)) * 0.2, rng.standard_normal((rank, n)) * 0.2)
    bias = rng.standard_normal(n).astype(np.float32) if rng.random() < 0.4 else None
    weights = pack_quantized(q, scales, group_size, sparse, adapters, adapter_format if adapters else "int4",
                             adapter_group_size=pick(rng, (8, 16, 128)), bias=bias)
    accuracy_level = pick(rng, (0, 4, 4, 1))
    a_type = pick(rng, (np.float32, np.float16))
    rows = [pick(rng, (0, 1, 1, 2, 3, 7)) for _ in range(int(rng.integers(1, 4)))]

    values = {"A": random_values(rng, (*rows, k), a_type)}
    inputs = ["A"]
    for name, array in weights.input_tensors().items():
        inputs.append(name if array is not None else "")
        if array is not None:
            values[name] = np.ascontiguousarray(array)
    while inputs[-1] == "":
        inputs.pop()
    attributes = weights.attributes(accuracy_level)
    if swiglu:
        attributes["activation"] = "swiglu"
    weight_names = set(values) - {"A"}
    constant = pick(rng, (weight_names, weight_names, weight_names, set(),
                          {name for name in weight_names if rng.random() < 0.5}))
    description = (f"SlimMatMul K={k} N={n} {'sparse' if sparse else 'dense'} group_size={group_size} "
                   f"adapters={adapter_format} rank={rank} bias={bias is not None} swiglu={swiglu} "
                   f"accuracy_level={accuracy_level} A={np.dtype(a_type).name} {list(values['A'].shape)} "
                   f"weights {'constant' if constant == weight_names else 'fed' if not constant else 'partly fed'}")
    return Case("SlimMatMul", inputs, values, [helper.make_attribute(n, v) for n, v in attributes.items()], ["Y"],
                constant, description=[description])


def attention_case(rng: np.random.Generator) -> Case:
    b, s, p = pick(rng, (0, 1, 1, 2, 3)), pick(rng, (0, 1, 1, 2, 5)), pick(rng, (0, 1, 4))
    kv = pick(rng, (1, 2))
    heads = kv * pick(rng, (1, 2, 3))
    rotary, packed = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
    d = pick(rng, (0, 1, 2, 3, 4, 8, 16))
    d += d % 2 if rotary else 0
    totals = s + rng.integers(0, p + 1, b)  # each row's past length within [0, P]
    longest = int(totals.max(initial=s))
    total_length = longest + pick(rng, (0, 0, 1))
    bias = pick(rng, ("none", "none", "full", "broadcast", "per row"))

    width = (heads + 2 * kv) * d if packed else heads * d
    values = {"query": random_values(rng, (b, s, width), np.float32)}
    if not packed:
        values["key"] = random_values(rng, (b, s, kv * d), np.float32)
        values["value"] = random_values(rng, (b, s, kv * d), np.float32)
    values["past_key"] = random_values(rng, (b, kv, p, d), np.float32)
    values["past_value"] = random_values(rng, (b, kv, p, d), np.float32)
    values["seqlens_k"] = (totals - 1).astype(np.int32)
    values["total_sequence_length"] = np.array([total_length], np.int32)
    if bias != "none":
        bias_shape = {"full": (b, heads), "broadcast": (1, 1), "per row": (b, 1)}[bias]
        values["attention_bias"] = random_values(rng, (*bias_shape, s, longest + pick(rng, (0, 1))), np.float32)
    if rotary:
        angles = rng.uniform(0, 2 * np.pi, (b * s, d // 2))
        values["cos_cache"], values["sin_cache"] = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    order = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
             "attention_bias", "cos_cache", "sin_cache")
    inputs = [name if name in values else "" for name in order]
    while inputs[-1] == "":
        inputs.pop()
    attributes = [helper.make_attribute("num_heads", heads), helper.make_attribute("kv_num_heads", kv)]
    if rng.random() < 0.7:
        attributes.append(helper.make_attribute("scale", pick(rng, (0.0, 0.125, 0.3))))
    constant = {name for name in ("past_key", "past_value", "seqlens_k", "total_sequence_length") if rng.random() < 0.1}
    description = (f"GroupQueryAttention B={b} S={s} P={p} num_heads={heads} kv_num_heads={kv} D={d} "
                   f"packed={packed} rotary={rotary} bias={bias} seqlens_k={values['seqlens_k'].tolist()} "
                   f"total_sequence_length={total_length}")
    return Case("GroupQueryAttention", inputs, values, attributes, ["output", "present_key", "present_value"],
                constant, description=[description])


# ---- mutations: each changes the case in place and says how, or returns None where it does not apply

def present_inputs(case: Case) -> list[str]:
    return list(dict.fromkeys(name for name in case.inputs if name))


def pick_input(rng, case: Case, accept=lambda value: True) -> str | None:
    names = [name for name in present_inputs(case) if accept(case.values[name])]
    return pick(rng, names) if names else None


def attributes_of_type(case: Case, attr_type: int) -> list[AttributeProto]:
    return [a for a in case.attributes if a.type == attr_type]


def edge_int(rng: np.random.Generator, current: int) -> int:
    wrapping = [current + 2**(64 - j) for j in range(2, 7)]
    near = [current - 1, current + 1, current * 2, current // 2]
    return min(max(int(pick(rng, (*EDGE_INTS, *wrapping, *near))), -2**63), 2**63 - 1)  # an int64 still


def set_int_attribute(rng, case: Case):
    candidates = attributes_of_type(case, AttributeProto.INT)
    if not candidates:
        return None
    attr = pick(rng, candidates)
    attr.i = edge_int(rng, attr.i)
    return f"attribute {attr.name} = {attr.i}"


def set_string_attribute(rng, case: Case):
    names = [a.name for a in attributes_of_type(case, AttributeProto.STRING)] or ["activation", "adapter_format"]
    name, value = pick(rng, names), pick(rng, EDGE_STRINGS)
    case.attributes = [a for a in case.attributes if a.name != name] + [helper.make_attribute(name, value)]
    return f"attribute {name} = {value[:16]!r}{'...' if len(value) > 16 else ''}"


def set_float_attribute(rng, case: Case):
    candidates = attributes_of_type(case, AttributeProto.FLOAT)
    if not candidates:
        return None
    attr = pick(rng, candidates)
    attr.f = pick(rng, EDGE_FLOATS)
    return f"attribute {attr.name} = {attr.f}"


def retype_attribute(rng, case: Case):
    if not case.attributes:
        return None
    index = int(rng.integers(len(case.attributes)))
    name = case.attributes[index].name
    value = pick(rng, RETYPED_VALUES)
    empty = isinstance(value, list) and not value
    attr = helper.make_attribute(name, value, attr_type=AttributeProto.INTS if empty else None)
    if attr.type == case.attributes[index].type:
        return None
    case.attributes[index] = attr
    return f"attribute {name} as {AttributeProto.AttributeType.Name(attr.type)} {helper.get_attribute_value(attr)!r}"


def drop_attribute(rng, case: Case):
    if not case.attributes:
        return None
    attr = case.attributes.pop(int(rng.integers(len(case.attributes))))
    return f"attribute {attr.name} removed"


def extra_attribute(rng, case: Case):
    case.attributes.append(helper.make_attribute("unknown", edge_int(rng, 1)))
    return "extra attribute 'unknown'"


def mutated_shape(rng, shape: tuple) -> tuple:
    rank = len(shape)
    how = pick(rng, ("drop dim", "add dim", "zero dim", "off by one", "reverse", "scalar", "huge and zero"))
    if how == "drop dim" and rank:
        return shape[:-1] if rng.random() < 0.5 else shape[1:]
    if how == "add dim":
        at = int(rng.integers(rank + 1))
        return (*shape[:at], pick(rng, (1, 2)), *shape[at:])
    if how == "scalar":
        return ()
    if how == "reverse":
        return shape[::-1]
    if not rank:
        return (pick(rng, (0, 2)),)
    new = list(shape)
    at = int(rng.integers(rank))
    if how == "zero dim":
        new[at] = 0
    elif how == "off by one":
        new[at] = max(0, new[at] + pick(rng, (-1, 1)))
    else:  # a huge dim, and a 0 in another so that the tensor stays empty
        new[at] = pick(rng, HUGE_DIMS)
        if rank == 1:
            new.insert(int(rng.integers(2)), 0)
        else:
            new[(at + 1) % rank] = 0
    return tuple(new)


def reshape_input(rng, case: Case):
    name = pick_input(rng, case)
    if name is None:
        return None
    old = case.values[name]
    shape = mutated_shape(rng, old.shape)
    if math.prod(shape) > MAX_ELEMENTS:  # a huge dim that lost its 0 partner
        return None
    try:
        case.values[name] = random_values(rng, shape, old.dtype)
    except ValueError:  # more than 2^63 bytes, even empty: numpy refuses the shape
        return None
    return f"input {name} shape {list(old.shape)} -> {list(shape)}"


def retype_input(rng, case: Case):
    name = pick_input(rng, case)
    if name is None:
        return None
    old = case.values[name]
    dtype = pick(rng, [t for t in DTYPES if t != old.dtype])
    try:
        case.values[name] = random_values(rng, old.shape, dtype)
    except ValueError:  # a wider type of a huge empty shape: more than 2^63 bytes for numpy
        return None
    return f"input {name} dtype {old.dtype.name} -> {dtype.name}"


def corrupt_bytes(rng, case: Case):
    name = pick_input(rng, case, lambda value: value.size > 0)
    if name is None:
        return None
    value = case.values[name].copy()
    raw = value.reshape(-1).view(np.uint8)
    how = pick(rng, ("random bytes", "all 0xff", "all 0x00"))
    if how == "random bytes":
        hit = rng.random(raw.size) < pick(rng, (0.1, 1.0))
        raw[hit] = rng.integers(0, 256, int(hit.sum()))
    else:
        raw[:] = 0xFF if how == "all 0xff" else 0
    case.values[name] = value
    return f"input {name} {how}"


def special_floats(rng, case: Case):
    name = pick_input(rng, case, lambda value: value.dtype in SPECIAL_VALUES and value.size > 0)
    if name is None:
        return None
    value = case.values[name].copy()
    special = pick(rng, SPECIAL_VALUES[value.dtype])
    hit = rng.random(value.shape) < pick(rng, (0.2, 1.0))
    value[hit] = special
    case.values[name] = value
    return f"input {name} has {special} at {int(hit.sum())} of {value.size}"


def edge_integers(rng, case: Case):
    name = pick_input(rng, case, lambda value: value.dtype.kind == "i" and value.size > 0)
    if name is None:
        return None
    value = case.values[name].astype(np.int64)
    at = int(rng.integers(value.size))
    current = int(value.flat[at])
    info = np.iinfo(case.values[name].dtype)
    new = pick(rng, (*EDGE_INT32, current - 1, current + 1, current - 2))
    value.flat[at] = min(max(new, info.min), info.max)
    case.values[name] = value.astype(case.values[name].dtype)
    return f"input {name}[{at}] {current} -> {int(value.flat[at])}"


def drop_input(rng, case: Case):
    slots = [i for i, name in enumerate(case.inputs) if name]
    if not slots:
        return None
    slot = pick(rng, slots)
    name = case.inputs[slot]
    case.inputs[slot] = ""
    return f"input {slot} ({name}) absent"


def extra_input(rng, case: Case):
    name = f"extra{len(case.inputs)}"
    case.inputs.append(name)
    case.values[name] = random_values(rng, (2, 3), np.float32)
    return f"extra input {len(case.inputs) - 1}"


def swap_inputs(rng, case: Case):
    names = present_inputs(case)
    if len(names) < 2:
        return None
    first, second = rng.choice(len(names), 2, replace=False)
    first, second = names[first], names[second]
    case.values[first], case.values[second] = case.values[second], case.values[first]
    return f"inputs {first} and {second} swapped"


def toggle_constant(rng, case: Case):
    name = pick_input(rng, case)
    if name is None:
        return None
    case.constant ^= {name}
    return f"input {name} {'constant' if name in case.constant else 'fed at run time'}"


def change_outputs(rng, case: Case):
    how = pick(rng, ("drop last", "empty name", "extra"))
    if how == "extra":
        case.outputs.append("extra_output")
    elif how == "drop last" and len(case.outputs) > 1:
        case.outputs.pop()
    else:
        case.outputs[int(rng.integers(len(case.outputs)))] = ""
    return f"outputs {case.outputs}"


MUTATIONS = (set_int_attribute, set_int_attribute, set_string_attribute, set_float_attribute, retype_attribute,
             drop_attribute, extra_attribute, reshape_input, reshape_input, retype_input, corrupt_bytes,
             corrupt_bytes, special_floats, special_floats, edge_integers, edge_integers, drop_input, extra_input,
             swap_inputs, toggle_constant, change_outputs)


def make_case(seed: int, case_id: int) -> Case:
    rng = np.random.default_rng([seed, case_id])
    case = slim_matmul_case(rng) if rng.random() < 0.5 else attention_case(rng)
    case.declared_shapes = pick(rng, ("exact", "symbolic", "none"))
    for _ in range(pick(rng, (0, 1, 1, 1, 2, 2, 3))):
        change = None
        while change is None:
            change = pick(rng, MUTATIONS)(rng, case)
        case.description.append(change)
    return case


# ---- the model and its feeds -----------------------------------------------------------------------

def graph_input(name: str, value: np.ndarray, declared_shapes: str) -> onnx.ValueInfoProto:
    shape = {"exact": list(value.shape), "none": None,
             "symbolic": [f"{name}_{i}" for i in range(value.ndim)]}[declared_shapes]
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), shape)


def model_and_feeds(case: Case) -> tuple[bytes, dict[str, np.ndarray]]:
    node = helper.make_node(case.op, case.inputs, case.outputs, name="fuzzed", domain=DOMAIN)
    node.attribute.extend(case.attributes)
    names = present_inputs(case)
    fed = [n for n in names if n not in case.constant]
    graph = helper.make_graph(
        [node], "fuzz", [graph_input(n, case.values[n], case.declared_shapes) for n in fed],
        [helper.make_empty_tensor_value_info(n) for n in case.outputs if n],  # types and shapes: inferred
        [numpy_helper.from_array(case.values[n], n) for n in names if n in case.constant])
    model = helper.make_model(graph, ir_version=IR_VERSION,
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)])
    return model.SerializeToString(), {n: case.values[n] for n in fed}


# ---- the sanitized library -------------------------------------------------------------------------

class ToolchainMissing(RuntimeError):
    """This machine cannot build the library with sanitizers."""


def check_toolchain() -> None:
    if shutil.which("cmake") is None:
        raise ToolchainMissing("cmake is not on PATH")
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as scratch:
        probe = subprocess.run([compiler, "-fsanitize=address,undefined", "-x", "c++", "-", "-o", f"{scratch}/probe"],
                               input="int main() { return 0; }\n", capture_output=True, text=True)
    if probe.returncode != 0:
        raise ToolchainMissing(f"{compiler} cannot link with -fsanitize=address,undefined: "
                               f"{probe.stderr.strip()[-500:]}")


def build_library(build_dir: Path) -> Path:
    """The sanitized library in build_dir, configured once and brought up to date by CMake."""
    check_toolchain()
    steps = [["cmake", "--build", str(build_dir), "--parallel"]]
    if not (build_dir / "CMakeCache.txt").exists():
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        steps.insert(0, ["cmake", "-S", str(ROOT), "-B", str(build_dir), *generator, "-DSLIM_ONNX_SANITIZE=ON",
                         "-DSLIM_ONNX_CUDA=OFF", "-DCMAKE_BUILD_TYPE=Release"])
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"building the sanitized library failed: {' '.join(step)}\n"
                             f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return build_dir / "libslim_onnx_ops.so"


def preloads(library: Path) -> str | None:
    """What LD_PRELOAD needs for the unsanitized python to load the library: the libasan it links to,
    first of all libraries as AddressSanitizer demands, and libstdc++ with it (preloaded alone, libasan
    finds no __cxa_throw to wrap, and the first C++ exception, a model rejected, aborts). None for a
    library built without AddressSanitizer: then only crashes show."""
    linked = dict(re.findall(r"^\s*(\S+) => (\S+)", subprocess.run(["ldd", str(library)], capture_output=True,
                                                                   text=True).stdout, re.M))
    asan = next((path for name, path in linked.items() if name.startswith("libasan.so")), None)
    if asan is None:
        return None
    return " ".join([asan, *(path for name, path in linked.items() if name.startswith("libstdc++.so"))])


# ---- workers -------------------------------------------------------------------------------------

class WorkerLost(Exception):
    """The worker died or hung on the case it was sent."""


class Worker:
    """A tools/fuzz_worker.py process on one kernel table; its stderr goes to a log file."""

    def __init__(self, library: Path, preload: str | None, table: str, log: Path, timeout: float):
        self.command = [sys.executable, str(WORKER), str(library)]
        self.env = dict(os.environ, ASAN_OPTIONS=ASAN_OPTIONS, UBSAN_OPTIONS=UBSAN_OPTIONS)
        self.env.pop("SLIM_ONNX_KERNEL", None)
        if table != "default":
            self.env["SLIM_ONNX_KERNEL"] = table
        if preload:
            self.env["LD_PRELOAD"] = preload
        self.table, self.log, self.timeout = table, log, timeout
        self.process = None
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as stderr:
            self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                            env=self.env)
        try:
            ready = self.answer(timeout=120)
        except WorkerLost as lost:
            ready = str(lost)
        if ready != "ready":
            log = self.log.read_text(errors="replace")
            raise RuntimeError(f"the fuzz worker did not start ({ready}):\n{log[-3000:]}")

    def answer(self, timeout: float) -> str:
        if not select.select([self.process.stdout], [], [], timeout)[0]:
            self.process.send_signal(signal.SIGABRT)  # AddressSanitizer (handle_abort) prints where it was
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            raise WorkerLost(f"hang: no answer within {timeout:g} s")
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise WorkerLost(f"killed by signal {-code}" if code < 0 else f"exit code {code}")
        return line.decode(errors="replace").strip()

    def run(self, model: bytes, feeds: dict) -> str:
        try:
            self.process.stdin.write(pickle.dumps((model, feeds), protocol=pickle.HIGHEST_PROTOCOL))
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # it died on the way: answer() says how
        return self.answer(self.timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        """EOF on its stdin ends a live worker; of a dead one, only the pipes are left to close."""
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()
        self.process.wait()
        self.process.stdout.close()


# ---- findings ------------------------------------------------------------------------------------

def kind_and_place(report: str, lost: str | None) -> tuple[str, str]:
    """What went wrong ("heap-buffer-overflow", "runtime error: signed integer overflow", a hang, ...)
    and where: the first stack frame in the library's sources ("file:line function"), else UBSan's
    location, else the innermost frame of a crash ("" for a hang: wherever the abort caught it)."""
    asan = re.search(r"AddressSanitizer: ([A-Za-z -]+?)(?= on | \(|:|\s*0x|$)", report, re.M)
    ubsan = re.search(r"([\w./-]+:\d+):\d+: runtime error: ([^:\n]+)", report)
    hang = lost is not None and lost.startswith("hang")
    if hang:
        kind = lost
    elif asan:
        kind = asan.group(1).strip()
    elif ubsan:
        kind = "runtime error: " + re.sub(r"-?\d+", "N", ubsan.group(2)).strip()
    else:
        kind = lost or "report without a crash"
    ours = re.search(r"#\d+ 0x[0-9a-f]+ in (.+?) \S*?slim_onnx/csrc/([\w./]+:\d+)", report)
    if ours:
        function = re.sub(r"(?<!operator)\(.*", "", ours.group(1)).split("::")[-1]
        return kind, f"{ours.group(2)} {function}"
    if ubsan:
        return kind, ubsan.group(1).split("slim_onnx/csrc/")[-1]
    first = re.search(r"#0 0x[0-9a-f]+ in (\S+)", report)
    return kind, first.group(1) if first and not hang else ""


def first_report_lines(report: str) -> str:
    """The sanitizer's headline and the first frame in the library's sources."""
    lines = report.splitlines()
    head = next((l for l in lines if any(m in l for m in SANITIZER_MARKERS)), "")
    frame = next((l.strip() for l in lines if "slim_onnx/csrc/" in l and l.strip().startswith("#")), "")
    return f"{head.strip()} | {frame}" if frame else head.strip()


class Findings:
    """Failures grouped by kind and place; the first few cases of each are saved, the first printed."""

    def __init__(self, out: Path):
        self.out = out
        self.cases: dict[str, list[int]] = {}
        self.lock = threading.Lock()

    def add(self, case_id: int, table: str, case: Case, model: bytes, feeds: dict, report: str, lost: str | None):
        kind, place = kind_and_place(report, lost)
        signature = f"{kind} at {place}" if place else kind
        with self.lock:
            seen = self.cases.setdefault(signature, [])
            seen.append(case_id)
            if len(seen) > EXAMPLES_PER_FINDING:
                return
            folder = self.out / re.sub(r"[^\w.-]+", "_", signature)[:100]
            folder.mkdir(parents=True, exist_ok=True)
            stem = folder / f"case-{case_id}"
            stem.with_suffix(".onnx").write_bytes(model)
            np.savez(stem.with_suffix(".npz"), **feeds)
            replay = f"python tools/fuzz_ops.py --replay {stem.with_suffix('.onnx')} --kernel {table}"
            stem.with_suffix(".txt").write_text(
                f"{signature}\ncase {case_id}, kernel table {table}, {lost or 'answered'}\n"
                + "".join(f"  {line}\n" for line in case.description) + f"replay: {replay}\n\n{report}")
            if len(seen) == 1:
                print(f"FINDING {signature}: case {case_id} [{table}] {'; '.join(case.description)} -> {stem}.onnx\n"
                      f"    {first_report_lines(report)}", flush=True)

    def summary(self) -> str:
        return "".join(f"  {len(ids):5d} x {signature} (first: case {ids[0]})\n"
                       for signature, ids in self.cases.items())


# ---- the run -------------------------------------------------------------------------------------

def outcome(answer: str | None, report: str) -> str:
    """"ran", "rejected at creation", "rejected at run", "oversized allocation" or "finding"."""
    if answer is not None and not any(marker in report for marker in SANITIZER_MARKERS):
        return answer.split(":")[0]
    # AddressSanitizer's operator new aborts where the plain one throws std::bad_alloc, which
    # onnxruntime turns into an error: a pass, unless the library itself asked for that much (then
    # the first frames after `new` are in its sources), sized by the model without a bound.
    oversized = OVERSIZED.search(report)
    if oversized and "slim_onnx/csrc/" not in "\n".join(report[oversized.end():].splitlines()[1:6]):
        return "oversized allocation"
    return "finding"


def run_lane(worker: Worker, first_case: int, args, deadline: float, findings: Findings, stats: Counter,
             lock: threading.Lock) -> None:
    """Cases first_case, first_case + 3, ... on the worker's kernel table, until the deadline or --cases."""
    for case_id in itertools.count(first_case, len(KERNEL_TABLES)):
        if time.monotonic() > deadline or (args.cases is not None and case_id >= args.cases):
            break
        case = make_case(args.seed, case_id)
        model, feeds = model_and_feeds(case)
        offset = worker.log.stat().st_size
        answer = lost = None
        try:
            answer = worker.run(model, feeds)
        except WorkerLost as error:
            lost = str(error)
        with open(worker.log, "rb") as log:
            log.seek(offset)
            report = log.read().decode(errors="replace")
        result = outcome(answer, report)
        if result == "finding":
            findings.add(case_id, worker.table, case, model, feeds, report, lost)
        if lost:
            worker.restart()
        with lock:
            stats[result] += 1
    worker.stop()


def fuzz(args, library: Path, preload: str | None) -> int:
    findings = Findings(args.out)
    stats, lock = Counter(), threading.Lock()
    with tempfile.TemporaryDirectory() as logs, ThreadPoolExecutor(len(KERNEL_TABLES)) as lanes:
        workers = [Worker(library, preload, table, Path(logs) / f"{table}.log", args.case_timeout)
                   for table in KERNEL_TABLES]
        start = time.monotonic()
        running = [lanes.submit(run_lane, worker, i, args, start + args.seconds, findings, stats, lock)
                   for i, worker in enumerate(workers)]
        for lane in running:
            lane.result()
    elapsed = time.monotonic() - start
    total = sum(stats.values())
    print(f"{total} cases in {elapsed:.0f} s ({total / elapsed * 60:.0f} per minute): "
          + ", ".join(f"{count} {result}" for result, count in sorted(stats.items())))
    if findings.cases:
        print(f"{len(findings.cases)} distinct findings, saved under {args.out}:\n{findings.summary()}", end="")
        return 1
    return 0


def replay(args, library: Path, preload: str | None) -> int:
    model = Path(args.replay).read_bytes()
    feeds = dict(np.load(Path(args.replay).with_suffix(".npz")))
    with tempfile.TemporaryDirectory() as logs:
        worker = Worker(library, preload, args.kernel, Path(logs) / "replay.log", args.case_timeout)
        lost = None
        try:
            answer = worker.run(model, feeds)
        except WorkerLost as error:
            answer = lost = str(error)
        worker.stop()
        report = worker.log.read_text(errors="replace")
    print(f"{answer}\n{report}", end="")
    return 1 if outcome(None if lost else answer, report) == "finding" else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=60, help="fuzzing time, after the build (default 60)")
    parser.add_argument("--cases", type=int, help="stop after cases 0 .. CASES-1 or --seconds, whichever comes first")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "fuzz-findings", help="findings folder")
    parser.add_argument("--library", type=Path, help="fuzz this library instead of building the sanitized one")
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build" / "sanitize")
    parser.add_argument("--case-timeout", type=float, default=30, help="seconds before a silent worker is a hang")
    parser.add_argument("--replay", help="run one saved FINDING.onnx (with its .npz) and print the outcome")
    parser.add_argument("--kernel", choices=KERNEL_TABLES, default="default", help="kernel table of --replay")
    args = parser.parse_args()

    library = args.library
    if library is None:
        began = time.monotonic()
        try:
            library = build_library(args.build_dir)
        except ToolchainMissing as missing:
            print(f"cannot build with sanitizers: {missing}")
            return TOOLCHAIN_MISSING
        print(f"sanitized library {library} up to date in {time.monotonic() - began:.0f} s", flush=True)
    preload = preloads(library)
    if preload is None:
        print(f"{library} is not linked to libasan: only crashes will show, no out-of-bounds access", flush=True)
    return replay(args, library, preload) if args.replay else fuzz(args, library, preload)


if __name__ == "__main__":
    sys.exit(main())
