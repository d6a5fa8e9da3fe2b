"""Graph to plan: one region per attention node, the combine expression, the captured inputs.

Facts that passes attached to an attention node (``manager.attach``) fill the region
fields of the same name (``sparsity``, ``score_scale``, ``row_shift``, ``gate``, ...);
graph-wide facts fill the plan fields of the same name (``strategy``, ``groups``,
``decode_split``, ``notes``). Lowering proves nothing itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from attncc.ir.graph import AttentionGraph
from attncc.ir.nodes import Attention, Combine, Input, MaskMod, ScoreMod, TopKBlocksRoute, payload_key
from attncc.passes.causality import mask_implies_causal
from attncc.passes.manager import facts_of
from attncc.passes.plan import AttentionRegion, KernelPlan

_REGION_FIELDS = {f.name for f in dataclasses.fields(AttentionRegion)}
_PLAN_FIELDS = {f.name for f in dataclasses.fields(KernelPlan)} - {"fingerprint", "regions", "combine"}


def region_of(graph: AttentionGraph, node_id: str) -> AttentionRegion:
    operands = graph.operands(node_id)

    def payload(role: str):
        return graph.payload(operands[role]) if role in operands else None

    score: ScoreMod | None = payload("score")
    mask: MaskMod | None = payload("mask")
    routing = payload("routing")
    mask_expr = mask.expr if mask else None
    causal = False
    if isinstance(routing, TopKBlocksRoute):
        causal = routing.causal if routing.causal is not None else mask_implies_causal(mask_expr)
    facts = {k: v for k, v in facts_of(graph, node_id).items() if k in _REGION_FIELDS}
    fields: dict[str, Any] = dict(
        node=node_id, q=payload("q").name, k=payload("k").name, v=payload("v").name,
        score=score.expr if score else None, mask=mask_expr, normalizer=payload("normalizer"),
        routing=routing, routing_causal=causal,
    )
    return AttentionRegion(**{**fields, **facts})


def _fact_key(value: Any) -> Any:
    """A process-independent rendering of a fact; opaque objects count by their type."""
    if isinstance(value, tuple | list):
        return tuple(_fact_key(v) for v in value)
    if dataclasses.is_dataclass(value) or isinstance(value, str | int | float | bool | type(None)):
        return payload_key(value)
    if hasattr(value, "key"):
        return ("keyed", str(value.key))
    return ("object", type(value).__name__)


def plan_fingerprint(graph: AttentionGraph) -> str:
    """The graph's structural fingerprint plus every fact the passes attached.

    Two graphs whose payloads agree but whose facts differ (``score * 2`` and ``score * 3``
    both simplify to ``score`` with different ``score_scale``) get different plan keys.
    """
    rows: list[Any] = [graph.fingerprint, sorted((k, _fact_key(v)) for k, v in facts_of(graph).items())]
    order = {node_id: i for i, node_id in enumerate(graph.topological_order())}
    for node_id in order:
        facts = facts_of(graph, node_id)
        if facts:
            rows.append((order[node_id], sorted((k, _fact_key(v)) for k, v in facts.items())))
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def graph_to_plan(graph: AttentionGraph) -> KernelPlan:
    regions = tuple(region_of(graph, n) for n in graph.attention_nodes())
    output = graph.outputs[0]
    combine = graph.payload(output) if isinstance(graph.payload(output), Combine) else None
    operands = graph.operands(output) if combine else {}
    # NOTE: by node kind, not by name: a scalar may be called "offset"; a combine may skip o0
    ordered = tuple((role, src) for role, src in sorted(operands.items())
                    if isinstance(graph.payload(src), Attention | Combine))
    captured = tuple(
        graph.payload(n).spec for n in graph.nodes_of(Input) if graph.payload(n).spec is not None
    )
    plan_facts = {k: v for k, v in facts_of(graph).items() if k in _PLAN_FIELDS}
    return KernelPlan(
        fingerprint=plan_fingerprint(graph), regions=regions, combine=combine.expr if combine else None,
        combine_operands=ordered, captured=captured, **plan_facts,
    )
