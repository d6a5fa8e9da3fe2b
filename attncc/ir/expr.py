"""Scalar expression nodes: the body of score functions, masks and pointwise maps.

An ``Expr`` is an immutable value (op, dtype, src, arg), built once and compared
structurally, in the manner of tinygrad's ``UOp``. Two expressions written the same way
are equal and share a ``key`` across processes, which is what variant fingerprints and
the tuning cache stand on.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

# NOTE: three scalar dtypes are enough for the attention contract: index arithmetic is
# integral, masks are boolean, scores and weights are floating point (float32 or wider).
DTYPES = ("bool", "int", "float")

INDEX_VARS = ("b", "h", "q_idx", "kv_idx")
# positions the kernels index exactly: they add index variables in float32 (backends refuse more)
MAX_POSITIONS = 1 << 24

UNARY_OPS = {
    "neg", "not", "invert", "abs", "exp", "exp2", "log", "log2", "sqrt", "rsqrt", "tanh",
    "sigmoid", "logsigmoid", "relu", "gelu", "softplus", "erf", "sin", "cos", "floor", "ceil",
    "elu",
}
FLOAT_UNARY_OPS = UNARY_OPS - {"neg", "not", "invert", "abs", "relu", "floor", "ceil"}
ARITH_OPS = {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "minimum", "maximum"}
BIT_OPS = {"and", "or", "xor", "lshift", "rshift"}
COMPARE_OPS = {"eq", "ne", "lt", "le", "gt", "ge"}
BINARY_OPS = ARITH_OPS | BIT_OPS | COMPARE_OPS
LEAF_OPS = {"var", "const", "input"}
ALL_OPS = LEAF_OPS | UNARY_OPS | BINARY_OPS | {"where", "load", "cast"}

# the name prefix of tensors attncc builds for a call (a decoding step's META, routing tables):
# their contents are attncc's, never a user's
INTERNAL_PREFIX = "__attncc_"


@dataclass(frozen=True)
class TensorSpec:
    """A captured tensor as the IR sees it: its name, shape and dtype, never its values."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "int64" or "float32"

    @property
    def scalar_dtype(self) -> str:
        if self.dtype == "bool":
            return "bool"
        return "float" if self.dtype.startswith(("float", "bfloat")) else "int"


@dataclass(frozen=True, eq=False)
class Expr:
    op: str
    dtype: str
    src: tuple[Expr, ...] = ()
    arg: Any = None
    _hash: int = field(default=0, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.op, self.dtype, self.src, _arg_key(self.arg))))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        """Structural equality, with constants compared as ``key`` does: ``0.0 != -0.0``, ``nan == nan``."""
        if self is other:
            return True
        if not isinstance(other, Expr) or self._hash != other._hash:
            return False
        return self.key == other.key  # iterative, so deep trees compare without recursion

    @cached_property
    def key(self) -> str:
        """sha256 over the op, dtype, argument and the children's keys."""
        for node in self.walk():  # children first, so no recursion below
            if "key" not in node.__dict__:
                payload = repr((node.op, node.dtype, _arg_key(node.arg), [s.__dict__["key"] for s in node.src]))
                node.__dict__["key"] = hashlib.sha256(payload.encode()).hexdigest()
        return self.__dict__["key"]

    @property
    def shape(self) -> tuple[int, ...]:
        """Non-empty only for a partial load, such as ``intervals[img]`` before ``[0]``."""
        if self.op == "input":
            return self.arg.shape
        if self.op == "load":
            return self.src[0].arg.shape[len(self.src) - 1 :]
        return ()

    def replace(self, **changes: Any) -> Expr:
        """Return a copy with ``changes``; the same object when nothing changes."""
        if all(getattr(self, k) == v for k, v in changes.items()):
            return self
        fields = {"op": self.op, "dtype": self.dtype, "src": self.src, "arg": self.arg}
        fields.update(changes)
        return Expr(**fields)

    def walk(self) -> list[Expr]:
        """Every distinct node of the tree, children before parents."""
        # NOTE: iterative, so that deep trees (a score built in a Python loop) do not recurse.
        seen: dict[Expr, None] = {}
        stack: list[tuple[Expr, bool]] = [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if node in seen:
                continue
            if expanded:
                seen[node] = None
                continue
            stack.append((node, True))
            stack.extend((child, False) for child in reversed(node.src))
        return list(seen)

    def free_vars(self) -> frozenset[str]:
        return frozenset(n.arg for n in self.walk() if n.op == "var")

    def inputs(self) -> tuple[TensorSpec, ...]:
        return tuple(dict.fromkeys(n.arg for n in self.walk() if n.op == "input"))

    def __str__(self) -> str:
        from attncc.ir.printer import format_expr

        return format_expr(self)


def _arg_key(arg: Any) -> Any:
    if isinstance(arg, float):
        return ("float", arg.hex()) if math.isfinite(arg) else ("float", repr(arg))
    if isinstance(arg, TensorSpec):
        return ("tensor", arg.name, arg.shape, arg.dtype)
    return arg


# ---- constructors -------------------------------------------------------------------


def var(name: str, dtype: str | None = None) -> Expr:
    return Expr("var", dtype or ("float" if name in ("score", "x") else "int"), (), name)


def const(value: bool | int | float) -> Expr:
    if isinstance(value, bool):
        return Expr("const", "bool", (), value)
    if isinstance(value, int):
        return Expr("const", "int", (), value)
    return Expr("const", "float", (), float(value))


def input_ref(spec: TensorSpec) -> Expr:
    return Expr("input", spec.scalar_dtype, (), spec)


def load(base: Expr, indices: tuple[Expr, ...]) -> Expr:
    """Index a captured tensor (or extend a partial load) by integer expressions."""
    if base.op == "load":
        return load(base.src[0], base.src[1:] + indices)
    spec: TensorSpec = base.arg
    if len(indices) > len(spec.shape):
        raise IndexError(f"too many indices for captured tensor {spec.name!r} of shape {spec.shape}")
    for index in indices:
        if index.dtype == "float":
            raise TypeError(f"captured tensor {spec.name!r} indexed by a floating-point value")
    return Expr("load", spec.scalar_dtype, (base, *indices))


def promote(a: str, b: str) -> str:
    order = {"bool": 0, "int": 1, "float": 2}
    return a if order[a] >= order[b] else b


def unary(op: str, a: Expr) -> Expr:
    if op in FLOAT_UNARY_OPS:
        dtype = "float"
    elif op == "not":
        dtype = "bool"
    elif op == "abs" or op == "neg" or op == "relu":
        dtype = "int" if a.dtype == "bool" else a.dtype
    else:
        dtype = a.dtype
    return Expr(op, dtype, (a,))


def binary(op: str, a: Expr, b: Expr) -> Expr:
    if op in COMPARE_OPS:
        dtype = "bool"
    elif op == "truediv":
        dtype = "float"
    elif op in BIT_OPS:
        if "float" in (a.dtype, b.dtype):
            raise TypeError(f"bitwise '{op}' on a floating-point value")
        dtype = promote(a.dtype, b.dtype)
    else:
        dtype = promote(a.dtype, b.dtype)
        if dtype == "bool":
            dtype = "int"
    return Expr(op, dtype, (a, b))


def where(cond: Expr, a: Expr, b: Expr) -> Expr:
    return Expr("where", promote(a.dtype, b.dtype), (cond, a, b))


def cast(a: Expr, dtype: str) -> Expr:
    return a if a.dtype == dtype else Expr("cast", dtype, (a,), dtype)


def substitute(expr: Expr, mapping: dict[Expr, Expr]) -> Expr:
    """Replace sub-expressions bottom-up (used to inline and to rename)."""
    memo: dict[Expr, Expr] = {}
    for node in expr.walk():
        if node in mapping:
            memo[node] = mapping[node]
            continue
        new_src = tuple(memo[s] for s in node.src)
        memo[node] = node.replace(src=new_src)
    return memo[expr]
