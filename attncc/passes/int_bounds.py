"""Static bounds on integer expressions: half-planes that stay convex, and expressions a backend
must decline because they may wrap.

Why: torch computes index arithmetic in int64, which wraps past 2**63. A kernel that computes it
narrower (Triton's int32 positions wrap past 2**31) or whose compiler assumes it never wraps
(TVM's simplifier folds ``q_idx * 2**62 > 0`` into ``q_idx > 0``; a constant sum past 2**63 fails
its build) gives other values, so such an expression runs on the reference backend.

The bounds are static: positions below ``MAX_POSITIONS`` (``call_ranges`` refuses longer calls),
batch and head indices below 2**31. A loaded integer is the data's, unknown here; an expression
over one is judged only where a factor or shift past 2**31 scales it (``ids[kv_idx] * 2**62``).
"""

from __future__ import annotations

from attncc.ir.expr import INDEX_VARS, MAX_POSITIONS, Expr

INT32_BOUND = 1 << 31


def static_bound(expr: Expr) -> int | None:
    """A bound on ``|expr|`` over every call, for an integer ``expr``; None where the data decide."""
    bounds: dict[Expr, int | None] = {}
    for node in expr.walk():  # children first
        bounds[node] = _int_bound(node, [bounds.get(s) for s in node.src])
    return bounds[expr]


def may_wrap(expr: Expr, limit: int) -> str | None:
    """Why ``expr`` may pass ``limit`` in magnitude in one of its integer nodes, or None."""
    bounds: dict[Expr, int | None] = {}
    for node in expr.walk():  # children first
        args = [bounds.get(s) for s in node.src]
        bound = bounds[node] = _int_bound(node, args)
        if node.dtype == "int" and ((bound is not None and bound > limit) or _scales_unknown(node, args)):
            return f"integer expression {node} may pass 2**{limit.bit_length() - 1} (torch's int64 wraps at 2**63)"
    return None


def _scales_unknown(node: Expr, args: list[int | None]) -> bool:
    """A product or left shift of a value of unknown size by a factor past 2**31."""
    if node.op not in ("mul", "lshift") or all(a is not None for a in args) or all(a is None for a in args):
        return False
    if node.op == "lshift":
        amount = node.src[1]
        return amount.op == "const" and 31 <= amount.arg < 64
    known = next(a for a in args if a is not None)
    return known > INT32_BOUND


def _int_bound(node: Expr, args: list[int | None]) -> int | None:
    """A static bound on ``|node|`` for an integer node, from its operands' bounds; None: unknown."""
    if node.dtype != "int":
        return 1 if node.dtype == "bool" else None
    op = node.op
    if op == "const":
        return abs(int(node.arg))
    if op == "var":
        if node.arg in ("q_idx", "kv_idx"):
            return MAX_POSITIONS
        return INT32_BOUND if node.arg in INDEX_VARS else None
    if op == "cast" or op in ("neg", "abs", "relu", "floordiv", "rshift", "invert"):
        return None if args[0] is None else args[0] + 1
    if any(a is None for a in args):
        return None
    if op in ("add", "sub", "minimum", "maximum", "and", "or", "xor", "where"):
        return sum(args)
    if op == "mul":
        return args[0] * args[1]
    if op == "lshift":  # by a constant below 64 (past 63 the kernels give 0, as torch)
        amount = node.src[1]
        return args[0] << amount.arg if amount.op == "const" and 0 <= amount.arg < 64 else None
    if op == "pow" and node.src[1].op == "const" and isinstance(node.src[1].arg, int) and 0 <= node.src[1].arg <= 64:
        return args[0] ** node.src[1].arg
    if op == "mod":
        return args[1]
    return None
