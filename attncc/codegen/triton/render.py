"""``Expr`` -> Triton expression text, one line per node (the renderer of the Triton backend).

One mapping from op to code (``UNARY``, ``BINARY``), in the manner of tinygrad's
``cstyle.py``: every node of an expression becomes one SSA assignment, shared
sub-expressions are rendered once. Integer arithmetic keeps Python/torch floor
semantics (``floordiv``/``mod`` go through the ``_floordiv``/``_mod`` helpers that every
template defines); floats compute in float32. Captured tensors are pointer arguments
with runtime strides: a load becomes ``tl.load(ptr + i0 * s0 + ...)`` masked to the
tensor's bounds, so padded rows and columns of a tile never read out of range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attncc.ir.expr import Expr, TensorSpec
from attncc.passes.int_bounds import INT32_BOUND, may_wrap, static_bound

# NOTE: ``{0}``/``{1}`` are the rendered operands, already cast to the node's float type
# where the node computes in floating point. Helpers starting with "_" live in the
# template preamble (templates/_helpers.py.jinja).
UNARY: dict[str, str] = {
    "neg": "-({0})",
    "not": "({0} == 0)",
    "invert": "(~{0})",
    "abs": "tl.abs({0})",
    "exp": "tl.exp({0})",
    "exp2": "tl.exp2({0})",
    "log": "tl.log({0})",
    "log2": "tl.log2({0})",
    "sqrt": "tl.sqrt({0})",
    "rsqrt": "tl.rsqrt({0})",
    "tanh": "_tanh({0})",
    "sigmoid": "tl.sigmoid({0})",
    "logsigmoid": "_logsigmoid({0})",
    "relu": "tl.maximum({0}, {zero})",
    "gelu": "_gelu({0})",
    "softplus": "_softplus({0})",
    "erf": "tl.math.erf({0})",
    "sin": "tl.sin({0})",
    "cos": "tl.cos({0})",
    "floor": "tl.floor({0})",
    "ceil": "tl.ceil({0})",
    "elu": "_elu({0})",
}

BINARY: dict[str, str] = {
    "add": "({0} + {1})",
    "sub": "({0} - {1})",
    "mul": "({0} * {1})",
    "truediv": "({0} / {1})",
    "minimum": "tl.minimum({0}, {1})",
    "maximum": "tl.maximum({0}, {1})",
    "and": "({0} & {1})",
    "or": "({0} | {1})",
    "xor": "({0} ^ {1})",
    "lshift": "({0} << {1})",
    "rshift": "({0} >> {1})",
    "eq": "({0} == {1})",
    "ne": "({0} != {1})",
    "lt": "({0} < {1})",
    "le": "({0} <= {1})",
    "gt": "({0} > {1})",
    "ge": "({0} >= {1})",
}
# Integer and float versions differ for these (Python floor semantics on integers).
INT_BINARY = {"floordiv": "_floordiv({0}, {1})", "mod": "_mod({0}, {1})", "pow": "_ipow({0}, {1})"}
FLOAT_BINARY = {"floordiv": "tl.floor({0} / {1})", "mod": "_fmod({0}, {1})", "pow": "_fpow({0}, {1})"}

SCALAR_VARS = frozenset({"b", "h"})  # one value per program; q_idx, kv_idx, score are tiles

SUPPORTED_OPS = set(UNARY) | set(BINARY) | set(INT_BINARY) | {"var", "const", "input", "load", "cast", "where"}


def pointer_args(spec: TensorSpec) -> list[str]:
    """Kernel parameters that carry one captured tensor: its pointer and one stride per dim."""
    return [f"{spec.name}_ptr"] + [f"{spec.name}_s{d}" for d in range(len(spec.shape))]


def unsupported(expr: Expr) -> str | None:
    """Why this expression cannot be rendered, or None."""
    for node in expr.walk():
        if node.op not in SUPPORTED_OPS:
            return f"op {node.op!r} has no Triton rendering"
        if node.op == "load" and node.shape:
            return f"partial load of {node.src[0].arg.name!r} (remaining shape {node.shape}) used as a value"
        if node.op == "pow" and node.dtype == "int" and not _small_const_exponent(node.src[1]):
            return "integer pow with a non-constant exponent"
    # NOTE: as TVM's bound; below it, integer nodes that may pass int32 compute in int64 (``_wide``)
    return may_wrap(expr, 1 << 62)


def _small_const_exponent(e: Expr) -> bool:
    return e.op == "const" and isinstance(e.arg, int) and 0 <= e.arg <= 8


def _literal(value: bool | int | float) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int):
        return str(value)
    if value != value:
        return 'float("nan")'
    if value in (float("inf"), float("-inf")):
        return 'float("inf")' if value > 0 else 'float("-inf")'
    return repr(float(value))


@dataclass
class ExprRenderer:
    """Renders expressions into SSA lines; ``env`` names the code for each ``var``.

    One renderer per kernel body: its memo shares nodes between several expressions
    (a score function and its derivative, say) so each is computed once.
    """

    env: dict[str, str]
    prefix: str = "t"
    lines: list[str] = field(default_factory=list)
    memo: dict[Expr, str] = field(default_factory=dict)
    narrow: dict[Expr, bool] = field(default_factory=dict)  # integer nodes known to stay within int32

    def render(self, expr: Expr) -> str:
        """Emit the lines computing ``expr`` (appended to ``self.lines``); return its name."""
        for node in expr.walk():
            if node not in self.memo:
                self.memo[node] = self._node(node)
        return self.memo[expr]

    def render_as(self, expr: Expr, dtype: str) -> str:
        """Render ``expr`` and convert the result to ``dtype`` ("float" or "bool") for the caller."""
        name = self.render(expr)
        if dtype == "bool" and expr.dtype != "bool":
            return f"({name} != 0)"
        if dtype == "float" and expr.dtype != "float":
            return _literal(float(expr.arg)) if expr.op == "const" else f"tl.cast({name}, tl.float32)"
        return name

    def take_lines(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines

    # ---- one case per kind of node ----------------------------------------------------

    def _emit(self, code: str) -> str:
        name = f"{self.prefix}{len(self.memo)}_{len(self.lines)}"
        self.lines.append(f"{name} = {code}")
        return name

    def _node(self, node: Expr) -> str:
        op = node.op
        if op == "var":
            if node.arg not in self.env:
                raise KeyError(f"variable {node.arg!r} is not available in this kernel body")
            return self.env[node.arg]
        if op == "const":
            return _literal(node.arg)
        if op == "input":
            return ""  # only ever the first source of a load
        if op == "load":
            return self._load(node)
        if op == "cast":
            return self._emit(self._cast(node.src[0], node.dtype))
        if op == "where":
            cond = self._as_bool(node.src[0])
            a, b = (self._operand(s, node.dtype) for s in node.src[1:])
            return self._emit(f"tl.where({cond}, {a}, {b})")
        if op in UNARY:
            operand = self._operand(node.src[0], "float" if node.dtype == "float" else node.src[0].dtype)
            zero = "0.0" if node.dtype == "float" else "0"
            return self._emit(UNARY[op].format(operand, zero=zero))
        return self._binary(node)

    def _binary(self, node: Expr) -> str:
        op = node.op
        a_e, b_e = node.src
        if op == "pow" and node.dtype == "int":
            base = self.memo[a_e] if self._narrow(node) else self._wide(a_e)
            return self._emit(self._int_pow(base, b_e.arg))
        if op in INT_BINARY:
            table = FLOAT_BINARY if node.dtype == "float" else INT_BINARY
            a, b = self._operands(node, node.dtype, node.dtype)
            if node.dtype == "float" and op == "pow" and b_e.op == "const" and float(b_e.arg).is_integer() \
                    and 0 <= b_e.arg <= 8:
                return self._emit(self._int_pow(a, int(b_e.arg)))
            return self._emit(table[op].format(a, b))
        work = "float" if node.dtype == "float" or op == "truediv" else None
        if work is None and "float" in (a_e.dtype, b_e.dtype):
            work = "float"  # comparisons of mixed operands
        a, b = self._operands(node, work or a_e.dtype, work or b_e.dtype)
        return self._emit(BINARY[op].format(a, b))

    def _operands(self, node: Expr, a_dtype: str, b_dtype: str) -> tuple[str, str]:
        """The rendered operands of a binary ``node``; for an integer node that may pass int32, its
        non-constant operands cast to int64 (``_wide``)."""
        a_e, b_e = node.src
        if node.dtype == "int" and not self._narrow(node):
            return self._wide(a_e), self._wide(b_e)
        return self._operand(a_e, a_dtype), self._operand(b_e, b_dtype)

    def _narrow(self, node: Expr) -> bool:
        """Whether integer ``node`` stays within int32, memoized (a bound walks the subtree). Its
        bound is None where loaded data decide it: then it may not."""
        if node not in self.narrow:
            bound = static_bound(node)
            self.narrow[node] = bound is not None and bound < INT32_BOUND
        return self.narrow[node]

    def _wide(self, operand: Expr) -> str:
        """``operand`` in int64 (a constant as it is: it takes the other operand's type). Positions
        are int32 tiles (``tl.arange``), which wrap past 2**31 where torch's int64 does not:
        ``q_idx * 10**8`` gave another mask."""
        code = self.memo[operand]
        return code if operand.op == "const" else f"tl.cast({code}, tl.int64)"

    def _int_pow(self, base: str, exponent: int) -> str:
        if exponent == 0:
            return f"({base} * 0 + 1)"
        return "(" + " * ".join([base] * exponent) + ")"

    def _load(self, node: Expr) -> str:
        spec: TensorSpec = node.src[0].arg
        address, bounds = self.address(node, f"{spec.name}_ptr", f"{spec.name}_s")
        mask = f", mask={' & '.join(bounds)}, other=0" if bounds else ""
        loaded = f"tl.load({address}{mask})"
        if spec.scalar_dtype == "float":
            loaded += ".to(tl.float32)"
        elif spec.scalar_dtype == "bool":
            loaded = f"({loaded} != 0)"
        return self._emit(loaded)

    def address(self, node: Expr, pointer: str, stride: str) -> tuple[str, list[str]]:
        """``pointer + sum(index_d * stride{d})`` for a load node, and the bounds of tile indices."""
        spec: TensorSpec = node.src[0].arg
        offsets, bounds = [], []
        for dim, index_expr in enumerate(node.src[1:]):
            if index_expr.op == "const":
                index = index_expr.arg + (spec.shape[dim] if index_expr.arg < 0 else 0)
                offsets.append(f"{index} * {stride}{dim}")
                continue
            index = self.memo[index_expr]
            if index_expr.free_vars() <= SCALAR_VARS:
                # NOTE: a per-program scalar index is clamped, not masked (the interpreter
                # rejects scalar masks broadcast against tiles); b and h are in range anyway.
                offsets.append(f"tl.minimum(tl.maximum({index}, 0), {spec.shape[dim] - 1}) * {stride}{dim}")
                continue
            offsets.append(f"{index} * {stride}{dim}")
            bounds.append(f"({index} >= 0) & ({index} < {spec.shape[dim]})")
        return " + ".join([pointer, *offsets]), bounds

    def _cast(self, src: Expr, dtype: str) -> str:
        code = self.memo[src]
        if dtype == "float":
            return self._operand(src, "float")
        if dtype == "int":
            return f"tl.cast({code}, tl.int64)" if src.op != "const" else str(int(src.arg))
        return f"({code} != 0)"

    def _as_bool(self, src: Expr) -> str:
        return self.memo[src] if src.dtype == "bool" else f"({self.memo[src]} != 0)"

    def _operand(self, src: Expr, dtype: str) -> str:
        """The rendered operand, converted to float32 when the consumer computes in float."""
        code = self.memo[src]
        if dtype != "float" or src.dtype == "float":
            return code
        if src.op == "const":
            return _literal(float(src.arg))
        return f"tl.cast({code}, tl.float32)"
