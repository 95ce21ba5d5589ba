"""A Llama-style decoder ONNX model with real layer shapes and random weights, for scale benchmarks.

How much memory and time compression takes, and how fast the result runs, depends on the shapes of
the layers and on how many there are, not on what the weights hold; so measuring it on Llama-3-8B
does not need Llama-3-8B, only a model whose blocks have its shapes. This builds such a model
directly with onnx-ir: the graph of an Optimum decoder export without KV cache (inputs `input_ids`,
`attention_mask`, `position_ids`, output `logits`; nodes named as Optimum names them, e.g.
`/model/layers.3/self_attn/q_proj/MatMul`, so the tools find the blocks by name), made of standard
opset-18 ops only, with random normal weights scaled so that the activations stay in a sane range
through any depth.

`--with-past` writes Optimum's `text-generation-with-past` decoder instead, for generation
benchmarks: inputs `past_key_values.{i}.key` / `.value` [batch, kv_heads, past_len, head_dim] beside
the three above (attention_mask then covers past and new tokens), outputs `present.{i}.key` /
`.value` = the past with the new tokens' keys and values appended, and causal attention over both.
`--dtype float16` stores the weights and computes in float16 end to end (rotary angles excepted:
positions in float16 would lose their units), as a GPU deployment runs it.

The weights never sit in memory together (8 blocks of Llama-3-8B are 11 GB of float32): each tensor
is generated a chunk at a time and written straight into one external data file `model.onnx_data`,
and the graph's initializers are `ir.ExternalTensor`s pointing at their offsets there. Saving then
writes the graph alone.

    python tools/scale_model.py /tmp/scale8b2 --preset 8b --blocks 2
    python tools/scale_model.py /tmp/smollm2 --preset smollm2 --with-past --dtype float16
    python tools/scale_model.py /tmp/tiny --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 \\
        --blocks 2 --vocab 97
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

LLAMA_3_2_1B = {"hidden": 2048, "intermediate": 8192, "heads": 32, "kv_heads": 8, "blocks": 16, "vocab": 128256}
LLAMA_3_8B = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "blocks": 32, "vocab": 128256}
SMOLLM2_135M = {"hidden": 576, "intermediate": 1536, "heads": 9, "kv_heads": 3, "blocks": 30, "vocab": 49152}
PRESETS = {"1b": LLAMA_3_2_1B, "8b": LLAMA_3_8B, "smollm2": SMOLLM2_135M}
DTYPES = {"float32": (np.float32, ir.DataType.FLOAT), "float16": (np.float16, ir.DataType.FLOAT16)}

DATA_FILE = "model.onnx_data"
ALIGNMENT = 4096  # tensor offsets in the data file: page-aligned, so each can be memory-mapped
CHUNK_BYTES = 64 << 20  # the most weight data held in memory at once
OPSET = 18
IR_VERSION = 10


class _WeightFile:
    """The external data file, filled one tensor at a time, one chunk of a tensor at a time."""

    def __init__(self, folder: Path, seed: int, dtype: str):
        self.folder = folder
        self.seed = seed
        self.dtype, self.ir_dtype = DTYPES[dtype]
        self.count = 0  # tensors written: each has its own random stream, [seed, index]
        self.file = open(folder / DATA_FILE, "wb")  # noqa: SIM115 - closed by write_llama
        self.buffer = np.empty(CHUNK_BYTES // 4, np.float32)

    def add(self, name: str, shape: tuple[int, ...], std: float | None) -> ir.ExternalTensor:
        """A tensor of N(0, std^2) values, or ones when std is None; drawn in float32 and stored in
        the model's dtype, so a float16 model holds the float32 model's weights rounded."""
        offset = -(-self.file.tell() // ALIGNMENT) * ALIGNMENT
        self.file.write(bytes(offset - self.file.tell()))
        rng = np.random.default_rng([self.seed, self.count])
        self.count += 1
        total = math.prod(shape)
        for start in range(0, total, self.buffer.size):
            chunk = self.buffer[: min(self.buffer.size, total - start)]
            if std is None:
                chunk.fill(1.0)
            else:
                rng.standard_normal(out=chunk, dtype=np.float32)
                chunk *= np.float32(std)
            self.file.write(chunk.astype(self.dtype, copy=False))
        size = total * np.dtype(self.dtype).itemsize
        return ir.ExternalTensor(DATA_FILE, offset, size, self.ir_dtype, shape=ir.Shape(shape), name=name,
                                 base_dir=self.folder)


class _Builder:
    """Nodes and initializers of the graph; each node's single output is named `{node}_output_0`
    as in exports."""

    def __init__(self, weights: _WeightFile):
        self.weights = weights
        self.nodes: list[ir.Node] = []
        self.initializers: dict[str, ir.Value] = {}
        self.constants: dict[tuple, ir.Value] = {}
        self.float = weights.dtype  # the activations' dtype
        self.pasts: list[ir.Value] = []  # the cache's graph inputs and outputs (cache())
        self.presents: list[ir.Value] = []

    def op(self, name: str, op_type: str, *inputs: ir.Value, **attributes) -> ir.Value:
        node = ir.Node("", op_type, inputs, ir.convenience.convert_attributes(attributes), name=name)
        node.outputs[0].name = f"{name}_output_0"
        self.nodes.append(node)
        return node.outputs[0]

    def _initializer(self, tensor: ir.TensorProtocol) -> ir.Value:
        value = ir.Value(name=tensor.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        self.initializers[tensor.name] = value
        return value

    def const(self, array, dtype=np.int64) -> ir.Value:
        """A small constant, inline in the graph, one initializer per distinct value."""
        array = np.asarray(array, dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.constants:
            self.constants[key] = self._initializer(ir.tensor(array, name=f"/model/Constant_{len(self.constants)}"))
        return self.constants[key]

    def fconst(self, value: float) -> ir.Value:
        """A scalar in the activations' dtype."""
        return self.const(value, self.float)

    def to_float(self, name: str, x: ir.Value) -> ir.Value:
        """float32 x in the activations' dtype (no node when that is float32)."""
        return x if self.float == np.float32 else self.op(name, "Cast", x, to=self.weights.ir_dtype)

    def weight(self, name: str, shape: tuple[int, ...], std: float | None = None) -> ir.Value:
        return self._initializer(self.weights.add(name, shape, std))

    # -- layers ------------------------------------------------------------------------------------

    def rms_norm(self, prefix: str, x: ir.Value, weight: str, hidden: int, eps: float) -> ir.Value:
        """x / sqrt(mean(x^2) + eps) * gamma, spelled as Optimum exports it (and as our RMSNorm
        fusion matches it)."""
        square = self.op(f"{prefix}/Pow", "Pow", x, self.fconst(2.0))
        mean = self.op(f"{prefix}/ReduceMean", "ReduceMean", square, self.const([-1]), keepdims=1)
        root = self.op(f"{prefix}/Sqrt", "Sqrt", self.op(f"{prefix}/Add", "Add", mean, self.fconst(eps)))
        inverse = self.op(f"{prefix}/Div", "Div", self.fconst(1.0), root)
        normed = self.op(f"{prefix}/Mul", "Mul", x, inverse)
        return self.op(f"{prefix}/Mul_1", "Mul", normed, self.weight(weight, (hidden,)))

    def linear(self, prefix: str, x: ir.Value, k: int, n: int, std_scale: float = 1.0) -> ir.Value:
        """x @ W, W [K, N] with std 1/sqrt(K) (times std_scale): unit-variance inputs give
        unit-variance outputs."""
        weight = self.weight(f"{prefix.strip('/').replace('/', '.')}.weight", (k, n), std_scale / math.sqrt(k))
        return self.op(f"{prefix}/MatMul", "MatMul", x, weight)

    def rotary(self, prefix: str, x: ir.Value, cos: ir.Value, sin: ir.Value, half: int) -> ir.Value:
        """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] for x = [x1, x2] on the last axis."""
        x1 = self.op(f"{prefix}/Slice", "Slice", x, self.const([0]), self.const([half]), self.const([-1]))
        x2 = self.op(f"{prefix}/Slice_1", "Slice", x, self.const([half]), self.const([2**62]), self.const([-1]))
        rotated = self.op(f"{prefix}/Concat", "Concat", self.op(f"{prefix}/Neg", "Neg", x2), x1, axis=-1)
        return self.op(f"{prefix}/Add", "Add", self.op(f"{prefix}/Mul", "Mul", x, cos),
                       self.op(f"{prefix}/Mul_1", "Mul", rotated, sin))

    def heads_first(self, prefix: str, x: ir.Value, count: int, head_dim: int) -> ir.Value:
        """[B, S, count * D] -> [B, count, S, D]."""
        split = self.op(f"{prefix}/Reshape", "Reshape", x, self.const([0, 0, count, head_dim]))
        return self.op(f"{prefix}/Transpose", "Transpose", split, perm=[0, 2, 1, 3])

    def cache(self, prefix: str, block: int, kind: str, new: ir.Value, kv_heads: int, head_dim: int) -> ir.Value:
        """present.{block}.{kind} = Concat(past_key_values.{block}.{kind}, new) on the sequence axis,
        [B, Hkv, past + S, D]: the graph input and output Optimum's with-past export has."""
        past = _graph_input(f"past_key_values.{block}.{kind}", self.weights.ir_dtype,
                            ["batch_size", kv_heads, "past_sequence_length", head_dim])
        present = self.op(f"{prefix}/Concat", "Concat", past, new, axis=2)
        present.name = f"present.{block}.{kind}"
        present.type = ir.TensorType(self.weights.ir_dtype)
        present.shape = ir.Shape(["batch_size", kv_heads, "total_sequence_length", head_dim])
        self.pasts.append(past)
        self.presents.append(present)
        return present

    def repeat_kv(self, prefix: str, x: ir.Value, group: int, heads: int, head_dim: int) -> ir.Value:
        """[B, Hkv, S, D] -> [B, Hkv * group, S, D], each key/value head repeated for its group of
        query heads: heads = Hkv * group (Unsqueeze -> Expand -> Reshape, as exports spell it)."""
        if group == 1:
            return x
        grouped = self.op(f"{prefix}/Unsqueeze", "Unsqueeze", x, self.const([2]))
        expanded = self.op(f"{prefix}/Expand", "Expand", grouped, self.const([1, 1, group, 1, 1]))
        return self.op(f"{prefix}/Reshape_repeat", "Reshape", expanded, self.const([0, heads, -1, head_dim]))


def _graph_input(name: str, dtype: ir.DataType, dims: list) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(dims), type=ir.TensorType(dtype))


def write_llama(folder, *, hidden: int, intermediate: int, heads: int, kv_heads: int, blocks: int, vocab: int,
                seed: int = 0, rope_theta: float = 500000.0, eps: float = 1e-5, with_past: bool = False,
                dtype: str = "float32") -> Path:
    """Write folder/model.onnx (+ model.onnx_data, config.json): a Llama decoder of these shapes
    with random weights, with a KV cache if with_past, in dtype "float32" or "float16" (see the
    module doc); returns the model's path."""
    if hidden % heads or heads % kv_heads or (hidden // heads) % 2:
        raise ValueError(f"hidden {hidden} must split into {heads} heads of even size, heads into {kv_heads} groups")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    head_dim, group = hidden // heads, heads // kv_heads
    residual_scale = 1 / math.sqrt(2 * blocks)  # each block adds two branches to the residual stream

    batch_seq = ["batch_size", "sequence_length"]
    batch_total = ["batch_size", "total_sequence_length"] if with_past else batch_seq  # past + new tokens
    input_ids = _graph_input("input_ids", ir.DataType.INT64, batch_seq)
    attention_mask = _graph_input("attention_mask", ir.DataType.INT64, batch_total)
    position_ids = _graph_input("position_ids", ir.DataType.INT64, batch_seq)

    weights = _WeightFile(folder, seed, dtype)
    try:
        g = _Builder(weights)
        c = g.const
        h = g.op("/model/embed_tokens/Gather", "Gather", g.weight("model.embed_tokens.weight", (vocab, hidden), 1.0),
                 input_ids, axis=0)

        # Rotary tables, once for all blocks: angle[b, s, j] = position[b, s] * theta^(-2j / head_dim),
        # j < head_dim / 2, repeated for the two halves; [B, 1, S, D] to broadcast over the heads.
        # Angles in float32 (position 600 is 0.5 apart from its neighbours in float16), cos and sin
        # in the activations' dtype.
        p = "/model/rotary_emb"
        inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2) / head_dim)
        positions = g.op(f"{p}/Unsqueeze", "Unsqueeze", g.op(f"{p}/Cast", "Cast", position_ids, to=ir.DataType.FLOAT),
                         c([-1]))
        freqs = g.op(f"{p}/Mul", "Mul", positions, c(inv_freq, np.float32))
        angles = g.op(f"{p}/Unsqueeze_1", "Unsqueeze", g.op(f"{p}/Concat", "Concat", freqs, freqs, axis=-1), c([1]))
        cos = g.to_float(f"{p}/Cast_1", g.op(f"{p}/Cos", "Cos", angles))
        sin = g.to_float(f"{p}/Cast_2", g.op(f"{p}/Sin", "Sin", angles))

        # Attention bias, once for all blocks: query s (at position past + s) sees key t when
        # t <= past + s and attention_mask[b, t] is 1, with past = T - S (T keys, S queries; 0 without
        # a cache). Masked scores get the dtype's lowest value rather than -inf, so that a row with
        # every key masked (a left-padding query) gives a uniform softmax instead of NaN, as in transformers.
        p = "/model/mask"
        total = g.op(f"{p}/Gather", "Gather", g.op(f"{p}/Shape", "Shape", attention_mask), c(1), axis=0)
        length = g.op(f"{p}/Gather_1", "Gather", g.op(f"{p}/Shape_1", "Shape", input_ids), c(1), axis=0)
        keys = g.op(f"{p}/Range", "Range", c(0), total, c(1))
        queries = g.op(f"{p}/Range_1", "Range", g.op(f"{p}/Sub", "Sub", total, length), total, c(1))
        causal = g.op(f"{p}/LessOrEqual", "LessOrEqual", g.op(f"{p}/Unsqueeze", "Unsqueeze", keys, c([0])),
                      g.op(f"{p}/Unsqueeze_1", "Unsqueeze", queries, c([1])))  # [S, T]
        padding = g.op(f"{p}/Unsqueeze_2", "Unsqueeze", g.op(f"{p}/Cast", "Cast", attention_mask, to=ir.DataType.BOOL),
                       c([1, 2]))  # [B, 1, 1, T]
        bias = g.op(f"{p}/Where", "Where", g.op(f"{p}/And", "And", causal, padding), g.fconst(0.0),
                    g.fconst(np.finfo(g.float).min))  # [B, 1, S, T]

        for i in range(blocks):
            p = f"/model/layers.{i}"
            x = g.rms_norm(f"{p}/input_layernorm", h, f"model.layers.{i}.input_layernorm.weight", hidden, eps)
            a = f"{p}/self_attn"
            q = g.heads_first(f"{a}/q", g.linear(f"{a}/q_proj", x, hidden, heads * head_dim), heads, head_dim)
            k = g.heads_first(f"{a}/k", g.linear(f"{a}/k_proj", x, hidden, kv_heads * head_dim), kv_heads, head_dim)
            v = g.heads_first(f"{a}/v", g.linear(f"{a}/v_proj", x, hidden, kv_heads * head_dim), kv_heads, head_dim)
            q = g.rotary(f"{a}/rotary_q", q, cos, sin, head_dim // 2)
            k = g.rotary(f"{a}/rotary_k", k, cos, sin, head_dim // 2)
            if with_past:
                k = g.cache(f"{a}/key", i, "key", k, kv_heads, head_dim)
                v = g.cache(f"{a}/value", i, "value", v, kv_heads, head_dim)
            k = g.repeat_kv(f"{a}/k", k, group, heads, head_dim)
            v = g.repeat_kv(f"{a}/v", v, group, heads, head_dim)
            scores = g.op(f"{a}/MatMul", "MatMul", q, g.op(f"{a}/Transpose_kt", "Transpose", k, perm=[0, 1, 3, 2]))
            scores = g.op(f"{a}/Add", "Add", g.op(f"{a}/Mul", "Mul", scores, g.fconst(1 / math.sqrt(head_dim))), bias)
            context = g.op(f"{a}/MatMul_1", "MatMul", g.op(f"{a}/Softmax", "Softmax", scores, axis=-1), v)
            context = g.op(f"{a}/Transpose", "Transpose", context, perm=[0, 2, 1, 3])
            context = g.op(f"{a}/Reshape", "Reshape", context, c([0, 0, heads * head_dim]))
            attended = g.linear(f"{a}/o_proj", context, heads * head_dim, hidden, residual_scale)
            h = g.op(f"{p}/Add", "Add", h, attended)

            x = g.rms_norm(f"{p}/post_attention_layernorm", h, f"model.layers.{i}.post_attention_layernorm.weight",
                           hidden, eps)
            m = f"{p}/mlp"
            gate = g.linear(f"{m}/gate_proj", x, hidden, intermediate)
            up = g.linear(f"{m}/up_proj", x, hidden, intermediate)
            silu = g.op(f"{m}/act_fn/Mul", "Mul", gate, g.op(f"{m}/act_fn/Sigmoid", "Sigmoid", gate))
            down = g.linear(f"{m}/down_proj", g.op(f"{m}/Mul", "Mul", silu, up), intermediate, hidden, residual_scale)
            h = g.op(f"{p}/Add_1", "Add", h, down)

        h = g.rms_norm("/model/norm", h, "model.norm.weight", hidden, eps)
        logits = g.linear("/lm_head", h, hidden, vocab)
    finally:
        weights.file.close()

    # The graph's output keeps the name `logits`: rename the last MatMul's output.
    logits.name = "logits"
    logits.type = ir.TensorType(weights.ir_dtype)
    logits.shape = ir.Shape([*batch_seq, vocab])
    graph = ir.Graph([input_ids, attention_mask, position_ids, *g.pasts], [logits, *g.presents], nodes=g.nodes, initializers=list(g.initializers.values()),
                     opset_imports={"": OPSET}, name="main_graph")
    model = ir.Model(graph, ir_version=IR_VERSION, producer_name="slim_onnx tools/scale_model.py")
    path = folder / "model.onnx"
    # Without `external_data`, ir.save serializes each ExternalTensor as its location, offset and
    # length: the data file is neither read nor rewritten.
    ir.save(model, path)

    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
              "intermediate_size": intermediate, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "num_hidden_layers": blocks, "vocab_size": vocab, "head_dim": head_dim, "rope_theta": rope_theta,
              "rms_norm_eps": eps, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": dtype,
              "use_cache": with_past, "note": f"random weights (tools/scale_model.py), seed {seed}"}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def random_calibration_npz(path, *, vocab: int, windows: int = 16, seqlen: int = 512, seed: int = 0) -> Path:
    """An .npz of `windows` feeds of one sequence of `seqlen` random tokens, unpadded: arrays
    input_ids, attention_mask, position_ids of shape [windows, 1, seqlen], int64 (the leading
    axis indexes the feeds)."""
    rng = np.random.default_rng(seed)
    shape = (windows, 1, seqlen)
    path = Path(path)
    np.savez(path, input_ids=rng.integers(0, vocab, size=shape, dtype=np.int64),
             attention_mask=np.ones(shape, np.int64),
             position_ids=np.broadcast_to(np.arange(seqlen, dtype=np.int64), shape).copy())
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for model.onnx, model.onnx_data and config.json")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="Llama-3.2-1B, Llama-3-8B or SmolLM2-135M shapes")
    for name in ("hidden", "intermediate", "heads", "kv-heads", "blocks", "vocab"):
        parser.add_argument(f"--{name}", type=int, help="overrides the preset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rope-theta", type=float, default=500000.0)
    parser.add_argument("--eps", type=float, default=1e-5)
    parser.add_argument("--with-past", action="store_true", help="with a KV cache (text-generation-with-past)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights and activations")
    args = parser.parse_args(argv)

    shapes = dict(PRESETS.get(args.preset, {}))
    for key in ("hidden", "intermediate", "heads", "kv_heads", "blocks", "vocab"):
        if getattr(args, key) is not None:
            shapes[key] = getattr(args, key)
    missing = {"hidden", "intermediate", "heads", "kv_heads", "blocks", "vocab"} - shapes.keys()
    if missing:
        parser.error(f"give --preset or all of the shapes (missing: {', '.join(sorted(missing))})")

    start = time.perf_counter()
    path = write_llama(args.out, **shapes, seed=args.seed, rope_theta=args.rope_theta, eps=args.eps,
                       with_past=args.with_past, dtype=args.dtype)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    data = path.with_name(DATA_FILE).stat().st_size
    print(f"{path}: {', '.join(f'{k}={v}' for k, v in shapes.items())}; graph {path.stat().st_size / 2**20:.2f} MiB, "
          f"weights {data / 2**30:.2f} GiB; {seconds:.1f} s, peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
