"""The pass pipeline: graph -> graph passes in order, then lowering to a ``KernelPlan``.

Adding a pass is one function in its own module and one line in ``PIPELINE``. Every pass
runs under ``manager.run_passes``: the verifier after each, its time, and a dump of the
graph after it (``ATTNCC_DUMP_IR=1`` prints them to stderr; ``CompileReport.dumps`` keeps
them for ``attncc explain FILE:NAME --passes``).
"""

from __future__ import annotations

from attncc.ir.graph import AttentionGraph
from attncc.passes.decode import decode
from attncc.passes.fuse import fuse
from attncc.passes.lower import graph_to_plan
from attncc.passes.lower_linear import lower_linear
from attncc.passes.lower_routing import lower_routing
from attncc.passes.manager import CompileReport, GraphPass, run_passes
from attncc.passes.plan import KernelPlan
from attncc.passes.simplify import simplify
from attncc.passes.sparsify import sparsify

PIPELINE: list[GraphPass] = [
    simplify,
    sparsify,
    fuse,
    lower_routing,
    lower_linear,
    decode,
]

__all__ = ["PIPELINE", "CompileReport", "compile_graph"]


def compile_graph(graph: AttentionGraph) -> tuple[KernelPlan, CompileReport]:
    """Run ``PIPELINE`` on ``graph`` (never mutated) and lower the result to a plan."""
    final, report = run_passes(graph, PIPELINE)
    return graph_to_plan(final), report
