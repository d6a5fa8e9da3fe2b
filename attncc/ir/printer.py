"""Readable text for expressions and attention graphs (what ``explain`` and dumps show)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from attncc.ir.expr import Expr

if TYPE_CHECKING:
    from attncc.ir.graph import AttentionGraph

INFIX = {
    "add": ("+", 4), "sub": ("-", 4), "mul": ("*", 5), "truediv": ("/", 5),
    "floordiv": ("//", 5), "mod": ("%", 5), "pow": ("**", 7),
    "and": ("&", 2), "or": ("|", 0), "xor": ("^", 1), "lshift": ("<<", 3), "rshift": (">>", 3),
    "eq": ("==", -1), "ne": ("!=", -1), "lt": ("<", -1), "le": ("<=", -1),
    "gt": (">", -1), "ge": (">=", -1),
}
UNARY_PREC = 6  # unary minus and ~ bind tighter than * but looser than **


def format_expr(expr: Expr) -> str:
    """Python-like text that, read back with the same names, computes the same values."""
    return _fmt(expr, -2)


def _fmt(e: Expr, parent_prec: int) -> str:
    if e.op == "var":
        return e.arg
    if e.op == "const":
        text = repr(e.arg)
        # NOTE: "-2 ** 2" is -(2 ** 2) in Python; a negative base needs parentheses.
        return f"({text})" if text.startswith("-") and parent_prec >= UNARY_PREC else text
    if e.op == "input":
        return e.arg.name
    if e.op == "load":
        if len(e.src) == 1:  # a 0-dim tensor read as a scalar
            return _fmt(e.src[0], 9)
        return f"{_fmt(e.src[0], 9)}[{', '.join(_fmt(s, -2) for s in e.src[1:])}]"
    if e.op in INFIX:
        symbol, prec = INFIX[e.op]
        right_prec = prec + 1 if e.op != "pow" else prec
        text = f"{_fmt(e.src[0], prec)} {symbol} {_fmt(e.src[1], right_prec)}"
        return f"({text})" if prec <= parent_prec else text
    if e.op == "not" and _constant(e.src[0]):
        # NOTE: read back, a constant operand is a Python bool, and ~False is -1, not True
        return f"(not {_fmt(e.src[0], UNARY_PREC)})"
    if e.op in ("neg", "not", "invert"):
        text = f"{'-' if e.op == 'neg' else '~'}{_fmt(e.src[0], UNARY_PREC)}"
        return f"({text})" if parent_prec >= UNARY_PREC else text
    if e.op == "cast":
        return f"{e.arg}({_fmt(e.src[0], -2)})"
    return f"{e.op}({', '.join(_fmt(s, -2) for s in e.src)})"


def _constant(e: Expr) -> bool:
    """Whether ``e`` reads no index, score or tensor: Python computes it on plain numbers."""
    return not any(node.op in ("var", "input", "load") for node in e.walk())


def format_graph(graph: AttentionGraph) -> str:
    """One line per node in topological order: ``%id = Kind(fields) <- operands``."""
    lines = [f"graph {graph.name} fingerprint={graph.fingerprint[:16]}"]
    for node_id in graph.topological_order():
        payload = graph.payload(node_id)
        operands = graph.operands(node_id)
        operand_text = ", ".join(f"{role}=%{src}" for role, src in operands.items())
        text = payload.describe() if hasattr(payload, "describe") else repr(payload)
        arrow = f" <- {operand_text}" if operand_text else ""
        lines.append(f"  %{node_id} = {text}{arrow}")
    lines.append(f"  return {', '.join('%' + o for o in graph.outputs)}")
    return "\n".join(lines)
