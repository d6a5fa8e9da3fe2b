"""The pass manager: an ordered list of graph -> graph passes, verified, timed and dumped.

A pass is a plain function ``AttentionGraph -> PassResult(graph, modified)`` that never
mutates its input (it works on ``graph.copy()``), in the manner of torch.fx's
``PassResult``. Analyses are passes too: they leave payloads alone and attach *facts*
(what they proved: tile classes, routing causality, the folded scale) to nodes with
``attach``; lowering reads facts back with ``facts_of`` when it builds the ``KernelPlan``.

Facts live in the networkx node attributes under ``"facts"`` (graph-wide facts in the
graph attributes), so they travel with ``graph.copy()`` and stay out of the structural
fingerprint of the payloads; ``plan_fingerprint`` in ``lower.py`` adds them back.

Adding a pass: write ``def my_pass(graph) -> PassResult`` in ``attncc/passes/my_pass.py``
and put one line in ``pipeline.PIPELINE``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from attncc.ir.graph import AttentionGraph
from attncc.ir.verify import verify

FACTS = "facts"


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the new graph and whether anything changed."""

    graph: AttentionGraph
    modified: bool


GraphPass = Callable[[AttentionGraph], PassResult]


@dataclass
class CompileReport:
    """Per-pass timing and the graph text after every pass (``attncc explain --passes``)."""

    passes: list[tuple[str, float, bool]] = field(default_factory=list)  # name, seconds, modified
    graphs: list[tuple[str, AttentionGraph]] = field(default_factory=list)  # name, graph after it

    @property
    def dumps(self) -> list[tuple[str, str]]:
        """(name, graph text after it): printed on request only, since formatting every
        intermediate graph cost a third of a new variant's compile. Passes are pure, so the
        kept graphs are exactly what each pass produced."""
        return [(name, dump_text(graph)) for name, graph in self.graphs]


# ---- facts ---------------------------------------------------------------------------


def facts_of(graph: AttentionGraph, node_id: str | None = None) -> Mapping[str, Any]:
    """Facts attached to ``node_id`` (graph-wide facts when ``node_id`` is None)."""
    data = graph.nx.graph if node_id is None else graph.nx.nodes[node_id]
    return data.get(FACTS, {})


def attach(graph: AttentionGraph, node_id: str | None = None, **facts: Any) -> AttentionGraph:
    """A copy of ``graph`` with ``facts`` merged into ``node_id``'s facts (or the graph's)."""
    out = graph.copy()
    data = out.nx.graph if node_id is None else out.nx.nodes[node_id]
    data[FACTS] = {**data.get(FACTS, {}), **facts}
    return out


def add_note(graph: AttentionGraph, note: str) -> AttentionGraph:
    """A copy of ``graph`` with ``note`` appended to the plan notes (what a pass decided)."""
    notes = tuple(facts_of(graph).get("notes", ()))
    return attach(graph, notes=(*notes, note))


def format_facts(graph: AttentionGraph) -> str:
    """Facts as text lines, appended to the graph dump so a reader sees what was proved."""
    lines = []
    for key, value in sorted(facts_of(graph).items()):
        if key == "notes":
            lines.extend(f"  note: {note}" for note in value)
        else:
            lines.append(f"  facts {key} = {value}")
    for node_id in graph.topological_order():
        for key, value in sorted(facts_of(graph, node_id).items()):
            lines.append(f"  facts %{node_id}.{key} = {value}")
    return "\n".join(lines)


def dump_text(graph: AttentionGraph) -> str:
    facts = format_facts(graph)
    return f"{graph}\n{facts}" if facts else str(graph)


# ---- running a pipeline --------------------------------------------------------------


def pass_name(fn: GraphPass) -> str:
    return getattr(fn, "pass_name", fn.__name__)


def dump_requested() -> bool:
    return os.environ.get("ATTNCC_DUMP_IR", "") not in ("", "0")


def run_passes(
    graph: AttentionGraph, passes: Sequence[GraphPass], report: CompileReport | None = None
) -> tuple[AttentionGraph, CompileReport]:
    """Run ``passes`` in order; verify after each, time each, record a dump after each."""
    report = report if report is not None else CompileReport()
    verify(graph)
    report.graphs.append(("input", graph))
    echo = dump_requested()
    if echo:
        print(f"// ---- attncc IR: input\n{dump_text(graph)}", file=sys.stderr)
    for fn in passes:
        name = pass_name(fn)
        start = time.perf_counter()
        result = fn(graph)
        seconds = time.perf_counter() - start
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {name!r} returned {type(result).__name__}, expected PassResult")
        verify(result.graph)
        graph = result.graph
        report.passes.append((name, seconds, result.modified))
        report.graphs.append((name, graph))
        if echo:
            print(f"// ---- attncc IR after {name} ({seconds * 1e3:.2f} ms)\n{dump_text(graph)}", file=sys.stderr)
    return graph, report
