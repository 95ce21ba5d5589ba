"""Who our custom ops are: their domain, op types and opsets, and the variants of each.

A variant is what the node's inputs and attributes select (sparse or dense W, the adapters' format,
a bias, the gated activation; packed q/k/v with rotary caches, an attention bias). It names the
model-local fallback function that computes the node on stock onnxruntime: `NodeProto.overload` is
`variant.overload`, and `Variant.parse(node.overload)` reads it back. The contracts are in
docs/op-spec.md; the fallback functions in fallback.py.
"""

from __future__ import annotations

import dataclasses
import itertools

DOMAIN = "slim_onnx"
SLIM_MATMUL = "SlimMatMul"
GROUP_QUERY_ATTENTION = "GroupQueryAttention"
OPSET = 18  # of the standard ops in the fallback functions
# Function overloads (NodeProto.overload) need IR version 10; onnxruntime 1.20 reads IR 10.
IR_VERSION = 10

ADAPTER_FORMATS = ("int4", "float16", "none")
# SlimMatMul's inputs, in order (docs/op-spec.md); 1.. are the weights SlimWeights holds.
SLIM_MATMUL_INPUTS = ("A", "W", "W_scales", "bias", "L", "L_scales", "R", "R_scales")
GROUP_QUERY_ATTENTION_INPUTS = (
    "query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "attention_bias",
    "cos_cache", "sin_cache",
)

_ADAPTER_WORDS = {"none": "noadapter", "float16": "f16adapter", "int4": "int4adapter"}
_SWIGLU = "_swiglu"
_PACKED = "packed_rotary_"


class UnknownVariant(ValueError):
    """An overload name that no variant of the op has."""


@dataclasses.dataclass(frozen=True)
class SlimMatMulVariant:
    """sparse: W is 2:4 sparse; adapter_format: one of ADAPTER_FORMATS; bias: input 3 is present;
    swiglu: activation="swiglu" (Y = silu(P[..., :N/2]) * P[..., N/2:])."""

    sparse: bool
    adapter_format: str
    bias: bool
    swiglu: bool = False

    @property
    def overload(self) -> str:
        words = ("sparse" if self.sparse else "dense", _ADAPTER_WORDS[self.adapter_format], "bias" if self.bias else "nobias")
        return "_".join(words) + (_SWIGLU if self.swiglu else "")

    @classmethod
    def all(cls) -> tuple[SlimMatMulVariant, ...]:
        return tuple(cls(*v) for v in itertools.product((True, False), ADAPTER_FORMATS[::-1], (True, False), (False, True)))

    @classmethod
    def parse(cls, overload: str) -> SlimMatMulVariant:
        return _parse(cls, overload)


@dataclasses.dataclass(frozen=True)
class AttentionVariant:
    """packed: query holds q, k and v side by side and cos/sin caches are given (key, value absent);
    bias: attention_bias is present."""

    packed: bool
    bias: bool

    @property
    def overload(self) -> str:
        return (_PACKED if self.packed else "") + ("bias" if self.bias else "nobias")

    @classmethod
    def all(cls) -> tuple[AttentionVariant, ...]:
        return tuple(cls(*v) for v in itertools.product((False, True), (True, False)))

    @classmethod
    def parse(cls, overload: str) -> AttentionVariant:
        return _parse(cls, overload)


def _parse(cls, overload: str):
    for variant in cls.all():
        if variant.overload == overload:
            return variant
    names = ", ".join(v.overload for v in cls.all())
    raise UnknownVariant(f"unknown {cls.__name__} overload {overload!r}; expected one of {names}")


VARIANTS = {SLIM_MATMUL: SlimMatMulVariant, GROUP_QUERY_ATTENTION: AttentionVariant}  # op type -> its variants
