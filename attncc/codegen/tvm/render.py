"""Expr -> TVMScript expression text: one mapping from op to code.

Score functions, masks and pointwise maps are rendered inline into the kernel body. The
IR's three scalar dtypes map to ``int64`` (index arithmetic, as torch computes it),
``bool`` and ``float32`` (the kernel's accumulation type). Captured tensors are kernel
buffers named ``X_<i>`` (see ``buffer_name``); a load renders as a buffer access.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

from attncc.codegen.call_ranges import divides, may_be_negative
from attncc.ir.expr import COMPARE_OPS, INDEX_VARS, INTERNAL_PREFIX, Expr, TensorSpec, promote
from attncc.passes.int_bounds import may_wrap

TIR_DTYPE = {"int": "int64", "bool": "bool", "float": "float32"}

# Torch dtypes a captured tensor may have, and how the kernel declares its buffer.
# NOTE: bool tensors travel as uint8 views (DLPack bool is not portable); loads compare to 0.
BUFFER_DTYPE = {
    "float32": "float32", "float16": "float16", "bfloat16": "bfloat16",
    "int64": "int64", "int32": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8",
    "bool": "uint8",
}


def buffer_name(spec: TensorSpec, specs: tuple[TensorSpec, ...]) -> str:
    return f"X_{specs.index(spec)}"


def buffer_declaration(index: int, spec: TensorSpec) -> str:
    """The ``T.match_buffer`` line of captured tensor ``X_<index>`` (argument ``x<index>``).

    Its sizes are symbolic (``X<index>_n<d>``), so a captured tensor of a new size (a run-time
    index table, a longer document-id vector) reuses the compiled module.
    NOTE: a 0-d tensor travels as a one-element buffer (TVMScript parses no ``X[]``); loads
    read element 0 and ``launcher.as_buffer`` reshapes the tensor.
    """
    sizes = [f"X{index}_n{d}" for d in range(max(1, len(spec.shape)))]
    dims = ", ".join(sizes) + ("," if len(sizes) == 1 else "")
    symbols = "".join(f"{size} = T.int32(); " for size in sizes)
    return f'{symbols}X_{index} = T.match_buffer(x{index}, ({dims}), "{BUFFER_DTYPE[spec.dtype]}")'


def _float(value: float) -> str:
    """A float32 literal of ``value`` rounded as torch rounds it to float32: past float32's range
    it is infinite (TVM rejects such a literal), below its smallest subnormal 0."""
    if math.isnan(value):
        return 'T.float32("nan")'
    try:
        value = struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:
        value = math.copysign(math.inf, value)
    if math.isinf(value):
        return 'T.float32("inf")' if value > 0 else 'T.float32("-inf")'
    return f"T.float32({value!r})"


def _const(node: Expr) -> str:
    if node.dtype == "bool":
        return f"T.bool({bool(node.arg)})"
    if node.dtype == "int":
        return f"T.int64({int(node.arg)})"
    return _float(float(node.arg))


def cast(text: str, src: str, dst: str) -> str:
    """Convert a rendered value between IR dtypes (bool <-> int <-> float)."""
    if src == dst:
        return text
    if dst == "bool":
        zero = "T.int64(0)" if src == "int" else "T.float32(0.0)"
        return f"({text} != {zero})"
    return f'T.Cast("{TIR_DTYPE[dst]}", {text})'


# exp(x) = 2**n * 2**f with n = round(x log2 e), |f| <= 1/2, 2**f by its Taylor polynomial of
# degree 7 (relative error below 1e-8): TVM's generic exp lowering costs ~3x the whole tile.
_EXP2_COEFFS = tuple(math.log(2) ** k / math.factorial(k) for k in range(8))


def fast_exp(x: str) -> str:
    """``exp(x)`` for float32 ``x`` as one expression (below -87: 0, above 88.5: inf).

    NOTE: one expression, no let-bindings: TVM vectorizes a let-bound value inside a
    vectorized loop wrongly (every lane gets one lane's value).
    """
    xc = f"T.min(T.max({x}, T.float32(-87.0)), T.float32(88.5))"
    tn = f"T.floor({xc} * T.float32(1.4426950408889634) + T.float32(0.5))"
    tf = f"({xc} * T.float32(1.4426950408889634) - {tn})"
    poly = f"T.float32({_EXP2_COEFFS[-1]!r})"
    for c in reversed(_EXP2_COEFFS[:-1]):
        poly = f"({poly} * {tf} + T.float32({c!r}))"
    scale = f'T.reinterpret("float32", T.shift_left(T.Cast("int32", {tn}) + 127, 23))'
    big = f'T.if_then_else({x} > T.float32(88.5), T.float32("inf"), {scale} * {poly})'
    return f"T.if_then_else({x} < T.float32(-87.0), T.float32(0.0), {big})"


# 2**f on [-1/2, 1/2] by a degree-5 polynomial fitted for relative error (near-minimax, found by
# reweighted least squares on Chebyshev nodes): at most 7.5e-8, below float32's half ulp, with one
# multiply-add fewer than the Taylor polynomial of the same accuracy (degree 6).
_EXP2_MINIMAX5 = (1.000000071654532, 0.6931469670600188, 0.2402211972433566, 0.05550713281242219,
                  0.009675541314537878, 0.0013276469489187336)


LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def fast_exp2_nonpositive(x: str) -> str:
    """``2**x`` for float32 ``x <= 0`` or ``-inf`` (softmax in base 2: ``s log2(e) - m``).

    ``x`` is clamped at -127: ``n = round(x)`` is then at least -127, whose exponent field
    ``n + 127 = 0`` makes ``2**n`` exactly 0, so ``-inf`` (a masked score) and anything below
    about -126.5 give exactly 0 without a select; ``2**f`` by ``_EXP2_MINIMAX5``, ``f = x - n``
    in ``[-1/2, 1/2]``. ``nearbyint`` is one rounding instruction (``floor(x + 1/2)`` is two).
    """
    xc = f"T.max({x}, T.float32(-127.0))"
    tn = f"T.nearbyint({xc})"
    tf = f"({xc} - {tn})"
    poly = f"T.float32({_EXP2_MINIMAX5[-1]!r})"
    for c in reversed(_EXP2_MINIMAX5[:-1]):
        poly = f"({poly} * {tf} + T.float32({c!r}))"
    scale = f'T.reinterpret("float32", T.shift_left(T.Cast("int32", {tn}) + 127, 23))'
    return f"({scale} * {poly})"


def fast_exp_nonpositive(x: str) -> str:
    """``exp(x)`` for float32 ``x <= 0`` or ``-inf``: ``2**(x log2(e))`` (``fast_exp2_nonpositive``)."""
    return fast_exp2_nonpositive(f"({x} * T.float32({LOG2E!r}))")


def fast_log1p(y: str) -> str:
    """``log1p(y)`` for float32 ``y >= 0`` given as a cheap expression (a buffer read).

    ``log z = 2 atanh(r)`` with ``r = (z - 1) / (z + 1)``, by its odd series to ``r**9`` (error
    < 1e-9 for ``|r| < 0.172``). Below ``sqrt(2) - 1``, ``z = 1 + y`` is never formed:
    ``r = y / (2 + y)`` (rounding ``1 + y`` loses up to half an ulp of 1, a relative error of
    ``6e-8 / y`` in ``log1p(y) ~ y``: 6e-4 for softplus at ``s = -9.2``). Above it,
    ``1 + y = 2**e * m`` with ``m`` in ``[sqrt(1/2), sqrt(2))`` and ``r = (m - 1) / (m + 1)``.
    The two cases select the numerator and denominator of ``r`` and share one division and one
    series (a vector select computes both of its sides). Give ``y`` as a buffer read in a
    statement of its own: inside a weight's selects TVM scalarized the loop (``softplus_steps``).
    """
    bits = f'T.reinterpret("int32", (T.float32(1.0) + {y}))'
    mant = f'T.reinterpret("float32", T.bitwise_or(T.bitwise_and({bits}, 8388607), 1065353216))'
    big = f"({mant} > T.float32(1.4142135623730951))"
    m = f"T.if_then_else({big}, {mant} * T.float32(0.5), {mant})"
    e = f'(T.Cast("float32", T.shift_right({bits}, 23) - 127) + T.if_then_else({big}, T.float32(1.0), T.float32(0.0)))'
    small = f"({y} < T.float32(0.41421356237309503))"
    numerator = f"T.Select({small}, {y}, {m} - T.float32(1.0))"
    denominator = f"T.Select({small}, T.float32(2.0) + {y}, {m} + T.float32(1.0))"
    exponent = f"T.Select({small}, T.float32(0.0), {e})"
    return f"({exponent} * T.float32(0.6931471805599453) + {_two_atanh(f'({numerator} / {denominator})')})"


def softplus_steps(x: str, buf: str) -> tuple[tuple[str, str], str]:
    """``softplus(x)`` (torch's, threshold 20) for a kernel's loop body: two statements that fill
    the element ``buf`` (``exp``, then ``log1p`` in place), and the value, which reads it.

    Why statements: the fast ``log1p`` reads its argument often (a buffer read is cheap), and
    written inside a weight's selects TVM scalarized the whole loop (softplus 3.6x slower).
    """
    fills = (f"{buf} = {fast_exp(f'T.min({x}, T.float32(20.0))')}", f"{buf} = {fast_log1p(buf)}")
    return fills, f"T.if_then_else({x} > T.float32(20.0), {x}, {buf})"


def _two_atanh(r: str) -> str:
    """``2 atanh(r) = log((1 + r) / (1 - r))`` for ``|r| < 0.172``: the odd series to ``r**9``."""
    r2 = f"({r} * {r})"
    series = "T.float32(0.1111111111111111)"
    for c in (1 / 7, 1 / 5, 1 / 3, 1.0):
        series = f"({series} * {r2} + T.float32({c!r}))"
    return f"(T.float32(2.0) * {r} * {series})"


def _float_unary(fn: str) -> Callable[[str], str]:
    return lambda x: f"T.{fn}({x})"


def _softplus(x: str) -> str:
    # torch's softplus (beta=1, threshold=20): x above the threshold, log1p(exp(x)) below.
    return f"T.if_then_else({x} > T.float32(20.0), {x}, T.log1p({fast_exp(f'T.min({x}, T.float32(20.0))')}))"


def _logsigmoid(x: str) -> str:
    # min(x, 0) - log1p(exp(-|x|)): stable at both ends.
    return f"(T.min({x}, T.float32(0.0)) - T.log1p({fast_exp(f'(-T.abs({x}))')}))"


def _sigmoid(x: str) -> str:
    return f"(T.float32(1.0) / (T.float32(1.0) + {fast_exp(f'(-{x})')}))"


# tanh(x) = x (1 + x^2 (c3 + x^2 (c5 + ...))), its Taylor series to x^11: relative error below
# 1e-9 for |x| < TANH_SERIES_BELOW (the first term left out, 21844/6081075 x^13, is 6e-10 x there)
_TANH_SERIES = (-1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925)
TANH_SERIES_BELOW = 0.25


def _tanh(x: str) -> str:
    """``1 - 2 / (exp(2x) + 1)`` (exact limits +-1, no inf/inf), and near 0 its Taylor series: the
    difference there has an absolute error of 1e-7, which a soft cap multiplies (``500 tanh(s /
    500)`` missed the float32 tolerance)."""
    wide = f"(T.float32(1.0) - T.float32(2.0) / ({fast_exp(f'(T.float32(2.0) * {x})')} + T.float32(1.0)))"
    x2 = f"({x} * {x})"
    series = _float(_TANH_SERIES[-1])
    for c in reversed(_TANH_SERIES[:-1]):
        series = f"({_float(c)} + {x2} * {series})"
    near = f"({x} + {x} * ({x2} * {series}))"
    return f"T.if_then_else(T.abs({x}) < {_float(TANH_SERIES_BELOW)}, {near}, {wide})"


FLOAT_UNARY: dict[str, Callable[[str], str]] = {
    "exp": fast_exp, "exp2": _float_unary("exp2"), "log": _float_unary("log"),
    "log2": _float_unary("log2"), "sqrt": _float_unary("sqrt"), "rsqrt": _float_unary("rsqrt"),
    "tanh": _tanh, "sigmoid": _sigmoid, "erf": _float_unary("erf"),
    "sin": _float_unary("sin"), "cos": _float_unary("cos"), "floor": _float_unary("floor"),
    "ceil": _float_unary("ceil"),
    "logsigmoid": _logsigmoid,
    "softplus": _softplus,
    "gelu": lambda x: f"(T.float32(0.5) * {x} * (T.float32(1.0) + T.erf({x} * T.float32({1 / math.sqrt(2)!r}))))",
    "elu": lambda x: f"T.if_then_else({x} > T.float32(0.0), {x}, {fast_exp(x)} - T.float32(1.0))",
}

BINARY_INFIX = {"add": "+", "sub": "-", "mul": "*", "eq": "==", "ne": "!=", "lt": "<", "le": "<=",
                "gt": ">", "ge": ">="}


def unsupported(expr: Expr) -> str | None:
    """Why ``expr`` cannot be rendered here, or None."""
    for node in expr.walk():
        if node.op == "load" and node.shape:
            return f"partial load of captured tensor {node.src[0].arg.name!r} used as a value"
        if node.op == "input" and node.arg.dtype not in BUFFER_DTYPE:
            spec = node.arg
            return f"captured tensor {spec.name!r} has dtype {spec.dtype} (TVM kernels take {sorted(BUFFER_DTYPE)})"
        if node.op == "pow" and node.dtype == "int":
            return "integer pow is not rendered (use a float exponent)"
        if node.op == "var" and node.arg not in ("score", "x", "b", "h", "q_idx", "kv_idx"):
            return f"unknown variable {node.arg!r}"
    return may_wrap(expr, WRAP_BOUND)


WRAP_BOUND = 1 << 62  # TVM computes integers in int64: past 2**62 a sum of two may wrap
SMALL_INT = 1 << 20


class Renderer:
    """Render one Expr tree; ``env`` maps variable names to rendered text of the IR dtype."""

    def __init__(self, env: dict[str, str], specs: tuple[TensorSpec, ...]) -> None:
        self.env = env
        self.specs = specs

    def __call__(self, expr: Expr) -> str:
        return self.render(expr)

    def render(self, node: Expr) -> str:
        op = node.op
        if op == "var":
            return self.env[node.arg]
        if op == "const":
            return _const(node)
        if op == "load":
            return self._load(node)
        if op == "cast":
            return cast(self.render(node.src[0]), node.src[0].dtype, node.dtype)
        if op == "where":
            c, a, b = node.src
            return (f"T.if_then_else({self.render(c)}, {self._as(a, node.dtype)}, "
                    f"{self._as(b, node.dtype)})")
        if len(node.src) == 1:
            return self._unary(node)
        return self._binary(node)

    def _as(self, node: Expr, dtype: str) -> str:
        if node.dtype == "int" and dtype == "float":
            exact = self._float_exact(node)
            if exact is not None:
                return exact
        return cast(self.render(node), node.dtype, dtype)

    def _float_exact(self, node: Expr) -> str | None:
        """An integer sum of index variables and small constants (``q_idx - kv_idx``) computed in
        float32 rather than int64 then converted, or None for any other expression.

        Why: ALiBi's ``s - m * (q_idx - kv_idx)`` per score was an int64 vector subtraction and a
        64-bit conversion (two instructions per 8 lanes each); in float32 it is one subtraction,
        the rows' conversion hoisted. Exact while the values stay below 2**24
        (``attncc.ir.expr.MAX_POSITIONS``, checked per call)."""
        op = node.op
        if op == "var":
            text = self.env.get(node.arg, "")
            inner = text.removeprefix('T.Cast("int64", ').removesuffix(")")
            whole = inner != text and "(" not in inner and ")" not in inner  # one cast of a plain sum
            return f'T.Cast("float32", {inner})' if whole and node.arg in INDEX_VARS else None
        if op == "const" and isinstance(node.arg, int) and abs(node.arg) <= SMALL_INT:
            return f"T.float32({float(node.arg)!r})"
        if op == "neg":
            inner = self._float_exact(node.src[0])
            return None if inner is None else f"(-{inner})"
        if op in ("add", "sub"):
            a, b = (self._float_exact(s) for s in node.src)
            return None if a is None or b is None else f"({a} {'+' if op == 'add' else '-'} {b})"
        return None

    def index(self, load: Expr, d: int) -> str:
        """Index ``d`` of ``load`` as an int64: from the end, as torch counts, when it may be negative
        (``call_ranges.may_be_negative``; ``check_call`` has bounded it to ``[-n, n)``)."""
        index = load.src[1 + d]
        text = self._as(index, "int")
        size = f'T.Cast("int64", X{self.specs.index(load.src[0].arg)}_n{d})'
        if may_be_negative(index):
            text = f"T.if_then_else({text} < T.int64(0), {text} + {size}, {text})"
        if any(node.op == "load" and not node.src[0].arg.name.startswith(INTERNAL_PREFIX) for node in index.walk()):
            # NOTE: an index read from a user's tensor is checked when the tensor's version changes; a
            # write torch does not count (through .data or a NumPy view) could otherwise send the
            # kernel outside the buffer (SIGSEGV): clamped, it reads a wrong element at worst.
            # attncc's own tables (a decoding step's META) are written by attncc for each call.
            text = f"T.min(T.max({text}, T.int64(0)), {size} - T.int64(1))"
        return text

    def _load(self, node: Expr) -> str:
        spec: TensorSpec = node.src[0].arg
        indices = ", ".join(self.index(node, d) for d in range(len(node.src) - 1)) if spec.shape else "0"
        access = f"{buffer_name(spec, self.specs)}[{indices}]"
        stored = spec.scalar_dtype
        if spec.dtype == "bool":
            return cast(f"({access} != T.uint8(0))", "bool", node.dtype)
        if stored == "float" and spec.dtype != "float32":
            access = f'T.Cast("float32", {access})'
        elif stored == "int" and spec.dtype != "int64":
            access = f'T.Cast("int64", {access})'
        return cast(access, stored, node.dtype)

    def _unary(self, node: Expr) -> str:
        op, (a,) = node.op, node.src
        if op == "not" or (op == "invert" and node.dtype == "bool"):
            return f"T.Not({self._as(a, 'bool')})"
        if op == "invert":
            return f"T.bitwise_not({self._as(a, 'int')})"
        x = self._as(a, node.dtype)
        if op == "neg":
            return f"(-{x})"
        if op == "abs":
            return f"T.abs({x})"
        if op == "relu":
            zero = "T.int64(0)" if node.dtype == "int" else "T.float32(0.0)"
            return f"T.max({x}, {zero})"
        if op in ("floor", "ceil") and node.dtype == "int":
            return x
        return FLOAT_UNARY[op](x)

    def _binary(self, node: Expr) -> str:
        op = node.op
        target = promote(*(s.dtype for s in node.src)) if op in COMPARE_OPS else node.dtype
        if target == "bool" and (op in COMPARE_OPS or op == "xor"):
            # NOTE: compared as integers: TVM 0.27 lowers comparisons of two bools to float compares
            # of i1 values, which LLVM rejects
            a, b = (self._as(s, "int") for s in node.src)
            return f"({a} {BINARY_INFIX['ne' if op == 'xor' else op]} {b})"
        a, b = (self._as(s, target) for s in node.src)
        if op in BINARY_INFIX:
            return f"({a} {BINARY_INFIX[op]} {b})"
        if op == "truediv":
            return f"({a} / {b})"
        if op in ("floordiv", "mod") and target == "int":
            # NOTE: a zero divisor traps (SIGFPE kills the process); call_ranges.check_call has
            # raised ZeroDivisionError for any call whose divisor can be 0, so the guard never acts
            safe = f"T.if_then_else({b} == T.int64(0), T.int64(1), {b})" if divides(node) else b
            return f"T.{'floordiv' if op == 'floordiv' else 'floormod'}({a}, {safe})"
        if op == "floordiv":
            return f"T.floor({a} / {b})"
        if op == "mod":  # torch.remainder: fmod, moved to the divisor's sign (a - floor(a/b) b rounds)
            r = f'T.call_pure_extern("float32", "fmodf", {a}, {b})'
            zero = "T.float32(0.0)"
            moved = f"T.And({r} != {zero}, T.if_then_else({r} < {zero}, {b} > {zero}, {b} < {zero}))"
            return f"T.if_then_else({moved}, {r} + {b}, {r})"
        if op == "pow":
            return f"T.pow({a}, {b})"
        if op in ("minimum", "maximum"):
            return f"T.{'min' if op == 'minimum' else 'max'}({a}, {b})"
        if op in ("and", "or") and target == "bool":
            return f"T.And({a}, {b})" if op == "and" else f"T.Or({a}, {b})"
        if op in ("and", "or", "xor"):
            return f"T.bitwise_{op}({a}, {b})"
        if op in ("lshift", "rshift"):  # torch: past 63 or below 0, << gives 0 and >> the sign
            legal = f"T.And({b} >= T.int64(0), {b} < T.int64(64))"
            if op == "lshift":
                amount = f"T.min(T.max({b}, T.int64(0)), T.int64(63))"
                return f"T.if_then_else({legal}, T.shift_left({a}, {amount}), T.int64(0))"
            return f"T.shift_right({a}, T.if_then_else({legal}, {b}, T.int64(63)))"
        raise NotImplementedError(f"no TVM rendering for op {op!r}")
