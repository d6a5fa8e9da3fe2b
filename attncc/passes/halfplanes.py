"""The conjuncts of a mask that are half-planes in ``(q_idx, kv_idx)``, for sparsity below a tile.

A half-plane ``a*q_idx + b*kv_idx + c < 0`` (or ``<=``, ``>``, ``>=``) and its complement are
both convex, so it is false on a whole box of (query, key) pairs exactly when it is false at
the box's four corners. A kernel can then skip a register block of a PARTIAL tile (the
diagonal of a causal mask, both edges of a sliding window) after four scalar tests, where the
block tables only skip whole tiles. ``eq`` / ``ne`` and anything that reads ``b``, ``h`` or a
tensor are left out: their sets are not convex, or not known at code-generation time.
"""

from __future__ import annotations

import functools

from attncc.ir.expr import MAX_POSITIONS, Expr
from attncc.passes.causality import conjuncts

_INEQUALITIES = frozenset({"lt", "le", "gt", "ge"})


# NOTE: an affine form bounded by 2**53 over positions up to MAX_POSITIONS neither wraps in int64
# nor loses an integer in float64
AFFINE_BOUND = 2.0**53


def _affine_magnitude(e: Expr) -> float | None:
    """A bound on ``|e|`` for integer ``e`` affine in ``q_idx`` and ``kv_idx`` (sums, differences,
    negations and products with a constant factor), else None."""
    if e.dtype != "int":
        return None
    if e.op == "const":
        return abs(float(e.arg))
    if e.op == "var":
        return float(MAX_POSITIONS) if e.arg in ("q_idx", "kv_idx") else None
    if e.op in ("add", "sub", "neg", "mul"):
        parts = [_affine_magnitude(s) for s in e.src]
        if any(p is None for p in parts):
            return None
        if e.op != "mul":
            return sum(parts)
        if not any(s.op == "const" for s in e.src):
            return None
        return parts[0] * parts[1]
    return None


def is_halfplane(term: Expr) -> bool:
    """Why the bound: past 2**63 int64 wraps (``q_idx * 2**62 > 0`` holds at 1, fails at 2, holds
    at 5), so the set is no half-plane, and corners say nothing of the box between them."""
    if term.op not in _INEQUALITIES:
        return False
    bounds = [_affine_magnitude(s) for s in term.src]
    return all(b is not None for b in bounds) and sum(bounds) <= AFFINE_BOUND


def halfplane_conjuncts(mask: Expr | None) -> tuple[Expr, ...]:
    """The half-plane conjuncts of ``mask`` (empty when it has none, or is None)."""
    if mask is None:
        return ()
    return tuple(t for t in conjuncts(mask) if is_halfplane(t))


@functools.lru_cache(maxsize=512)
def only_halfplanes(mask: Expr | None) -> bool:
    """Every conjunct of ``mask`` is a half-plane (causal, sliding windows): a kernel that skips
    register blocks by ``halfplane_conjuncts`` loses little at a band's edges at any tile size.
    Memoized: launches ask it per call, and an ``Expr`` carries its hash."""
    return mask is not None and len(halfplane_conjuncts(mask)) == len(conjuncts(mask))

