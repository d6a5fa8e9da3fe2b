"""``explain()``: the graph, the passes that ran, the plan, and which backend ran and why."""

from __future__ import annotations

from typing import TYPE_CHECKING

from attncc.ir.printer import format_expr

if TYPE_CHECKING:
    from attncc.passes.plan import AttentionRegion, KernelPlan
    from attncc.variant import Program


# NOTE: ``explain --blocks L --tile T`` builds (ceil(L/T))^2 tiles per (b, h) slice, with float64
# interval temporaries per tile and one printed character each: 2^22 is 2048 x 2048 at --tile 1.
MAX_BLOCK_TILES = 1 << 22


def block_grid_error(L: int, tile: tuple[int, int]) -> str | None:
    """Why a block map of ``L x L`` in ``tile`` tiles is too large to build and print, or None.

    Checked before anything is allocated: an unbounded map (``--blocks 100000 --tile 1``) is
    killed for memory instead of failing with a message.
    """
    rows, cols = -(-L // tile[0]), -(-L // tile[1])
    if rows * cols <= MAX_BLOCK_TILES:
        return None
    return (f"--blocks {L} with --tile {tile[0]}x{tile[1]} gives {rows} x {cols} = {rows * cols} tiles per map, "
            f"more than {MAX_BLOCK_TILES}; use a smaller --blocks or a larger --tile")


def _region_lines(region: AttentionRegion) -> list[str]:
    describe = lambda p: p.describe() if hasattr(p, "describe") else repr(p)
    lines = [f"  region %{region.node}: q=%{region.q} k=%{region.k} v=%{region.v}"]
    lines.append(f"    score      = {format_expr(region.score) if region.score is not None else 'score'}")
    lines.append(f"    mask       = {format_expr(region.mask) if region.mask is not None else 'none'}")
    lines.append(f"    normalizer = {describe(region.normalizer)}")
    if region.routing is not None:
        lines.append(f"    routing    = {describe(region.routing)} causal={region.routing_causal}")
    if region.sparsity is not None:
        lines.append(f"    sparsity   = {region.sparsity}")
    return lines


def format_plan(plan: KernelPlan) -> str:
    lines = [f"plan {plan.fingerprint[:16]} strategy={plan.strategy}"]
    for region in plan.regions:
        lines.extend(_region_lines(region))
    if plan.combine is not None:
        lines.append(f"  combine {format_expr(plan.combine)} with "
                     + ", ".join(f"{name}=%{n}" for name, n in plan.combine_operands))
    lines.extend(f"  note: {note}" for note in plan.notes)
    return "\n".join(lines)


def _tuning_lines(fingerprint: str) -> list[str]:
    """Which config each backend used for this plan and where it came from (cache, pin, default)."""
    try:
        from attncc.autotune.lookup import explain_lines
    except ImportError:
        return []
    return explain_lines(fingerprint)


def explain_program(program: Program, source: bool = False) -> str:
    sections = [str(program.ir)]
    report = program.report
    if report.passes:
        rows = [f"  {name:<24} {seconds * 1e3:8.2f} ms  {'modified' if modified else 'unchanged'}"
                for name, seconds, modified in report.passes]
        sections.append("passes:\n" + "\n".join(rows))
    else:
        sections.append("passes: (none ran)")
    sections.append(format_plan(program.plan))
    choice = program.last_choice
    sections.append(f"backend: {choice.backend.name} ({choice.reason})" if choice else "backend: not run yet")
    tuning = _tuning_lines(program.plan.fingerprint)
    if tuning:
        sections.append("tuning configs:\n" + "\n".join(f"  {line}" for line in tuning))
    if source and choice is not None and hasattr(choice.backend, "source"):
        sections.append(choice.backend.source(program.plan))
    return "\n\n".join(sections)
