"""Symbolic tracing of score, mask and pointwise functions into ``Expr`` trees.

Users write FlexAttention-style functions for one element. We call them once with
``Symbol`` arguments, a ``torch.Tensor`` subclass whose ``__torch_function__`` records each
operation instead of computing it, so nothing is ever evaluated on an ``Lq x Lkv`` grid.
Real tensors the function touches (``doc_ids[q_idx]``, ``slopes[h]``) become named inputs.
"""

from __future__ import annotations

import math
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from attncc.ir import expr as ex
from attncc.ir.expr import Expr, TensorSpec

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))

_TORCH_DTYPES = {"float": torch.float32, "int": torch.int64, "bool": torch.bool}


class TraceError(Exception):
    """A user function uses something attncc cannot turn into IR.

    NOTE: not a TypeError: torch turns a TypeError raised inside ``a & b`` or ``x *= 0.5``
    into ``NotImplemented``, and Python would then retry another way and lose the message.
    """


class CaptureDeviceError(ValueError):
    """Captured tensors live on different devices."""


@dataclass
class Captures:
    """Real tensors met while tracing, by identity, with stable names."""

    specs: dict[int, TensorSpec] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, tensor: torch.Tensor, hint: str | None) -> TensorSpec:
        """Name ``tensor`` (once); every captured tensor must live on one device."""
        if id(tensor) in self.specs:
            return self.specs[id(tensor)]
        for other_name, other in self.tensors.items():
            if other.device != tensor.device:
                raise CaptureDeviceError(
                    f"a tensor captured on device {tensor.device} while {other_name!r} is on {other.device}; "
                    "all captured tensors must be on one device"
                )
        name = _unique(hint or "capture", self.tensors)
        dtype = str(tensor.dtype).removeprefix("torch.")
        spec = TensorSpec(name, tuple(tensor.shape), dtype)
        self.specs[id(tensor)] = spec
        self.tensors[name] = tensor
        return spec


def _unique(name: str, taken: dict[str, Any]) -> str:
    if name not in taken:
        return name
    n = 1
    while f"{name}_{n}" in taken:
        n += 1
    return f"{name}_{n}"


@dataclass
class _Context:
    fn_name: str
    captures: Captures


_ACTIVE: list[_Context] = []


class Symbol(torch.Tensor):
    """A traced scalar: carries the ``Expr`` computed so far."""

    expr: Expr

    @staticmethod
    def __new__(cls, expression: Expr) -> Symbol:
        placeholder = torch.empty((), dtype=_TORCH_DTYPES[expression.dtype], device="meta")
        sym = torch.Tensor._make_subclass(cls, placeholder)
        sym.expr = expression
        return sym

    def __repr__(self) -> str:
        return f"Symbol({self.expr})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name == "__get__" or name in _PASSTHROUGH:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        handler = _HANDLERS.get(name)
        if handler is None and name.endswith("_") and not name.startswith("_"):
            handler = _HANDLERS.get(name[:-1])  # x += 1 arrives as add_, x *= 2 as mul_
        if handler is None:
            raise _error(f"unsupported torch function or method '{_qualname(func)}'")
        result = handler(*args, **kwargs)
        if _is_inplace(name) and args and isinstance(args[0], Symbol) and isinstance(result, Expr):
            return _update_in_place(args[0], result, name)
        return Symbol(result) if isinstance(result, Expr) else result


def _is_inplace(name: str) -> bool:
    """``x &= m``, ``x.add_(1)``, ``torch.relu_(x)``: torch changes ``x`` itself."""
    return name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("_"))


_INPLACE_DUNDERS = {
    f"__i{op}__" for op in ("add", "sub", "mul", "div", "truediv", "floordiv", "mod", "pow", "and", "or", "xor",
                            "lshift", "rshift")
}


def _update_in_place(target: Symbol, result: Expr, name: str) -> Symbol:
    """Mutate ``target`` as eager torch would, so aliases of it (the caller's q_idx) see the change."""
    if ex.promote(result.dtype, target.expr.dtype) != target.expr.dtype:
        raise _error(f"in-place '{name}' would turn a {target.expr.dtype} value into {result.dtype}")
    target.expr = ex.cast(result, target.expr.dtype)
    return target


_PASSTHROUGH = {"__repr__", "__format__", "__hash__", "dim", "size", "numel", "__len__"}


def _qualname(func: Any) -> str:
    """The name a user wrote: ``torch.cumsum``, ``Tensor.sort``, ``torch.nn.functional.conv1d``."""
    name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
    module = getattr(func, "__module__", None) or ""
    head, _, tail = name.rpartition(".")
    if head in ("_VariableFunctionsClass", "_VariableFunctions"):
        return f"torch.{tail}"
    if head in ("TensorBase", "Tensor", "_TensorBase"):
        return f"Tensor.{tail}"
    if module.startswith("torch") and not head:
        return f"{module}.{name}"
    return name


def _is_internal(filename: str) -> bool:
    """Frames of attncc or torch themselves; errors point at the user's line instead."""
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE_DIR) or path.startswith(_TORCH_DIR)


def _user_frame() -> traceback.FrameSummary | None:
    for frame in reversed(traceback.extract_stack()):
        if not _is_internal(frame.filename):
            return frame
    return None


def _error(construct: str) -> TraceError:
    fn_name = _ACTIVE[-1].fn_name if _ACTIVE else "<function>"
    frame = _user_frame()
    if frame is not None and frame.name not in (fn_name, fn_name.rpartition(".")[2]):
        fn_name = f"{fn_name} (in {frame.name})"
    where = f"{frame.filename}:{frame.lineno}" if frame else "<unknown>"
    source = f"\n    {frame.line}" if frame and frame.line else ""
    return TraceError(f"cannot trace {fn_name} at {where}: {construct}{source}")


def _capture_name(tensor: torch.Tensor) -> str | None:
    """The name the user gave ``tensor`` in the calling frame (closure or global)."""
    import sys

    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not (path.startswith(_PACKAGE_DIR) or path.startswith(_TORCH_DIR)):
            for scope in (frame.f_locals, frame.f_globals):
                for key, value in scope.items():
                    if value is tensor and not key.startswith("_"):
                        return key
        frame = frame.f_back
    return None


# ---- converting operands ------------------------------------------------------------


def as_expr(value: Any) -> Expr:
    if isinstance(value, Symbol):
        return value.expr
    if isinstance(value, bool | int | float):
        return ex.const(value)
    if isinstance(value, torch.Tensor):
        return _captured(value)
    raise _error(f"unsupported operand of type {type(value).__name__}")


def _captured(tensor: torch.Tensor) -> Expr:
    context = _ACTIVE[-1]
    if tensor.is_complex():
        raise _error("complex tensors cannot be captured")
    try:
        spec = context.captures.add(tensor, _capture_name(tensor))
    except CaptureDeviceError as err:
        raise _error(str(err)) from None
    return ex.input_ref(spec)


def _scalar(value: Any) -> Expr:
    expression = as_expr(value)
    if expression.op == "input":
        if expression.arg.shape not in ((), (1,)):
            raise _error(
                f"captured tensor {expression.arg.name!r} of shape {expression.arg.shape} "
                "used as a scalar; index it (for example slopes[h])"
            )
        return ex.load(expression, (ex.const(0),) * len(expression.arg.shape))
    if expression.shape:
        raise _error(f"partially indexed tensor of remaining shape {expression.shape} used as a scalar")
    return expression


# ---- handlers -----------------------------------------------------------------------


def _binary(op: str, reflected: bool = False) -> Callable[..., Expr]:
    def handler(a: Any, b: Any, *rest: Any, **kwargs: Any) -> Expr:
        if rest or kwargs.get("alpha", 1) != 1:
            raise _error(f"'{op}' with extra arguments {rest or kwargs}")
        left, right = _scalar(a), _scalar(b)
        if reflected:
            left, right = right, left
        if op in ("and", "or", "xor") and {left.dtype, right.dtype} == {"bool", "int"}:
            left, right = ex.cast(left, "int"), ex.cast(right, "int")
        try:
            return ex.binary(op, left, right)
        except TypeError as err:
            raise _error(str(err)) from None

    return handler


def _unary(op: str) -> Callable[..., Expr]:
    def handler(a: Any, *rest: Any, **kwargs: Any) -> Expr:
        if rest or any(v is not None for k, v in kwargs.items() if k not in ("inplace",)):
            raise _error(f"'{op}' with extra arguments {rest or kwargs}")
        return ex.unary(op, _scalar(a))

    return handler


def _logical(op: str) -> Callable[..., Expr]:
    """``torch.logical_*`` read any nonzero value as True, unlike the bitwise operators."""

    def handler(a: Any, b: Any, *rest: Any, **kwargs: Any) -> Expr:
        if rest or kwargs:
            raise _error(f"'logical_{op}' with extra arguments {rest or kwargs}")
        return ex.binary(op, ex.cast(_scalar(a), "bool"), ex.cast(_scalar(b), "bool"))

    return handler


def _logical_not(a: Any, *rest: Any, **kwargs: Any) -> Expr:
    if rest or kwargs:
        raise _error(f"'logical_not' with extra arguments {rest or kwargs}")
    return ex.unary("not", ex.cast(_scalar(a), "bool"))


def _invert(a: Any) -> Expr:
    operand = _scalar(a)
    return ex.unary("not" if operand.dtype == "bool" else "invert", operand)


def _div(a: Any, b: Any, *, rounding_mode: str | None = None) -> Expr:
    if rounding_mode not in (None, "floor"):
        raise _error(f"division with rounding_mode={rounding_mode!r}")
    return ex.binary("floordiv" if rounding_mode else "truediv", _scalar(a), _scalar(b))


def _where(cond: Any, a: Any = None, b: Any = None) -> Expr:
    if a is None or b is None:
        raise _error("torch.where with one argument")
    return ex.where(ex.cast(_scalar(cond), "bool"), _scalar(a), _scalar(b))


def _masked_fill(a: Any, mask: Any, value: Any) -> Expr:
    """``a.masked_fill(mask, value)`` is ``where(mask, value, a)``."""
    return ex.where(ex.cast(_scalar(mask), "bool"), _scalar(value), _scalar(a))


def _clamp(a: Any, min: Any = None, max: Any = None) -> Expr:
    result = _scalar(a)
    if min is not None:
        result = ex.binary("maximum", result, _scalar(min))
    if max is not None:
        result = ex.binary("minimum", result, _scalar(max))
    return result


def _min_max(op: str, name: str) -> Callable[..., Expr]:
    """``torch.minimum(a, b)``; ``torch.min(a, b)`` only with two values (``min(a, 0)`` reduces dim 0)."""

    def handler(a: Any, b: Any = None, *rest: Any, **kwargs: Any) -> Expr:
        dim_like = name in ("min", "max") and isinstance(b, int) and not isinstance(b, bool)
        if b is None or rest or kwargs or dim_like:
            raise _error(f"torch.{name} as a reduction; use torch.{op}(a, b) on two values")
        return ex.binary(op, _scalar(a), _scalar(b))

    return handler


def _softplus(a: Any, beta: float = 1.0, threshold: float = 20.0) -> Expr:
    x = _scalar(a)
    if beta == 1.0:
        return ex.unary("softplus", x)
    scaled = ex.unary("softplus", ex.binary("mul", x, ex.const(float(beta))))
    return ex.binary("truediv", scaled, ex.const(float(beta)))


def _gelu(a: Any, approximate: str = "none") -> Expr:
    if approximate != "none":
        raise _error(f"gelu with approximate={approximate!r}")
    return ex.unary("gelu", _scalar(a))


def _elu(a: Any, alpha: float = 1.0, inplace: bool = False) -> Expr:
    if alpha != 1.0:
        raise _error(f"elu with alpha={alpha}")
    return ex.unary("elu", _scalar(a))


def _square(a: Any) -> Expr:
    x = _scalar(a)
    return ex.binary("mul", x, x)


def _to_dtype(target: Any) -> str:
    if target in (torch.bool,):
        return "bool"
    if isinstance(target, torch.dtype):
        return "float" if target.is_floating_point else "int"
    raise _error(f"conversion to {target!r}")


def _to(a: Any, *args: Any, **kwargs: Any) -> Expr:
    target = kwargs.get("dtype")
    for arg in args:
        if isinstance(arg, torch.dtype):
            target = arg
    x = _scalar(a)
    return x if target is None else ex.cast(x, _to_dtype(target))


def _fixed_cast(dtype: str) -> Callable[..., Expr]:
    def handler(a: Any, *args: Any, **kwargs: Any) -> Expr:
        return ex.cast(_scalar(a), dtype)

    return handler


def _new_const(fill: Any) -> Callable[..., Expr]:
    def handler(a: Any, size: Any = (), *args: Any, dtype: Any = None, **kwargs: Any) -> Expr:
        if tuple(size) not in ((), (1,)):
            raise _error(f"new tensor of size {tuple(size)}; only scalars exist inside attention functions")
        base_dtype = _to_dtype(dtype) if dtype is not None else _scalar(a).dtype
        value = fill if fill is not None else args[0]
        return ex.cast(ex.const(value), base_dtype) if base_dtype != "bool" else ex.const(bool(value))

    return handler


def _like(fill: Any) -> Callable[..., Expr]:
    def handler(a: Any, *args: Any, dtype: Any = None, **kwargs: Any) -> Expr:
        value = fill if fill is not None else args[0]
        target = _to_dtype(dtype) if dtype is not None else _scalar(a).dtype
        return ex.cast(ex.const(value), target) if target != "bool" else ex.const(bool(value))

    return handler


def _getitem(base: Any, index: Any) -> Expr:
    indices = index if isinstance(index, tuple) else (index,)
    if any(i is None or i is Ellipsis or isinstance(i, slice) for i in indices):
        raise _error("slicing, None or ... in an index; index captured tensors by scalars")
    if isinstance(base, Symbol):
        base_expr = base.expr
        if not base_expr.shape:
            raise _error("indexing a scalar traced value")
    elif isinstance(base, torch.Tensor):
        base_expr = _captured(base)
    else:
        raise _error(f"indexing a {type(base).__name__}")
    index_exprs = tuple(_scalar(i) for i in indices)
    if any(i.dtype == "bool" for i in index_exprs):
        raise _error("a boolean index (torch reads it as a mask, not a position); index by integers")
    try:
        return ex.load(base_expr, index_exprs)
    except (IndexError, TypeError) as err:
        raise _error(str(err)) from None


def _refuse(construct: str) -> Callable[..., Any]:
    def handler(*args: Any, **kwargs: Any) -> Any:
        raise _error(construct)

    return handler


_IF_MESSAGE = "Python control flow (if / while / and / or / bool()) on a traced value; use torch.where"

_HANDLERS: dict[str, Callable[..., Any]] = {
    "__bool__": _refuse(_IF_MESSAGE),
    "item": _refuse("'.item()' on a traced value; attention functions must stay symbolic"),
    "tolist": _refuse("'.tolist()' on a traced value"),
    "__int__": _refuse("int() on a traced value"),
    "__float__": _refuse("float() on a traced value"),
    "__index__": _refuse("a traced value used as a Python index (range, list index)"),
    "__getitem__": _getitem,
    "__invert__": _invert, "bitwise_not": _invert, "logical_not": _logical_not,
    "div": _div, "divide": _div, "true_divide": _div, "__truediv__": _div,
    "__rtruediv__": lambda a, b: _div(b, a), "__rdiv__": lambda a, b: _div(b, a),
    "__idiv__": _div, "__itruediv__": _div,
    "where": _where, "masked_fill": _masked_fill, "clamp": _clamp, "clip": _clamp,
    "clamp_min": lambda a, m: _clamp(a, min=m), "clamp_max": lambda a, m: _clamp(a, max=m),
    "minimum": _min_max("minimum", "minimum"), "min": _min_max("minimum", "min"),
    "maximum": _min_max("maximum", "maximum"), "max": _min_max("maximum", "max"),
    "softplus": _softplus, "gelu": _gelu, "elu": _elu, "square": _square,
    "to": _to, "type": _to,
    "float": _fixed_cast("float"), "double": _fixed_cast("float"), "half": _fixed_cast("float"),
    "bfloat16": _fixed_cast("float"), "int": _fixed_cast("int"), "long": _fixed_cast("int"),
    "bool": _fixed_cast("bool"),
    "new_ones": _new_const(1), "new_zeros": _new_const(0), "new_full": _new_const(None),
    "ones_like": _like(1), "zeros_like": _like(0), "full_like": _like(None),
    "contiguous": lambda a, *args, **kw: _scalar(a), "clone": lambda a, *args, **kw: _scalar(a),
}

_BINARY_NAMES = {
    "add": ["add", "__add__", "__iadd__"], "sub": ["sub", "subtract", "__sub__", "__isub__"],
    "mul": ["mul", "multiply", "__mul__", "__imul__"],
    "floordiv": ["floor_divide", "__floordiv__", "__ifloordiv__"], "mod": ["remainder", "__mod__", "__imod__"],
    "pow": ["pow", "__pow__", "pow_", "__ipow__"],
    "and": ["bitwise_and", "__and__", "__iand__"],
    "or": ["bitwise_or", "__or__", "__ior__"],
    "xor": ["bitwise_xor", "__xor__", "__ixor__"],
    "lshift": ["bitwise_left_shift", "__lshift__", "__ilshift__"],
    "rshift": ["bitwise_right_shift", "__rshift__", "__irshift__"],
    "eq": ["eq", "__eq__"], "ne": ["ne", "__ne__", "not_equal"], "lt": ["lt", "__lt__", "less"],
    "le": ["le", "__le__", "less_equal"], "gt": ["gt", "__gt__", "greater"],
    "ge": ["ge", "__ge__", "greater_equal"],
}
for _op, _names in _BINARY_NAMES.items():
    for _name in _names:
        _HANDLERS[_name] = _binary(_op)
for _op, _name in [("add", "__radd__"), ("sub", "__rsub__"), ("sub", "rsub"), ("mul", "__rmul__"),
                   ("floordiv", "__rfloordiv__"), ("mod", "__rmod__"), ("pow", "__rpow__"),
                   ("and", "__rand__"), ("or", "__ror__"), ("xor", "__rxor__"),
                   ("lshift", "__rlshift__"), ("rshift", "__rrshift__")]:
    _HANDLERS[_name] = _binary(_op, reflected=_name != "rsub")
for _op in ("and", "or", "xor"):
    _HANDLERS[f"logical_{_op}"] = _logical(_op)
_HANDLERS["rsub"] = lambda a, b, **kw: ex.binary("sub", _scalar(b), _scalar(a))
for _op in ["exp", "exp2", "log", "log2", "sqrt", "rsqrt", "tanh", "sigmoid", "relu", "erf",
            "sin", "cos", "floor", "ceil", "abs"]:
    _HANDLERS[_op] = _unary(_op)
_HANDLERS.update({"__abs__": _unary("abs"), "absolute": _unary("abs"), "neg": _unary("neg"),
                  "negative": _unary("neg"), "__neg__": _unary("neg"), "__pos__": _scalar, "positive": _scalar,
                  "logsigmoid": _unary("logsigmoid"), "relu_": _unary("relu")})


# ---- entry points -------------------------------------------------------------------


def _function_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))
    return name.replace(".<locals>", "")


def trace(
    fn: Callable[..., Any],
    arg_names: tuple[str, ...],
    captures: Captures,
    result_dtype: str,
) -> Expr:
    """Trace ``fn`` called with one ``Symbol`` per name; return its result as ``Expr``."""
    context = _Context(_function_name(fn), captures)
    _ACTIVE.append(context)
    try:
        symbols = [Symbol(ex.var(name)) for name in arg_names]
        try:
            result = fn(*symbols)
        except TraceError:
            raise
        except Exception as err:  # the user's code failed on symbolic arguments
            frames = traceback.extract_tb(err.__traceback__)
            user = [f for f in frames if not _is_internal(f.filename)]
            frame = (user or frames)[-1]
            raise TraceError(
                f"cannot trace {context.fn_name} at {frame.filename}:{frame.lineno}: "
                f"{type(err).__name__}: {err}\n    {frame.line}"
            ) from err
        if result is None:
            raise TraceError(f"cannot trace {context.fn_name}: it returned None")
        out = _scalar(result)
    finally:
        _ACTIVE.pop()
    if result_dtype == "bool":
        return out if out.dtype == "bool" else ex.binary("ne", out, ex.const(0))
    return ex.cast(out, result_dtype)


def trace_score(fn: Callable[..., Any], captures: Captures) -> Expr:
    return trace(fn, ("score", *ex.INDEX_VARS), captures, "float")


def trace_mask(fn: Callable[..., Any], captures: Captures) -> Expr:
    return trace(fn, ex.INDEX_VARS, captures, "bool")


def trace_pointwise(fn: Callable[..., Any], captures: Captures, arg: str = "score") -> Expr:
    return trace(fn, (arg,), captures, "float")


def is_finite_const(expression: Expr) -> bool:
    return expression.op == "const" and math.isfinite(float(expression.arg))
