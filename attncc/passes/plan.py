"""The kernel plan: the backend-neutral result of the pass pipeline.

A plan says everything a kernel needs and nothing about how a backend writes it. What
passes prove (tile classes, kv ranges, routing causality, decode split) travels here so
that no backend re-derives it from the mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from attncc.ir.expr import Expr, TensorSpec


@dataclass(frozen=True)
class AttentionRegion:
    """One fused attention: score, mask, normalizer and value product in one loop nest."""

    node: str
    q: str
    k: str
    v: str
    score: Expr | None  # over score, b, h, q_idx, kv_idx; None is the identity
    mask: Expr | None  # boolean over b, h, q_idx, kv_idx; None keeps every key
    normalizer: Any  # an attncc.ir.nodes *Norm payload
    routing: Any = None  # an attncc.ir.nodes *Route payload
    routing_causal: bool = False  # TopKBlocks: causal rules apply (resolved by a pass)
    sparsity: Any = None  # a passes.sparsify.MaskSparsity, or None when unanalysed
    score_scale: float | None = None  # folded into q when simplify moved it there


@dataclass(frozen=True)
class KernelPlan:
    fingerprint: str
    regions: tuple[AttentionRegion, ...]
    combine: Expr | None  # over vars o0, o1, ... and captured scalars; None: one output
    combine_operands: tuple[str, ...] = ()
    captured: tuple[TensorSpec, ...] = ()
    strategy: str = "tiled"  # "tiled" | "split_kv" | "linear_chunked" | "linear_global"
    notes: tuple[str, ...] = field(default=())  # what each pass decided, for explain()
