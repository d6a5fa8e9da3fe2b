"""Abstract interpretation of mask expressions over tiles: intervals, affine forms, three-valued logic.

One evaluation classifies every tile of a block map at once. Index variables are not numbers
but *ranges*, held in tensors laid out ``[B', H', nq, nkv]`` (size-1 where a value does not
depend on that axis): ``q_idx`` of q tile ``i`` is ``[q_lo[i], q_hi[i]]`` (``q_offset``
included), ``kv_idx`` of kv tile ``j`` is ``[kv_lo[j], kv_hi[j]]``, ``b`` and ``h`` are exact
(one map row per batch or head). Work is a few tensor operations per expression node, so
proportional to the number of tiles, never to ``Lq x Lkv``.

Three facets keep the analysis precise where interval arithmetic alone is not:

- **Affine forms.** Integer expressions built from the index variables with ``+ - *const``
  carry their coefficients; their range is computed from the coefficients, so
  ``(q_idx - kv_idx) + kv_idx`` is exactly ``q_idx``, not a widened interval. Over a box of
  independent variables that range is exact.
- **Lazy bounds.** A bound is a *sum of broadcastable terms* (``q``-shaped plus
  ``kv``-shaped): ``q_lo - kv_hi >= 0`` is compared as ``q_lo >= kv_hi`` and only the boolean
  result is tile-sized, which keeps causal and windowed masks cheap at a million tokens.
- **Three-valued booleans.** A boolean is ``(T, F)``: "true on every pair of the tile" and
  "false on every pair"; neither means unknown (the tile is PARTIAL). ``& | ~ ^`` and
  ``where`` follow Kleene's logic, which is sound; a comparison of affine forms is exact.

Soundness is the contract: ``T`` only when every pair is true, ``F`` only when every pair is
false. Modular arithmetic (``%``, ``//``, ``>>``, ``& (2^k - 1)`` by constants) is exact on
intervals that do not wrap; anything not understood widens to an unbounded interval or to
"unknown", never to a wrong answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from attncc.ir.expr import Expr

Tensor = torch.Tensor
Term = Tensor | float
AXES = ("b", "h", "q_idx", "kv_idx")
INF = math.inf


# ---- lazy bounds: sums of broadcastable terms --------------------------------------------


def _normalize(terms: tuple[Term, ...]) -> tuple[Term, ...]:
    """Add terms of the same shape together and all constants into one (kept last)."""
    constant = 0.0
    by_shape: dict[tuple[int, ...], Tensor] = {}
    for term in terms:
        if isinstance(term, Tensor):
            shape = tuple(term.shape)
            by_shape[shape] = by_shape[shape] + term if shape in by_shape else term
        else:
            constant += term
    out: tuple[Term, ...] = tuple(by_shape.values())
    return (*out, constant) if constant != 0.0 or not out else out


def materialize(terms: tuple[Term, ...]) -> Term:
    total: Term = 0.0
    for term in terms:
        total = term + total if isinstance(term, Tensor) else total + term
    return total


def _depends_on_kv(term: Term) -> bool:
    return isinstance(term, Tensor) and term.dim() > 0 and term.shape[-1] > 1


def compare_terms(terms: tuple[Term, ...], op: str, value: float = 0.0) -> Tensor | bool:
    """``sum(terms) op value`` with q-side terms on the left and kv-side terms on the right.

    ``q_lo - kv_hi >= 0`` becomes ``q_lo >= kv_hi``: the operands stay ``[nq, 1]`` and
    ``[1, nkv]`` and only the boolean answer is tile-sized.
    """
    left = materialize(tuple(t for t in terms if not _depends_on_kv(t)))
    right = materialize(tuple(-t for t in terms if _depends_on_kv(t)))
    right = right + value
    result = {"lt": _lt, "le": _le, "gt": _gt, "ge": _ge, "eq": _eq}[op](left, right)
    return bool(result) if not isinstance(result, Tensor) else result


def _lt(a: Term, b: Term) -> Any:
    return a < b


def _le(a: Term, b: Term) -> Any:
    return a <= b


def _gt(a: Term, b: Term) -> Any:
    return a > b


def _ge(a: Term, b: Term) -> Any:
    return a >= b


def _eq(a: Term, b: Term) -> Any:
    return a == b


# ---- abstract values -------------------------------------------------------------------


@dataclass(frozen=True)
class Affine:
    """``const + sum(coef[v] * v)`` over the index variables, with integer coefficients."""

    coef: tuple[tuple[str, int], ...] = ()
    const: float = 0.0

    def scaled(self, factor: float) -> Affine:
        if factor == 0:
            return Affine((), 0.0)
        return Affine(tuple((v, c * factor) for v, c in self.coef), self.const * factor)

    def plus(self, other: Affine) -> Affine:
        merged = dict(self.coef)
        for v, c in other.coef:
            merged[v] = merged.get(v, 0) + c
        return Affine(tuple(sorted((v, c) for v, c in merged.items() if c != 0)), self.const + other.const)


@dataclass(frozen=True)
class IntVal:
    """A numeric range ``[sum(lo), sum(hi)]`` per tile, and its affine form when it has one."""

    lo: tuple[Term, ...]
    hi: tuple[Term, ...]
    affine: Affine | None = None

    def lo_value(self) -> Term:
        return materialize(self.lo)

    def hi_value(self) -> Term:
        return materialize(self.hi)


@dataclass(frozen=True)
class BoolVal:
    """Three-valued boolean per tile: ``T`` true on every pair, ``F`` false on every pair."""

    T: Tensor | bool
    F: Tensor | bool


UNKNOWN = BoolVal(False, False)


def const_val(value: float) -> IntVal:
    return IntVal((float(value),), (float(value),), Affine((), float(value)))


def range_val(lo: Term, hi: Term) -> IntVal:
    return IntVal((lo,), (hi,), None)


UNBOUNDED = range_val(-INF, INF)


# ---- the evaluation environment --------------------------------------------------------


@dataclass
class TileEnv:
    """Ranges of the index variables per tile, and how to summarize loads of captured tensors.

    ``ranges[v] = (lo, hi)`` are 4-D tensors (``[B',1,1,1]``, ``[1,H',1,1]``, ``[1,1,nq,1]``,
    ``[1,1,1,nkv]`` or a band ``[1,1,nq,w]``), float64. ``load`` turns a load node and the abstract
    values of its indices into an abstract value (see ``attncc.passes.summaries``).
    """

    ranges: Mapping[str, tuple[Tensor, Tensor]]
    load: Callable[[Expr, list[Any]], Any] | None = None
    memo: dict[Expr, Any] = field(default_factory=dict)


def var_val(env: TileEnv, name: str) -> IntVal:
    if name not in env.ranges:
        return UNBOUNDED
    lo, hi = env.ranges[name]
    return IntVal((lo.double(),), (hi.double(),), Affine(((name, 1),), 0.0))


def affine_val(env: TileEnv, form: Affine) -> IntVal:
    """The exact range of an affine form over the box of variable ranges."""
    lo: list[Term] = [form.const]
    hi: list[Term] = [form.const]
    for name, c in form.coef:
        v_lo, v_hi = env.ranges[name] if name in env.ranges else (torch.tensor(-INF), torch.tensor(INF))
        v_lo, v_hi = v_lo.double(), v_hi.double()  # NOTE: no copy when already float64
        lo.append(c * (v_lo if c > 0 else v_hi))
        hi.append(c * (v_hi if c > 0 else v_lo))
    return IntVal(_normalize(tuple(lo)), _normalize(tuple(hi)), form)


def as_int(value: IntVal | BoolVal) -> IntVal:
    if isinstance(value, IntVal):
        return value
    lo = value.T if isinstance(value.T, bool) else value.T.double()
    hi = (not value.F) if isinstance(value.F, bool) else (~value.F).double()
    return range_val(float(lo) if isinstance(lo, bool) else lo, float(hi) if isinstance(hi, bool) else hi)


def as_bool(value: IntVal | BoolVal) -> BoolVal:
    if isinstance(value, BoolVal):
        return value
    return compare(value, const_val(0), "ne")


# ---- three-valued logic ----------------------------------------------------------------


def _and(a: Any, b: Any) -> Any:
    if a is False or b is False:
        return False
    if a is True:
        return b
    if b is True:
        return a
    return a & b


def _or(a: Any, b: Any) -> Any:
    if a is True or b is True:
        return True
    if a is False:
        return b
    if b is False:
        return a
    return a | b


def logic_and(a: BoolVal, b: BoolVal) -> BoolVal:
    return BoolVal(_and(a.T, b.T), _or(a.F, b.F))


def logic_or(a: BoolVal, b: BoolVal) -> BoolVal:
    return BoolVal(_or(a.T, b.T), _and(a.F, b.F))


def logic_not(a: BoolVal) -> BoolVal:
    return BoolVal(a.F, a.T)


def logic_xor(a: BoolVal, b: BoolVal) -> BoolVal:
    return BoolVal(_or(_and(a.T, b.F), _and(a.F, b.T)), _or(_and(a.T, b.T), _and(a.F, b.F)))


def logic_where(c: BoolVal, x: BoolVal, y: BoolVal) -> BoolVal:
    """``where(c, x, y)``: true where the chosen branch is, or where both branches are."""
    T = _or(_or(_and(c.T, x.T), _and(c.F, y.T)), _and(x.T, y.T))
    F = _or(_or(_and(c.T, x.F), _and(c.F, y.F)), _and(x.F, y.F))
    return BoolVal(T, F)


# ---- comparisons -----------------------------------------------------------------------


def difference(a: IntVal, b: IntVal, env: TileEnv | None = None) -> IntVal:
    """``a - b``; from the affine forms when both have one (exact), else by intervals."""
    if a.affine is not None and b.affine is not None and env is not None:
        return affine_val(env, a.affine.plus(b.affine.scaled(-1)))
    return IntVal(_normalize(a.lo + tuple(_neg(t) for t in b.hi)), _normalize(a.hi + tuple(_neg(t) for t in b.lo)))


def _neg(t: Term) -> Term:
    return -t


def compare(a: IntVal, b: IntVal, op: str, env: TileEnv | None = None) -> BoolVal:
    """``a op b`` over every pair of the tile, from the range of ``d = a - b``."""
    d = difference(a, b, env)
    if op == "lt":
        return BoolVal(compare_terms(d.hi, "lt"), compare_terms(d.lo, "ge"))
    if op == "le":
        return BoolVal(compare_terms(d.hi, "le"), compare_terms(d.lo, "gt"))
    if op == "gt":
        return BoolVal(compare_terms(d.lo, "gt"), compare_terms(d.hi, "le"))
    if op == "ge":
        return BoolVal(compare_terms(d.lo, "ge"), compare_terms(d.hi, "lt"))
    always = _and(compare_terms(d.lo, "ge"), compare_terms(d.hi, "le"))
    never = _or(compare_terms(d.lo, "gt"), compare_terms(d.hi, "lt"))
    return BoolVal(always, never) if op == "eq" else BoolVal(never, always)


# ---- integer operations ----------------------------------------------------------------


def _lohi(v: IntVal) -> tuple[Term, Term]:
    return v.lo_value(), v.hi_value()


def _const_of(v: IntVal) -> float | None:
    if v.affine is not None and not v.affine.coef:
        return v.affine.const
    return None


def _tmin(a: Term, b: Term) -> Term:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return torch.minimum(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))
    return min(a, b)


def _tmax(a: Term, b: Term) -> Term:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return torch.maximum(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))
    return max(a, b)


def floor_div(x: Term, c: float) -> Term:
    """``floor(x / c)`` keeping infinities (``torch.div(..., rounding_mode="floor")`` gives NaN there).

    NOTE: ``torch.floor`` is avoided: on a loaded 2-core machine its parallel kernel takes
    tens of milliseconds even for a few thousand elements.
    """
    if not isinstance(x, Tensor):
        return math.floor(x / c) if math.isfinite(x) else x * math.copysign(1.0, c)
    q = torch.div(x, c, rounding_mode="floor")
    return torch.where(q != q, x * math.copysign(1.0, c), q)


def _select(cond: Tensor | bool, a: Term, b: Term) -> Term:
    if cond is True:
        return a
    if cond is False:
        return b
    return torch.where(cond, torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))


def add(a: IntVal, b: IntVal, env: TileEnv) -> IntVal:
    if a.affine is not None and b.affine is not None:
        return affine_val(env, a.affine.plus(b.affine))
    return IntVal(_normalize(a.lo + b.lo), _normalize(a.hi + b.hi))


def neg(a: IntVal, env: TileEnv) -> IntVal:
    if a.affine is not None:
        return affine_val(env, a.affine.scaled(-1))
    return IntVal(tuple(_neg(t) for t in a.hi), tuple(_neg(t) for t in a.lo))


def mul(a: IntVal, b: IntVal, env: TileEnv) -> IntVal:
    ca, cb = _const_of(a), _const_of(b)
    if cb is not None and a.affine is not None:
        return affine_val(env, a.affine.scaled(cb))
    if ca is not None and b.affine is not None:
        return affine_val(env, b.affine.scaled(ca))
    if cb is not None or ca is not None:
        c, v = (cb, a) if cb is not None else (ca, b)
        if c == 0:
            return const_val(0)
        lo = tuple(t * c for t in (v.lo if c > 0 else v.hi))
        hi = tuple(t * c for t in (v.hi if c > 0 else v.lo))
        return IntVal(lo, hi)
    a_lo, a_hi = _lohi(a)
    b_lo, b_hi = _lohi(b)
    corners = [torch.nan_to_num(torch.as_tensor(x * y, dtype=torch.float64), nan=0.0)
               for x in (a_lo, a_hi) for y in (b_lo, b_hi)]
    lo, hi = corners[0], corners[0]
    for c in corners[1:]:
        lo, hi = torch.minimum(lo, c), torch.maximum(hi, c)
    return range_val(lo, hi)


def floordiv(a: IntVal, b: IntVal) -> IntVal:
    c = _const_of(b)
    if c is None or c == 0:
        return UNBOUNDED
    lo, hi = _lohi(a)
    if c < 0:
        lo, hi = hi, lo
    return range_val(floor_div(lo, c), floor_div(hi, c))


def mod(a: IntVal, b: IntVal) -> IntVal:
    """``a % c`` (floor semantics): exact while ``[lo, hi]`` does not wrap around a multiple of c."""
    c = _const_of(b)
    if c is None or c == 0:
        return UNBOUNDED
    if c < 0:
        return range_val(c + 1, 0.0)
    lo, hi = _lohi(a)
    full = (0.0, float(c - 1))
    if not isinstance(lo, Tensor) and not isinstance(hi, Tensor) and not (math.isfinite(lo) and math.isfinite(hi)):
        return range_val(*full)
    lo_t = torch.as_tensor(lo, dtype=torch.float64)
    hi_t = torch.as_tensor(hi, dtype=torch.float64)
    lo_m = lo_t - c * torch.div(lo_t, c, rounding_mode="floor")
    hi_m = hi_t - c * torch.div(hi_t, c, rounding_mode="floor")
    fits = (hi_t - lo_t < c) & (lo_m <= hi_m)  # NOTE: false on infinite bounds (inf and NaN compare false)
    return range_val(_select(fits, lo_m, full[0]), _select(fits, hi_m, full[1]))


def minimum(a: IntVal, b: IntVal) -> IntVal:
    (a_lo, a_hi), (b_lo, b_hi) = _lohi(a), _lohi(b)
    return range_val(_tmin(a_lo, b_lo), _tmin(a_hi, b_hi))


def maximum(a: IntVal, b: IntVal) -> IntVal:
    (a_lo, a_hi), (b_lo, b_hi) = _lohi(a), _lohi(b)
    return range_val(_tmax(a_lo, b_lo), _tmax(a_hi, b_hi))


def absolute(a: IntVal) -> IntVal:
    lo, hi = _lohi(a)
    lo_t = torch.as_tensor(lo, dtype=torch.float64)
    hi_t = torch.as_tensor(hi, dtype=torch.float64)
    new_lo = torch.where(lo_t >= 0, lo_t, torch.where(hi_t <= 0, -hi_t, torch.zeros_like(lo_t)))
    new_hi = torch.maximum(lo_t.abs(), hi_t.abs())
    return range_val(new_lo, new_hi)


def bit_and(a: IntVal, b: IntVal) -> IntVal:
    """``x & m`` with ``m = 2^k - 1`` is ``x % 2^k``; with any other ``m >= 0`` it lies in ``[0, m]``."""
    for x, m in ((a, b), (b, a)):
        c = _const_of(m)
        if c is not None and c >= 0:
            if int(c + 1) & int(c) == 0:
                return mod(x, const_val(c + 1))
            return range_val(0.0, float(c))
    return UNBOUNDED


def shift(a: IntVal, b: IntVal, left: bool, env: TileEnv) -> IntVal:
    c = _const_of(b)
    if c is None or c < 0 or c > 62:
        return UNBOUNDED
    factor = const_val(2.0**c)
    return mul(a, factor, env) if left else floordiv(a, factor)


def where_int(cond: BoolVal, x: IntVal, y: IntVal) -> IntVal:
    (x_lo, x_hi), (y_lo, y_hi) = _lohi(x), _lohi(y)
    lo = _select(cond.T, x_lo, _select(cond.F, y_lo, _tmin(x_lo, y_lo)))
    hi = _select(cond.T, x_hi, _select(cond.F, y_hi, _tmax(x_hi, y_hi)))
    return range_val(lo, hi)


_MONOTONE_UP: dict[str, Callable[[Tensor], Tensor]] = {
    "exp": torch.exp, "exp2": torch.exp2, "log": torch.log, "log2": torch.log2, "sqrt": torch.sqrt,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu, "floor": torch.floor,
    "ceil": torch.ceil, "erf": torch.erf, "softplus": torch.nn.functional.softplus,
    "logsigmoid": torch.nn.functional.logsigmoid, "elu": torch.nn.functional.elu,
}


def monotone(op: str, a: IntVal) -> IntVal:
    """Monotone non-decreasing functions map endpoints to endpoints (NaN widens to unbounded)."""
    fn = _MONOTONE_UP[op]
    lo, hi = (torch.as_tensor(x, dtype=torch.float64) for x in _lohi(a))
    new_lo, new_hi = fn(lo), fn(hi)
    return range_val(torch.nan_to_num(new_lo, nan=-INF), torch.nan_to_num(new_hi, nan=INF))


# ---- the evaluator ---------------------------------------------------------------------

_CMP = {"eq", "ne", "lt", "le", "gt", "ge"}


def truncated(value: IntVal) -> IntVal:
    """A float range cast to int: truncated toward zero (monotone, so the ends map to the ends),
    and no longer affine (``0.001 * (kv - q)`` in [-0.127, -0.001] truncates to 0, not below 0)."""

    def trunc(t: Term) -> Term:
        if isinstance(t, Tensor):
            return torch.trunc(t)
        return t if math.isinf(t) else float(math.trunc(t))

    return range_val(trunc(value.lo_value()), trunc(value.hi_value()))


def abstract_eval(expr: Expr, env: TileEnv) -> IntVal | BoolVal:
    """Evaluate ``expr`` over every tile at once (memoized; a node already in ``env.memo`` is
    taken as is and its children are not visited, which is how ``seed_kv_only`` saves work)."""
    stack = [expr]
    while stack:
        node = stack[-1]
        if node in env.memo:
            stack.pop()
            continue
        pending = [s for s in node.src if s not in env.memo]
        if pending:
            stack.extend(pending)
            continue
        stack.pop()
        value = _eval_node(node, [env.memo[s] for s in node.src], env)
        env.memo[node] = within_int64(value) if node.dtype == "int" and isinstance(value, IntVal) else value
    return env.memo[expr]


INT_EXACT = 2.0**53
WIDEN_PER_TILE_MAX = 1 << 22  # tiles; past it a range that may wrap somewhere is unbounded everywhere


def within_int64(value: IntVal) -> IntVal:
    """``value``, or unbounded on the tiles where its range may leave ``(-2**53, 2**53)``.

    Why: torch and the kernels compute integer expressions in int64, which wraps past 2**63
    (``q_idx * 2**62`` is negative at ``q_idx = 2``), while the bounds here are exact sums in
    float64, which holds integers exactly only up to 2**53. Checking every integer node keeps
    the proofs sound by induction: a node whose operands did not wrap and whose range stays
    inside cannot wrap either. A range unbounded on one side is widened on both (``max(t, 0) * 2``
    may wrap negative). The bounds are strict: 2**53 + 1 rounds to 2**53 in float64.

    The per-term extremes bound the sums from outside without tile-sized tensors; only where
    they fail are the sums built, to widen just the tiles that leave (one tile's infinite range
    must not hide another's 2**70).
    """
    low = sum(float(t.min()) if isinstance(t, Tensor) else t for t in value.lo if not _empty(t))
    high = sum(float(t.max()) if isinstance(t, Tensor) else t for t in value.hi if not _empty(t))
    if -INT_EXACT < low and high < INT_EXACT:  # NOTE: false for NaN and for infinities
        return value
    shapes = [tuple(t.shape) for t in (*value.lo, *value.hi) if isinstance(t, Tensor)]
    if not shapes or math.prod(torch.broadcast_shapes(*shapes)) > WIDEN_PER_TILE_MAX:
        return UNBOUNDED
    lo, hi = value.lo_value(), value.hi_value()
    lo, hi = torch.as_tensor(lo, dtype=torch.float64), torch.as_tensor(hi, dtype=torch.float64)
    outside = ~((-INT_EXACT < lo) & (hi < INT_EXACT))
    return range_val(lo.masked_fill(outside, -INF), hi.masked_fill(outside, INF))


def _empty(t: Term) -> bool:
    return isinstance(t, Tensor) and t.numel() == 0


def _gather_kv(x: Any, band: Tensor) -> Any:
    """``x[..., i, band[i]]``: a value laid out over all kv tiles, restricted to a band ``[nq, w]``."""
    if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[-1] == 1:
        return x
    if x.shape[-2] == 1:
        return x[..., 0, :][..., band]
    return torch.gather(x, -1, band.expand(*x.shape[:-2], *band.shape))


def restrict_kv(value: Any, band: Tensor) -> Any:
    """An abstract value over all kv tiles, restricted to the kv tiles of ``band [nq, w]``."""
    if isinstance(value, IntVal):
        return range_val(_gather_kv(value.lo_value(), band), _gather_kv(value.hi_value(), band))
    if isinstance(value, BoolVal):
        return BoolVal(_gather_kv(value.T, band), _gather_kv(value.F, band))
    return value


def seed_kv_only(expr: Expr, full: TileEnv, banded: TileEnv, band: Tensor) -> None:
    """Evaluate the kv-only, non-affine sub-expressions once over all kv tiles (``[1, nkv]``) and
    gather them into the banded environment, instead of recomputing them on ``[nq, w]`` tiles."""
    free: dict[Expr, frozenset[str]] = {}
    for node in expr.walk():  # children first: free variables bottom-up, one pass
        names = frozenset((node.arg,)) if node.op == "var" else frozenset().union(*(free[c] for c in node.src))
        free[node] = names
        if "kv_idx" not in names or "q_idx" in names or node.op in ("var", "const", "input"):
            continue
        value = abstract_eval(node, full)
        if isinstance(value, IntVal) and value.affine is not None:
            continue
        banded.memo[node] = restrict_kv(value, band)


def _eval_node(node: Expr, args: list[Any], env: TileEnv) -> Any:
    op = node.op
    if op == "var":
        return var_val(env, node.arg)
    if op == "const":
        if node.dtype == "bool":
            return BoolVal(bool(node.arg), not bool(node.arg))
        return const_val(float(node.arg))
    if op == "input":
        return None  # a tensor, only meaningful under a load
    if op == "load":
        if env.load is None:
            return UNKNOWN if node.dtype == "bool" else UNBOUNDED
        return env.load(node, args[1:])
    if op == "cast":
        if node.dtype == "bool":
            return as_bool(args[0])
        if node.dtype == "int" and node.src[0].dtype == "float":
            return truncated(as_int(args[0]))
        return as_int(args[0])
    if op == "where":
        cond = as_bool(args[0])
        if node.dtype == "bool":
            return logic_where(cond, as_bool(args[1]), as_bool(args[2]))
        return where_int(cond, as_int(args[1]), as_int(args[2]))
    if op in ("not", "invert") and node.dtype == "bool":
        return logic_not(as_bool(args[0]))
    if op in ("and", "or", "xor") and node.dtype == "bool":
        fn = {"and": logic_and, "or": logic_or, "xor": logic_xor}[op]
        return fn(as_bool(args[0]), as_bool(args[1]))
    if op in _CMP:
        a, b = args
        if isinstance(a, BoolVal) and isinstance(b, BoolVal) and op in ("eq", "ne"):
            same = logic_not(logic_xor(a, b))
            return same if op == "eq" else logic_not(same)
        return compare(as_int(a), as_int(b), op, env)
    if len(args) == 1:
        return _unary(op, as_int(args[0]), env)
    return _binary(op, as_int(args[0]), as_int(args[1]), env)


def _unary(op: str, a: IntVal, env: TileEnv) -> IntVal:
    if op == "neg":
        return neg(a, env)
    if op == "invert":  # ~x == -x - 1 on integers
        return add(neg(a, env), const_val(-1), env)
    if op == "abs":
        return absolute(a)
    if op in _MONOTONE_UP:
        return monotone(op, a)
    if op in ("sin", "cos"):
        return range_val(-1.0, 1.0)
    return UNBOUNDED


def _binary(op: str, a: IntVal, b: IntVal, env: TileEnv) -> IntVal:
    if op == "add":
        return add(a, b, env)
    if op == "sub":
        return add(a, neg(b, env), env)
    if op == "mul":
        return mul(a, b, env)
    if op == "floordiv":
        return floordiv(a, b)
    if op == "mod":
        return mod(a, b)
    if op == "minimum":
        return minimum(a, b)
    if op == "maximum":
        return maximum(a, b)
    if op == "and":
        return bit_and(a, b)
    if op in ("lshift", "rshift"):
        return shift(a, b, op == "lshift", env)
    if op == "truediv":
        c = _const_of(b)
        if c is not None and c != 0:
            lo, hi = _lohi(a)
            return range_val(lo / c, hi / c) if c > 0 else range_val(hi / c, lo / c)
    return UNBOUNDED


def classify(value: BoolVal, shape: tuple[int, ...]) -> Tensor:
    """Tile classes from a three-valued mask: 2 FULL (always true), 0 EMPTY (always false), 1 PARTIAL."""
    T = torch.as_tensor(value.T, dtype=torch.bool).expand(shape)
    F = torch.as_tensor(value.F, dtype=torch.bool).expand(shape)
    out = torch.ones(shape, dtype=torch.int8)
    out.masked_fill_(F, 0)
    out.masked_fill_(T, 2)
    return out
