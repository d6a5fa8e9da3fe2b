"""Does a mask provably keep only ``kv_idx <= q_idx``? (routing causality, decay checks)

A structural proof over the mask's conjunction: it holds when one conjunct is a causal
comparison. Conservative: ``False`` means "not proven", never "proven non-causal".
"""

from __future__ import annotations

from attncc.ir.expr import Expr

_CAUSAL_FORMS = {
    ("ge", "q_idx", "kv_idx"), ("le", "kv_idx", "q_idx"),
    ("gt", "q_idx", "kv_idx"), ("lt", "kv_idx", "q_idx"),
}


def conjuncts(expr: Expr) -> list[Expr]:
    if expr.op == "and" and expr.dtype == "bool":
        return conjuncts(expr.src[0]) + conjuncts(expr.src[1])
    return [expr]


def _is_causal_term(term: Expr) -> bool:
    if len(term.src) != 2 or not all(s.op == "var" for s in term.src):
        return _is_difference_form(term)
    return (term.op, term.src[0].arg, term.src[1].arg) in _CAUSAL_FORMS


def _is_difference_form(term: Expr) -> bool:
    """``q_idx - kv_idx >= 0`` or ``kv_idx - q_idx <= 0`` (and the strict forms)."""
    if term.op not in ("ge", "gt", "le", "lt") or len(term.src) != 2:
        return False
    left, right = term.src
    if right.op != "const" or right.arg != 0 or left.op != "sub":
        return False
    names = tuple(s.arg if s.op == "var" else None for s in left.src)
    if term.op in ("ge", "gt"):
        return names == ("q_idx", "kv_idx")
    return names == ("kv_idx", "q_idx")


def mask_implies_causal(mask: Expr | None) -> bool:
    return mask is not None and any(_is_causal_term(t) for t in conjuncts(mask))


_STRICT = {("gt", "q_idx", "kv_idx"), ("lt", "kv_idx", "q_idx")}


def exact_causal_kind(mask: Expr | None) -> str | None:
    """``"inclusive"`` for exactly ``kv_idx <= q_idx``, ``"strict"`` for ``kv_idx < q_idx``, else None.

    Linear attention's chunked form is exact only when the mask is causal and nothing more.
    """
    if mask is None or not _is_causal_term(mask):
        return None
    if len(mask.src) == 2 and all(s.op == "var" for s in mask.src):
        strict = (mask.op, mask.src[0].arg, mask.src[1].arg) in _STRICT
    else:
        strict = mask.op in ("gt", "lt")
    return "strict" if strict else "inclusive"
