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

from attncc.ir.expr import Expr
from attncc.passes.causality import conjuncts
from attncc.passes.int_bounds import static_bound

_INEQUALITIES = frozenset({"lt", "le", "gt", "ge"})


# NOTE: an affine form bounded by 2**53 over positions up to MAX_POSITIONS neither wraps in int64
# nor loses an integer in float64
AFFINE_BOUND = 1 << 53


def _affine_in_positions(e: Expr) -> bool:
    """Integer ``e`` affine in ``q_idx`` and ``kv_idx``: sums, differences, negations and
    products with a constant factor."""
    if e.dtype != "int":
        return False
    if e.op == "const":
        return True
    if e.op == "var":
        return e.arg in ("q_idx", "kv_idx")
    if e.op in ("add", "sub"):
        return all(_affine_in_positions(s) for s in e.src)
    if e.op == "neg":
        return _affine_in_positions(e.src[0])
    if e.op == "mul":
        return any(s.op == "const" for s in e.src) and all(_affine_in_positions(s) for s in e.src)
    return False


def is_halfplane(term: Expr) -> bool:
    """Why the bound: past 2**63 int64 wraps (``q_idx * 2**62 > 0`` holds at 1, fails at 2, holds
    at 5), so the set is no half-plane, and corners say nothing of the box between them."""
    if term.op not in _INEQUALITIES or not all(_affine_in_positions(s) for s in term.src):
        return False
    return sum(static_bound(s) for s in term.src) <= AFFINE_BOUND


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

