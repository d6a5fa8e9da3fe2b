"""The pass pipeline: graph -> graph passes, then lowering to a KernelPlan."""

from __future__ import annotations

from dataclasses import dataclass, field

from attncc.ir.graph import AttentionGraph
from attncc.ir.verify import verify
from attncc.passes.lower import graph_to_plan
from attncc.passes.plan import KernelPlan

PIPELINE: list = []


@dataclass
class CompileReport:
    passes: list[tuple[str, float, bool]] = field(default_factory=list)  # name, seconds, modified
    dumps: list[tuple[str, str]] = field(default_factory=list)


def compile_graph(graph: AttentionGraph) -> tuple[KernelPlan, CompileReport]:
    verify(graph)
    return graph_to_plan(graph), CompileReport()
