"""Graph to plan: one region per attention node, the combine expression, the captured inputs."""

from __future__ import annotations

from attncc.ir.graph import AttentionGraph
from attncc.ir.nodes import Combine, Input, MaskMod, ScoreMod, TopKBlocksRoute
from attncc.passes.causality import mask_implies_causal
from attncc.passes.plan import AttentionRegion, KernelPlan


def region_of(graph: AttentionGraph, node_id: str) -> AttentionRegion:
    operands = graph.operands(node_id)

    def payload(role: str):  # noqa: ANN202
        return graph.payload(operands[role]) if role in operands else None

    score: ScoreMod | None = payload("score")
    mask: MaskMod | None = payload("mask")
    routing = payload("routing")
    mask_expr = mask.expr if mask else None
    causal = False
    if isinstance(routing, TopKBlocksRoute):
        causal = routing.causal if routing.causal is not None else mask_implies_causal(mask_expr)
    return AttentionRegion(
        node=node_id, q=payload("q").name, k=payload("k").name, v=payload("v").name,
        score=score.expr if score else None, mask=mask_expr, normalizer=payload("normalizer"),
        routing=routing, routing_causal=causal,
    )


def graph_to_plan(graph: AttentionGraph) -> KernelPlan:
    regions = tuple(region_of(graph, n) for n in graph.attention_nodes())
    output = graph.outputs[0]
    combine = graph.payload(output) if isinstance(graph.payload(output), Combine) else None
    operands = graph.operands(output) if combine else {}
    ordered = tuple(operands[f"o{i}"] for i in range(sum(r.startswith("o") for r in operands)))
    captured = tuple(
        graph.payload(n).spec for n in graph.nodes_of(Input) if graph.payload(n).spec is not None
    )
    return KernelPlan(
        fingerprint=graph.fingerprint, regions=regions, combine=combine.expr if combine else None,
        combine_operands=ordered, captured=captured,
    )
