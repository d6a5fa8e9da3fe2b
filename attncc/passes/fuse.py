"""Fuse: each attention becomes one fused region; attentions sharing inputs become one group.

A region computes score function, mask, normalizer and value product in one loop nest
(the online form for softmax), so no ``Lq x Lkv`` intermediate exists; tiles proven FULL by
sparsify skip the mask. Attention nodes that read the same ``k`` or ``v`` input
(differential attention: ``attn(q1, k1, v) - lam * attn(q2, k2, v)``) form one
``RegionGroup``: one kernel walks the kv tiles once and feeds every region of the group.
"""

from __future__ import annotations

from attncc.ir.graph import AttentionGraph
from attncc.ir.nodes import LinearNorm
from attncc.passes.manager import PassResult, add_note, attach, facts_of
from attncc.passes.plan import RegionGroup


def _groupable(graph: AttentionGraph, attention: str) -> bool:
    """Linear attention runs its own schedule (lower_linear) and is never grouped."""
    return not isinstance(graph.payload(graph.operands(attention)["normalizer"]), LinearNorm)


def share_groups(graph: AttentionGraph) -> list[RegionGroup]:
    """Connected components of attentions linked by a shared ``k`` or ``v`` input node."""
    attentions = [a for a in graph.attention_nodes() if _groupable(graph, a)]
    parent = {a: a for a in attentions}

    def find(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    readers: dict[str, list[str]] = {}
    for a in attentions:
        operands = graph.operands(a)
        for role in ("k", "v"):
            readers.setdefault(operands[role], []).append(a)
    for group in readers.values():
        for other in group[1:]:
            parent[find(other)] = find(group[0])
    components: dict[str, list[str]] = {}
    for a in attentions:
        components.setdefault(find(a), []).append(a)
    groups = []
    for members in components.values():
        if len(members) < 2:
            continue
        names = [graph.payload(graph.operands(a)[r]).name for a in members for r in ("q", "k", "v")]
        shared = tuple(sorted({n for n in names if names.count(n) > 1}))
        groups.append(RegionGroup(tuple(members), shared))
    return groups


def fuse(graph: AttentionGraph) -> PassResult:
    """Mark every attention as one fused region and record region groups sharing k/v tiles."""
    if all(facts_of(graph, a).get("fused") for a in graph.attention_nodes()) and "groups" in facts_of(graph):
        return PassResult(graph, False)
    out = graph
    for attention in graph.attention_nodes():
        out = attach(out, attention, fused=True)
    groups = tuple(share_groups(graph))
    out = attach(out, groups=groups)
    for group in groups:
        out = add_note(out, f"fuse: regions {', '.join('%' + r for r in group.regions)} run as one kernel "
                            f"reading {', '.join(group.shared)} once per tile")
    return PassResult(out, True)
