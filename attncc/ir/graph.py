"""The attention graph: a networkx DiGraph whose nodes carry frozen payloads.

Edges point from operand to user and are labelled with the operand's role ("q", "mask",
"normalizer", "o0", ...), so a node's operands are read back by role, not by position.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import networkx as nx

from attncc.ir.nodes import Attention, Combine, Input, payload_key


class AttentionGraph:
    def __init__(self, name: str = "variant") -> None:
        self.name = name
        self.nx = nx.DiGraph()
        self.outputs: list[str] = []

    # ---- building ----------------------------------------------------------------------

    def add(self, node_id: str, payload: Any, **operands: str) -> str:
        if node_id in self.nx:
            raise ValueError(f"graph {self.name!r} already has a node {node_id!r}")
        self.nx.add_node(node_id, payload=payload)
        for role, src in operands.items():
            if src not in self.nx:
                raise ValueError(f"operand {role}=%{src} of %{node_id} is not in the graph")
            self.nx.add_edge(src, node_id, role=role)
        return node_id

    def fresh_id(self, prefix: str) -> str:
        n = 0
        while f"{prefix}{n}" in self.nx:
            n += 1
        return f"{prefix}{n}"

    def replace_payload(self, node_id: str, payload: Any) -> None:
        self.nx.nodes[node_id]["payload"] = payload

    def copy(self) -> AttentionGraph:
        other = AttentionGraph(self.name)
        other.nx = self.nx.copy()
        other.outputs = list(self.outputs)
        return other

    # ---- reading -----------------------------------------------------------------------

    def payload(self, node_id: str) -> Any:
        return self.nx.nodes[node_id]["payload"]

    def operands(self, node_id: str) -> dict[str, str]:
        edges = self.nx.in_edges(node_id, data="role")
        return {role: src for src, _, role in sorted(edges, key=lambda e: e[2])}

    def users(self, node_id: str) -> list[str]:
        return list(self.nx.successors(node_id))

    def topological_order(self) -> list[str]:
        return list(nx.lexicographical_topological_sort(self.nx))

    def nodes_of(self, kind: type) -> Iterator[str]:
        for node_id in self.topological_order():
            if isinstance(self.payload(node_id), kind):
                yield node_id

    def attention_nodes(self) -> list[str]:
        return list(self.nodes_of(Attention))

    def inputs(self) -> list[str]:
        return list(self.nodes_of(Input))

    @property
    def fingerprint(self) -> str:
        """sha256 over payloads and roles in topological order; node ids do not matter."""
        order = self.topological_order()
        position = {node_id: i for i, node_id in enumerate(order)}
        rows = []
        for node_id in order:
            payload = self.payload(node_id)
            operands = sorted((role, position[src]) for role, src in self.operands(node_id).items())
            rows.append((payload_key(payload), tuple(operands)))
        rows.append(("outputs", tuple(position[o] for o in self.outputs)))
        return hashlib.sha256(repr(rows).encode()).hexdigest()

    def __str__(self) -> str:
        from attncc.ir.printer import format_graph

        return format_graph(self)


__all__ = ["Attention", "AttentionGraph", "Combine", "Input"]
