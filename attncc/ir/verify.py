"""The graph verifier: a rule per payload kind, run after building and after every pass."""

from __future__ import annotations

from collections.abc import Callable

import networkx as nx

from attncc.ir.expr import INDEX_VARS, Expr
from attncc.ir.graph import AttentionGraph
from attncc.ir.nodes import (
    NORMALIZER_TYPES,
    ROUTING_TYPES,
    Attention,
    Combine,
    Input,
    LinearNorm,
    MaskMod,
    PointwiseNorm,
    ScoreMod,
)


class VerifyError(ValueError):
    """The graph breaks an IR invariant (a bug in a builder or a pass)."""


def _check_expr(expr: Expr, allowed_vars: set[str], dtype: str | None, what: str) -> None:
    extra = expr.free_vars() - allowed_vars
    if extra:
        raise VerifyError(f"{what} reads {sorted(extra)}; only {sorted(allowed_vars)} are in scope")
    if dtype is not None and expr.dtype != dtype:
        raise VerifyError(f"{what} has dtype {expr.dtype}, expected {dtype}")


def _verify_attention(graph: AttentionGraph, node_id: str) -> None:
    operands = graph.operands(node_id)
    missing = {"q", "k", "v", "normalizer"} - operands.keys()
    if missing:
        raise VerifyError(f"%{node_id}: attention lacks operands {sorted(missing)}")
    unknown = operands.keys() - {"q", "k", "v", "score", "mask", "normalizer", "routing"}
    if unknown:
        raise VerifyError(f"%{node_id}: unknown operand roles {sorted(unknown)}")
    expected = {"score": ScoreMod, "mask": MaskMod, "normalizer": NORMALIZER_TYPES,
                "routing": ROUTING_TYPES, "q": Input, "k": Input, "v": Input}
    for role, src in operands.items():
        if not isinstance(graph.payload(src), expected[role]):
            raise VerifyError(f"%{node_id}: operand {role}=%{src} is {type(graph.payload(src)).__name__}")
    if isinstance(graph.payload(operands["normalizer"]), LinearNorm) and "score" in operands:
        raise VerifyError(f"%{node_id}: a score function cannot be combined with Linear attention")


def _verify_combine(graph: AttentionGraph, node_id: str) -> None:
    combine: Combine = graph.payload(node_id)
    operands = graph.operands(node_id)
    names = {role for role, src in operands.items() if isinstance(graph.payload(src), Attention | Combine)}
    _check_expr(combine.expr, names, "float", f"%{node_id} combine")


_RULES: dict[type, Callable[[AttentionGraph, str], None]] = {
    ScoreMod: lambda g, n: _check_expr(g.payload(n).expr, {"score", *INDEX_VARS}, "float", f"%{n} score"),
    MaskMod: lambda g, n: _check_expr(g.payload(n).expr, set(INDEX_VARS), "bool", f"%{n} mask"),
    PointwiseNorm: lambda g, n: _check_expr(g.payload(n).phi, {"score"}, "float", f"%{n} phi"),
    Attention: _verify_attention,
    Combine: _verify_combine,
}


def verify(graph: AttentionGraph) -> AttentionGraph:
    """Raise ``VerifyError`` on the first broken invariant; return the graph otherwise."""
    if not nx.is_directed_acyclic_graph(graph.nx):
        raise VerifyError(f"graph {graph.name!r} has a cycle")
    if not graph.outputs:
        raise VerifyError(f"graph {graph.name!r} has no outputs")
    for output in graph.outputs:
        if not isinstance(graph.payload(output), Attention | Combine):
            raise VerifyError(f"output %{output} is not an attention or combine node")
    for node_id in graph.topological_order():
        rule = _RULES.get(type(graph.payload(node_id)))
        if rule is not None:
            rule(graph, node_id)
    return graph
