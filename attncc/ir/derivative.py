"""Symbolic derivative of a score function with respect to its ``score`` argument.

Every backend's backward kernels need ``d score_fn / d score`` at every kept position: the
chain rule turns ``dP``-space gradients into gradients of ``q . k``. We differentiate the ``Expr``
forward-mode, node by node, one rule per op (``RULES``); ops without a rule make the
backward decline (and the autograd Function fall back to the reference backward).
Integer and boolean nodes carry no derivative; captured tensors are constants here
(their own gradients are the fallback's business).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from attncc.ir.expr import Expr, binary, const, unary, var, where

E = Expr
Rule = Callable[[E, tuple[E, ...], tuple[E | None, ...]], E | None]

ZERO_DERIVATIVE_OPS = {"floor", "ceil", "floordiv"}


def _add(x: E | None, y: E | None) -> E | None:
    if x is None:
        return y
    if y is None:
        return x
    return binary("add", x, y)


def _mul(x: E | None, y: E) -> E | None:
    return None if x is None else binary("mul", x, y)


def _neg(x: E | None) -> E | None:
    return None if x is None else unary("neg", x)


def _chain(local: Callable[[E, E], E]) -> Rule:
    """A unary rule: d f(a) = f'(a) * da, with ``local(node, a)`` giving f'(a)."""
    return lambda node, src, d: _mul(d[0], local(node, src[0]))


HALF, ONE, TWO = const(0.5), const(1.0), const(2.0)

RULES: dict[str, Rule] = {
    "add": lambda n, s, d: _add(d[0], d[1]),
    "sub": lambda n, s, d: _add(d[0], _neg(d[1])),
    "mul": lambda n, s, d: _add(_mul(d[0], s[1]), _mul(d[1], s[0])),
    "truediv": lambda n, s, d: _add(
        _mul(d[0], binary("truediv", ONE, s[1])),
        _neg(_mul(d[1], binary("truediv", n, s[1]))),
    ),
    "neg": lambda n, s, d: _neg(d[0]),
    "abs": lambda n, s, d: None if d[0] is None else where(binary("lt", s[0], const(0)), unary("neg", d[0]), d[0]),
    "relu": lambda n, s, d: None if d[0] is None else where(binary("gt", s[0], const(0)), d[0], const(0.0)),
    "exp": _chain(lambda n, a: n),
    "exp2": _chain(lambda n, a: binary("mul", n, const(math.log(2.0)))),
    "log": _chain(lambda n, a: binary("truediv", ONE, a)),
    "log2": _chain(lambda n, a: binary("truediv", const(1.0 / math.log(2.0)), a)),
    "sqrt": _chain(lambda n, a: binary("truediv", HALF, n)),
    "rsqrt": _chain(lambda n, a: binary("mul", const(-0.5), binary("mul", n, binary("mul", n, n)))),
    "tanh": _chain(lambda n, a: binary("sub", ONE, binary("mul", n, n))),
    "sigmoid": _chain(lambda n, a: binary("mul", n, binary("sub", ONE, n))),
    "logsigmoid": _chain(lambda n, a: unary("sigmoid", unary("neg", a))),
    "softplus": _chain(lambda n, a: where(binary("gt", a, const(20.0)), ONE, unary("sigmoid", a))),
    "erf": _chain(
        lambda n, a: binary("mul", const(2.0 / math.sqrt(math.pi)), unary("exp", unary("neg", binary("mul", a, a))))
    ),
    "gelu": _chain(
        lambda n, a: binary(
            "add",
            binary("mul", HALF, binary("add", ONE, unary("erf", binary("mul", a, const(1.0 / math.sqrt(2.0)))))),
            binary("mul", a, binary("mul", const(1.0 / math.sqrt(2.0 * math.pi)),
                                    unary("exp", binary("mul", const(-0.5), binary("mul", a, a))))),
        )
    ),
    "sin": _chain(lambda n, a: unary("cos", a)),
    "cos": _chain(lambda n, a: unary("neg", unary("sin", a))),
    "elu": _chain(lambda n, a: where(binary("gt", a, const(0.0)), ONE, unary("exp", a))),
    "where": lambda n, s, d: None if d[1] is None and d[2] is None else where(
        s[0], d[1] or const(0.0), d[2] or const(0.0)),
    "minimum": lambda n, s, d: None if d[0] is None and d[1] is None else where(
        binary("le", s[0], s[1]), d[0] or const(0.0), d[1] or const(0.0)),
    "maximum": lambda n, s, d: None if d[0] is None and d[1] is None else where(
        binary("ge", s[0], s[1]), d[0] or const(0.0), d[1] or const(0.0)),
    "mod": lambda n, s, d: _add(d[0], _neg(_mul(d[1], unary("floor", binary("truediv", s[0], s[1]))))),
    "pow": lambda n, s, d: _add(
        _mul(d[0], binary("mul", s[1], binary("pow", s[0], binary("sub", s[1], const(1))))),
        _mul(d[1], binary("mul", n, unary("log", s[0]))),
    ),
    "cast": lambda n, s, d: d[0] if n.dtype == "float" else None,
}


def score_derivative(expr: Expr) -> Expr | None:
    """``d expr / d score`` as an Expr (None when it is identically zero).

    Raises ``NotImplementedError`` naming the op when a float node has no rule.
    """
    return derivative(expr, var("score"))


def score_derivative_problem(expr: Expr, unsupported: Callable[[Expr], str | None]) -> str | None:
    """Why a backend cannot render ``d expr / d score`` (no rule for an op, or its renderer's
    ``unsupported`` refuses the derivative), or None; every backward checker asks this."""
    try:
        local = score_derivative(expr)
    except NotImplementedError as err:
        return str(err)
    return unsupported(local) if local is not None else None


def derivative(expr: Expr, target: Expr) -> Expr | None:
    """``d expr / d target`` for any float node ``target`` of ``expr`` (a var or a load)."""
    tangent: dict[Expr, Expr | None] = {}
    for node in expr.walk():
        if node == target:
            tangent[node] = const(1.0)
            continue
        if node.op in ("var", "load"):
            tangent[node] = None
            continue
        derivs = tuple(tangent[s] for s in node.src)
        if node.dtype != "float" or node.op in ZERO_DERIVATIVE_OPS or all(d is None for d in derivs):
            tangent[node] = None
            continue
        rule = RULES.get(node.op)
        if rule is None:
            raise NotImplementedError(f"no derivative rule for op {node.op!r}")
        tangent[node] = rule(node, node.src, derivs)
    return tangent[expr]
