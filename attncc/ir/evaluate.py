"""Dense evaluation of ``Expr`` trees on broadcast index tensors: the meaning of each op.

The reference backend, the passes' runtime steps and combine nodes all evaluate expressions
this way, so it lives with the IR rather than in one backend.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from attncc.ir.expr import COMPARE_OPS, Expr, promote

Tensor = torch.Tensor


def _floordiv(a: Tensor, b: Tensor) -> Tensor:
    return torch.div(a, b, rounding_mode="floor")


def _bitwise(int_op: Callable[..., Tensor], bool_op: Callable[..., Tensor]) -> Callable[..., Tensor]:
    return lambda a, b: bool_op(a, b) if a.dtype == torch.bool and b.dtype == torch.bool else int_op(a, b)


_BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "truediv": torch.true_divide,
    "floordiv": _floordiv, "mod": torch.remainder, "pow": torch.pow,
    "minimum": torch.minimum, "maximum": torch.maximum,
    "and": _bitwise(torch.bitwise_and, torch.logical_and),
    "or": _bitwise(torch.bitwise_or, torch.logical_or),
    "xor": _bitwise(torch.bitwise_xor, torch.logical_xor),
    "lshift": torch.bitwise_left_shift, "rshift": torch.bitwise_right_shift,
    "eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge,
}

_UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "neg": torch.neg, "not": torch.logical_not, "invert": torch.bitwise_not, "abs": torch.abs,
    "exp": torch.exp, "exp2": torch.exp2, "log": torch.log, "log2": torch.log2,
    "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "logsigmoid": F.logsigmoid, "relu": torch.relu, "gelu": F.gelu, "softplus": F.softplus,
    "erf": torch.erf, "sin": torch.sin, "cos": torch.cos, "floor": torch.floor,
    "ceil": torch.ceil, "elu": F.elu,
}


def evaluate(
    expr: Expr,
    env: dict[str, Tensor],
    tensors: dict[str, Tensor],
    float_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Evaluate ``expr`` with ``env`` for its variables and ``tensors`` for captured inputs.

    Integers compute in int64, booleans as bool, floats in ``float_dtype``; the result
    broadcasts like the variables in ``env``.
    """
    device = next(iter(env.values())).device if env else torch.device("cpu")
    values: dict[Expr, Tensor] = {}
    for node in expr.walk():
        values[node] = _eval_node(node, [values[s] for s in node.src], env, tensors, float_dtype, device)
    return values[expr]


_TARGETS = {"bool": torch.bool, "int": torch.int64, "float": None}


def _as_dtype(t: Tensor, dtype: str, float_dtype: torch.dtype) -> Tensor:
    target = _TARGETS[dtype] or float_dtype
    return t if t.dtype == target else t.to(target)


def _eval_node(
    node: Expr,
    args: list[Tensor],
    env: dict[str, Tensor],
    tensors: dict[str, Tensor],
    float_dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    op = node.op
    if op == "var":
        return _as_dtype(env[node.arg], node.dtype, float_dtype)
    if op == "const":
        # NOTE: built directly in the target dtype: torch.tensor(0.1) would round through float32.
        return torch.tensor(node.arg, dtype=_TARGETS[node.dtype] or float_dtype, device=device)
    if op == "input":
        return tensors[node.arg.name]
    if op == "load":
        base, *indices = args
        try:
            loaded = base[tuple(i.long() for i in indices)] if indices else base
        except IndexError as err:
            spec = node.src[0].arg
            raise IndexError(
                f"captured tensor {spec.name!r} of shape {tuple(base.shape)} read out of bounds by {node}: {err}"
            ) from None
        return _as_dtype(loaded, node.dtype, float_dtype)
    if op == "cast":
        return _as_dtype(args[0], node.dtype, float_dtype)
    if op == "where":
        cond, a, b = args
        return torch.where(cond, _as_dtype(a, node.dtype, float_dtype), _as_dtype(b, node.dtype, float_dtype))
    if op in _UNARY:
        # NOTE: operands take the node's dtype first (abs of a bool is an int, exp of an int a float).
        x = args[0] if op == "not" else _as_dtype(args[0], node.dtype, float_dtype)
        return _UNARY[op](x)
    a, b = args
    # NOTE: operands take the node's dtype (a comparison: the wider operand's), so bool + bool
    # is an int sum and int < float compares as floats, as the IR's typing rules say.
    target = promote(*(s.dtype for s in node.src)) if op in COMPARE_OPS else node.dtype
    a, b = _as_dtype(a, target, float_dtype), _as_dtype(b, target, float_dtype)
    return _BINARY[op](a, b)
