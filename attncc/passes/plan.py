"""The kernel plan: the backend-neutral result of the pass pipeline.

A plan says everything a kernel needs and nothing about how a backend writes it. What
passes prove (tile classes, kv ranges, routing causality, decode split) travels here so
that no backend re-derives it from the mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from attncc.ir.expr import Expr, TensorSpec

# ---- what lowering passes decided (each None / default when the pass did not apply) ----


@dataclass(frozen=True)
class RoutingGate:
    """TopKBlocks as a gate step before the region (lower_routing; SEMANTICS.md, Routing).

    Keys are mean-pooled per ``block``; the gate is ``q . mean(k_J)`` (unscaled) per query
    (``per="token"``) or per mean query of each ``block``-sized query block
    (``per="query_block"``); ``causal`` is resolved. The runtime step
    ``attncc.passes.lower_routing.block_index_table`` returns an int32 table
    ``[B, Hq, rows, k]`` of selected kv blocks (ascending, -1 padded), rows = Lq for
    ``per="token"`` and ``ceil((q_offset + Lq) / block) - q_offset // block`` query blocks
    otherwise (row ``r`` covers ``q_idx // block == q_offset // block + r``).
    """

    block: int
    k: int
    per: str
    causal: bool
    runtime: str = "attncc.passes.lower_routing.block_index_table"


@dataclass(frozen=True)
class HeadSelection:
    """TopKHeads as a per-token head selection (lower_routing; MoH).

    ``attncc.passes.lower_routing.head_selection(router, k)`` gives ``heads [B, Lq, k]``
    (int64, ascending head index) and ``weights [B, Lq, k]`` (softmax over kept logits);
    a kernel computes only kept (token, head) pairs and writes zeros elsewhere.
    """

    k: int
    router: str  # captured tensor name, [B, Lq, Hq]
    runtime: str = "attncc.passes.lower_routing.head_selection"


@dataclass(frozen=True)
class LinearLowering:
    """Linear attention's schedule (lower_linear): chunked recurrence or one reassociation.

    ``linear_chunked``: per chunk of ``chunk`` queries, quadratic attention inside the chunk
    plus ``phi(Q_c) S`` with a ``D x Dv`` state ``S`` (and a ``D`` normalizer state) carried
    between chunks, decay ``g = decay_h ** (q_idx - kv_idx)`` applied exactly.
    ``linear_global``: ``phi(Q) (phi(K)^T V)`` once. Runtime reference:
    ``attncc.passes.lower_linear.linear_attention``.
    """

    strategy: str  # "linear_chunked" | "linear_global"
    chunk: int = 64
    causal_strict: bool = False  # mask is q_idx > kv_idx (diagonal excluded)


@dataclass(frozen=True)
class DecodeSplit:
    """Split-KV decoding, chosen at run time because ``Lq`` is only known then (decode pass).

    Applies when ``Lq <= max_lq`` and ``Lkv >= min_lkv``; ``num_splits`` cuts the keys into
    chunks of at least ``min_chunk`` tokens, enough to give ``target_programs`` parallel
    programs over ``B * Hq`` rows. Partials carry ``(m, l, o)``; the merge is a
    log-sum-exp merge that adds a softmax sink once. Runtime reference:
    ``attncc.passes.decode.split_kv_attention``.
    """

    max_lq: int = 16
    min_lkv: int = 1024
    min_chunk: int = 256
    target_programs: int = 256

    def applies(self, Lq: int, Lkv: int) -> bool:
        return 0 < Lq <= self.max_lq and Lkv >= self.min_lkv

    def num_splits(self, B: int, Hq: int, Lkv: int) -> int:
        by_length = max(1, Lkv // self.min_chunk)
        by_parallelism = max(1, -(-self.target_programs // max(1, B * Hq)))
        return max(1, min(by_length, by_parallelism))


@dataclass(frozen=True)
class RegionGroup:
    """Regions fused into one kernel (fuse): each tile of the ``shared`` operands is read once."""

    regions: tuple[str, ...]  # region node ids, in plan order
    shared: tuple[str, ...]  # operand names (q/k/v inputs) read by more than one region


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
    # NOTE: with ``score_scale`` set, ``score`` in ``self.score`` is ``(scale * score_scale) * q.k``:
    # a kernel multiplies q by ``scale * score_scale`` once (simplify moved a constant factor there).
    row_shift: Expr | None = None  # over b, h, q_idx: row-only terms simplify dropped (softmax)
    # NOTE: softmax cancels ``row_shift`` in the output; add it back to the lse, and a row whose
    # ``row_shift`` is -inf is fully masked (o = 0, lse = -inf).
    fused: bool = False  # fuse: score, mask, normalizer and value product in one loop nest
    sink_head: Expr | None = None  # over b, h, q_idx: whose sink a row adds, where not h (a decoding
    # step folds a group's query heads into the rows of its kv head)
    # NOTE: set by codegen.tvm.rows.reindex for TVM kernel regions only, which run without autograd;
    # the reference and Triton read sink[h]
    gate: RoutingGate | None = None  # lower_routing: TopKBlocks gate step
    head_select: HeadSelection | None = None  # lower_routing: TopKHeads per-token selection
    linear: LinearLowering | None = None  # lower_linear: chunked or global schedule

    def __hash__(self) -> int:
        """Computed once: a kernel call keys about a dozen memos on its region, and the generated
        hash walks every field (payloads, sparsity facts) each time. A value like ``Expr._hash``:
        regions are never pickled, so it never crosses processes."""
        try:
            return self.__dict__["_hash"]
        except KeyError:
            value = hash(tuple(getattr(self, f.name) for f in fields(self)))
            object.__setattr__(self, "_hash", value)
            return value


@dataclass(frozen=True)
class KernelPlan:
    fingerprint: str
    regions: tuple[AttentionRegion, ...]
    combine: Expr | None  # over vars o0, o1, ... and captured scalars; None: one output
    combine_operands: tuple[tuple[str, str], ...] = ()  # (the combine's variable, its attention node)
    captured: tuple[TensorSpec, ...] = ()
    strategy: str = "tiled"  # "tiled" | "split_kv" | "linear_chunked" | "linear_global"
    notes: tuple[str, ...] = field(default=())  # what each pass decided, for explain()
    groups: tuple[RegionGroup, ...] = ()  # fuse: regions sharing inputs run as one kernel
    decode_split: DecodeSplit | None = None  # decode: split-KV when Lq is small at run time

    def combine_inputs(self, outputs: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
        """The combine's variables bound to the region outputs ``outputs[node] = (o, lse)``."""
        return {name: outputs[node][0] for name, node in self.combine_operands}
