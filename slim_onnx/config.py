"""SlimConfig: every choice of the per-layer compression method, in one object."""

from __future__ import annotations

import dataclasses
import math

from slim_onnx.layout import BLOCK_K
from slim_onnx.schema import ADAPTER_FORMATS

SPARSITIES = ("2:4", "none")
PRUNINGS = ("magnitude", "wanda", "sparsegpt")
QUANTIZERS = ("slim", "slim-group", "absmax", "gptq")
LOWRANKS = ("saliency", "naive", "hessian")
SVDS = ("auto", "full", "randomized")
SALIENCIES = ("rms", "mean_abs")
MASK_SOURCES = ("weight", "quantized")
CALIBRATION_MODES = ("stream", "one-pass")  # compress(calibration_mode=...): streaming.py, calibration.py


class ConfigError(ValueError):
    """A SlimConfig field out of its range, or a combination that does not work."""


@dataclasses.dataclass(frozen=True)
class SlimConfig:
    """How to compress each weight matrix W [K, N] (K inputs, N outputs).

    The defaults are the best combination measured on SmolLM2 layers (docs/algorithms.md);
    SlimConfig.paper() is the paper's recipe.

    bits, group_size: the symmetric weight quantizer (scales per group of consecutive k).
    sparsity: "2:4" along K, or "none" (dense 4-bit).
    pruning: how the 2:4 mask is chosen: "magnitude" (|W|), "wanda" (|W| * input RMS), or
        "sparsegpt" (OBS, jointly with GPTQ quantization).
    quantizer: "slim" (SLiM-Quant, one MSE-optimal clip per tensor), "slim-group" (the MSE-optimal
        clip per group), "absmax" (round to nearest), "gptq" (OPTQ error feedback with group scales).
    rank: adapter rank, a ratio of min(K, N) if < 1 (rounded up to rank_multiple), else absolute;
        0 for none.
    lowrank: "saliency" (SLiM: SVD of the input-RMS-weighted error), "naive" (plain SVD), or
        "hessian" (SVD of the error whitened by the full input covariance: output-error optimal).
    adapter_format: "int4" (AbsMax, adapter_group_size along the reduction dim), "float16", "none".
    requantize: re-quantize the masked W - L R after fitting the adapters (the reference code's
        second pass; not in the paper).
    saliency: the per-channel statistic of lowrank="saliency": "rms" (sqrt of mean x^2, the
        reference code) or "mean_abs" (mean |x|, the paper's text).
    mask_on: magnitude/Wanda scores from the original W ("weight", the reference code; the quantizer
        then fits the kept weights) or from the quantized W ("quantized", the paper's order).
    svd: "full", "randomized", or "auto" (randomized when rank <= min(K, N) / 4).
    damp: GPTQ/SparseGPT Hessian dampening, as a fraction of its mean diagonal.
    device: "cpu" or "cuda" for the algorithms' torch work.
    """

    bits: int = 4
    group_size: int = 128
    sparsity: str = "2:4"
    pruning: str = "sparsegpt"
    quantizer: str = "gptq"
    rank: float = 0.1
    rank_multiple: int = 8
    lowrank: str = "hessian"
    adapter_format: str = "int4"
    adapter_group_size: int = 128
    requantize: bool = False
    saliency: str = "rms"
    mask_on: str = "weight"
    svd: str = "auto"
    damp: float = 0.01
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        def one_of(field: str, allowed) -> None:
            if getattr(self, field) not in allowed:
                raise ConfigError(f"{field}={getattr(self, field)!r}: expected one of {', '.join(map(str, allowed))}")

        one_of("sparsity", SPARSITIES)
        one_of("pruning", PRUNINGS)
        one_of("quantizer", QUANTIZERS)
        one_of("lowrank", LOWRANKS)
        one_of("adapter_format", ADAPTER_FORMATS)
        one_of("svd", SVDS)
        one_of("saliency", SALIENCIES)
        one_of("mask_on", MASK_SOURCES)
        if self.bits not in (2, 3, 4, 5, 6, 7, 8):
            raise ConfigError(f"bits={self.bits}: expected 2..8 (the SlimMatMul kernels run 4)")
        # The kernels read K in blocks of BLOCK_K, so a group of scales is whole blocks (the op also takes
        # a group >= K, which one setting for every layer cannot promise).
        for field in ("group_size", "adapter_group_size"):
            size = getattr(self, field)
            if size < BLOCK_K or size % BLOCK_K:
                raise ConfigError(f"{field}={size}: expected a multiple of {BLOCK_K} (such as 32, 64 or 128): "
                                  f"the SlimMatMul kernels read K in blocks of {BLOCK_K}")
        if self.rank_multiple < 1:
            raise ConfigError(f"rank_multiple={self.rank_multiple} must be positive")
        if not 0 <= self.rank < math.inf:
            raise ConfigError(f"rank={self.rank} must be a finite number >= 0")
        if self.rank >= 1 and int(self.rank) != self.rank:
            raise ConfigError(f"rank={self.rank}: a ratio must be < 1, an absolute rank an integer")
        if self.rank > 0 and self.adapter_format == "none":
            raise ConfigError("rank > 0 needs adapter_format 'int4' or 'float16'")
        if self.pruning == "sparsegpt" and self.quantizer != "gptq":
            raise ConfigError("pruning='sparsegpt' prunes inside the GPTQ pass: use quantizer='gptq'")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device={self.device!r}: expected 'cpu' or 'cuda'")

    @classmethod
    def paper(cls, **overrides) -> "SlimConfig":
        """The SLiM paper's recipe: Wanda mask, per-tensor SLiM-Quant, input-RMS saliency adapters.

        The defaults differ because they measured better on real layers (tools/eval_layers.py,
        docs/algorithms.md): SparseGPT + GPTQ for the 2:4 4-bit weights, and adapters fitted to the
        full input covariance.
        """
        fields = dict(pruning="wanda", quantizer="slim", lowrank="saliency")
        fields.update(overrides)
        return cls(**fields)

    @property
    def has_adapters(self) -> bool:
        return self.rank > 0 and self.adapter_format != "none"

    @property
    def needs_hessian(self) -> bool:
        """GPTQ/SparseGPT and Hessian-whitened adapters need X^T X, not only per-channel statistics."""
        return self.quantizer == "gptq" or (self.has_adapters and self.lowrank == "hessian")

    @property
    def needs_statistics(self) -> bool:
        """Whether compressing a layer needs calibration statistics of its input at all."""
        scored = self.sparsity == "2:4" and self.pruning in ("wanda", "sparsegpt")
        return scored or self.needs_hessian or (self.has_adapters and self.lowrank != "naive")

    def resolve_rank(self, k: int, n: int) -> int:
        """The adapter rank for a [K, N] weight (0 for none)."""
        if not self.has_adapters:
            return 0
        limit = min(k, n)
        if self.rank < 1:
            r = math.ceil(self.rank * limit - 1e-9)
            r = math.ceil(r / self.rank_multiple) * self.rank_multiple
            return max(1, min(r, limit))
        return min(int(self.rank), limit)  # a narrower layer (e.g. grouped-query k/v) gets its full rank


ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # as MatMulNBits; SlimMatMul's CPU kernel runs 4 as int8, the others in float32


@dataclasses.dataclass(frozen=True)
class GraphOptions:
    """How the compressed model's graph is written, every choice in one object (passes/manager.py).

    accuracy_level: each SlimMatMul's activation path on the CPU: 4 quantizes activations to int8
        (fast), 0 keeps them float32.
    quantize_embeddings: token-embedding tables that nothing else reads as int8 rows with group
        scales (passes/embedding.py).
    fuse_attention: each cached decoder attention layer as one GroupQueryAttention node
        (passes/attention.py); the result needs onnxruntime >= 1.22 to load (compress() skips the
        fusion on older ones).
    fuse_norms: each residual Add and the RMSNorm after it as SkipSimplifiedLayerNormalization
        (passes/norm.py).
    merge_siblings: one SlimMatMul node (and a Split) for layers that read the same activation,
        such as q/k/v and gate/up (passes/siblings.py).
    fuse_swiglu: the SwiGLU after a merged gate/up folded into its node (passes/swiglu.py).
    pack_attention: the merged q/k/v product fed to the fused attention directly, rotary included
        (passes/packed_attention.py).
    target: "cpu", or "cuda": a graph onnxruntime's CUDA provider runs whole, with float16
        activations end to end (passes/float16.py) and no op that only has a CPU kernel (our fused
        attention: fuse_attention and pack_attention must be off; see GraphOptions.for_target).
    """

    accuracy_level: int = 4
    quantize_embeddings: bool = True
    fuse_attention: bool = True
    fuse_norms: bool = True
    merge_siblings: bool = True
    fuse_swiglu: bool = True
    pack_attention: bool = True
    target: str = "cpu"

    PASSES = ("quantize_embeddings", "fuse_attention", "fuse_norms", "merge_siblings", "fuse_swiglu", "pack_attention")
    TARGETS = ("cpu", "cuda")
    CPU_ONLY_PASSES = ("fuse_attention", "pack_attention")  # our GroupQueryAttention has no CUDA kernel

    def __post_init__(self) -> None:
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ConfigError(f"accuracy_level={self.accuracy_level}: expected one of {ACCURACY_LEVELS} "
                              "(4: int8 activations, 0: float32)")
        if self.target not in self.TARGETS:
            raise ConfigError(f"target={self.target!r}: expected one of {self.TARGETS}")
        on = [name for name in self.CPU_ONLY_PASSES if getattr(self, name)]
        if self.target == "cuda" and on:
            raise ConfigError(f"target='cuda' cannot use {on}: our fused attention runs on the CPU only "
                              "(GraphOptions.for_target('cuda') switches them off)")

    @classmethod
    def for_target(cls, target: str, **choices) -> GraphOptions:
        """The options for `target` ("cpu" or "cuda"), the passes `target` cannot run switched off."""
        if target == "cuda":
            choices.update({name: False for name in cls.CPU_ONLY_PASSES})
        return cls(target=target, **choices)

    @classmethod
    def only(cls, *passes: str) -> GraphOptions:
        """The named passes (of PASSES) switched on, the others off."""
        unknown = set(passes) - set(cls.PASSES)
        if unknown:
            raise ConfigError(f"unknown graph passes {sorted(unknown)}: expected some of {cls.PASSES}")
        return cls(**{name: name in passes for name in cls.PASSES})
