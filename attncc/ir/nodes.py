"""Payloads of attention-graph nodes: frozen values that hash structurally.

The networkx graph holds the topology; each node carries one of these. Tensors never
live here, only their ``TensorSpec``; the values travel beside the graph as inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

from attncc.ir.expr import Expr, TensorSpec, _arg_key


def payload_key(value: Any) -> Any:
    """A structural, process-independent rendering of a payload (for fingerprints)."""
    if isinstance(value, Expr):
        return ("expr", value.key)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [(f.name, payload_key(getattr(value, f.name))) for f in dataclasses.fields(value)]
        return (type(value).__name__, tuple(fields))
    if isinstance(value, tuple):
        return tuple(payload_key(v) for v in value)
    return _arg_key(value)


def digest(value: Any) -> str:
    return hashlib.sha256(repr(payload_key(value)).encode()).hexdigest()


class Payload:
    """Shared printing for node payloads."""

    def describe(self) -> str:
        parts = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None or value == f.default:
                continue
            shown = value.name if isinstance(value, TensorSpec) else str(value)
            parts.append(f"{f.name}={shown}")
        return f"{type(self).__name__}({', '.join(parts)})"


# ---- data ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Input(Payload):
    """A tensor entering the graph: ``q``/``k``/``v`` (role) or a captured tensor (spec)."""

    name: str
    role: str  # "q", "k", "v", "captured", "scalar"
    spec: TensorSpec | None = None


# ---- the functions of one attention node ---------------------------------------------


@dataclass(frozen=True)
class ScoreMod(Payload):
    expr: Expr  # over score, b, h, q_idx, kv_idx


@dataclass(frozen=True)
class MaskMod(Payload):
    expr: Expr  # boolean, over b, h, q_idx, kv_idx


# ---- normalizers (SEMANTICS.md, "Normalizers") ----------------------------------------


@dataclass(frozen=True)
class SoftmaxNorm(Payload):
    sink: TensorSpec | None = None  # [Hq] learned sink logits

    family = "softmax"


@dataclass(frozen=True)
class SigmoidNorm(Payload):
    bias: float | None = None  # None: -ln(Lkv) at run time

    family = "sigmoid"


@dataclass(frozen=True)
class PointwiseNorm(Payload):
    phi: Expr  # over the single float var "score"
    normalize: bool = True
    name: str | None = None  # "softplus", "relu", "relu2" for the named ones

    family = "pointwise"


@dataclass(frozen=True)
class StickBreakingNorm(Payload):
    family = "stick_breaking"


@dataclass(frozen=True)
class LinearNorm(Payload):
    feature_map: str | Expr  # "elu1", "relu", "identity" or an Expr over var "x"
    normalize: bool = True
    decay: TensorSpec | None = None  # [Hq] in (0, 1]

    family = "linear"


NORMALIZER_TYPES = (SoftmaxNorm, SigmoidNorm, PointwiseNorm, StickBreakingNorm, LinearNorm)


# ---- routing (SEMANTICS.md, "Routing") ------------------------------------------------


@dataclass(frozen=True)
class TopKBlocksRoute(Payload):
    block: int
    k: int
    per: str = "token"  # or "query_block"
    causal: bool | None = None


@dataclass(frozen=True)
class TopKHeadsRoute(Payload):
    k: int
    router: TensorSpec  # [B, Lq, Hq] logits


ROUTING_TYPES = (TopKBlocksRoute, TopKHeadsRoute)


# ---- structure -----------------------------------------------------------------------


@dataclass(frozen=True)
class Attention(Payload):
    """One attention: operands q, k, v, and optionally score, mask, normalizer, routing."""

    label: str = "attn"


@dataclass(frozen=True)
class Combine(Payload):
    """Elementwise combination of attention outputs: ``expr`` over vars o0, o1, ... ."""

    expr: Expr


def referenced_specs(payload: Any) -> tuple[TensorSpec, ...]:
    """Captured tensors a payload reads, through its expressions or directly."""
    found: dict[TensorSpec, None] = {}
    for f in dataclasses.fields(payload):
        value = getattr(payload, f.name)
        if isinstance(value, TensorSpec):
            found[value] = None
        elif isinstance(value, Expr):
            found.update(dict.fromkeys(value.inputs()))
    return tuple(found)
