"""The abstract domain of the sparsify pass, checked against enumeration of every point.

For random integer expressions over ``q_idx`` and ``kv_idx`` and random boxes, the interval
computed by ``abstract_eval`` must contain every value the expression takes in the box
(dense evaluation with ``attncc.ir.evaluate``, the oracle's arithmetic), and a boolean's ``T``/``F``
must only claim what holds at every point. Exactness is checked where the module docstring
promises it: affine forms, and modular atoms whose range does not wrap.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attncc.ir import expr as ex
from attncc.ir.evaluate import evaluate
from attncc.passes.intervals import BoolVal, IntVal, TileEnv, abstract_eval

Q, KV = ex.var("q_idx"), ex.var("kv_idx")


def _box_env(q0: int, q1: int, k0: int, k1: int) -> TileEnv:
    def r(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor([lo]).reshape(1, 1, 1, 1), torch.tensor([hi]).reshape(1, 1, 1, 1)

    return TileEnv({"q_idx": r(q0, q1), "kv_idx": r(k0, k1)})


def _dense(e: ex.Expr, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
    env = {"q_idx": torch.arange(q0, q1 + 1).reshape(-1, 1), "kv_idx": torch.arange(k0, k1 + 1).reshape(1, -1)}
    return evaluate(e, env, {}).expand(q1 - q0 + 1, k1 - k0 + 1)


def _interval(value: IntVal) -> tuple[float, float]:
    return float(torch.as_tensor(value.lo_value()).reshape(-1)[0]), float(torch.as_tensor(value.hi_value()).reshape(-1)[0])


def _flags(value: BoolVal) -> tuple[bool, bool]:
    return bool(torch.as_tensor(value.T).reshape(-1)[0]), bool(torch.as_tensor(value.F).reshape(-1)[0])


small = st.integers(-6, 6)
positive = st.integers(1, 7)


@st.composite
def int_exprs(draw: st.DrawFn, depth: int = 3) -> ex.Expr:
    if depth == 0 or draw(st.booleans()):
        return draw(st.sampled_from([Q, KV, ex.const(draw(small))]))
    kind = draw(st.sampled_from(["add", "sub", "mulc", "floordiv", "mod", "minimum", "maximum", "abs", "neg",
                                 "rshift", "bitand", "where"]))
    a = draw(int_exprs(depth=depth - 1))
    if kind in ("add", "sub", "minimum", "maximum"):
        return ex.binary(kind, a, draw(int_exprs(depth=depth - 1)))
    if kind == "mulc":
        return ex.binary("mul", a, ex.const(draw(small)))
    if kind in ("floordiv", "mod"):
        return ex.binary(kind, a, ex.const(draw(positive) * draw(st.sampled_from([1, -1]))))
    if kind in ("abs", "neg"):
        return ex.unary(kind, a)
    if kind == "rshift":
        return ex.binary("rshift", a, ex.const(draw(st.integers(0, 3))))
    if kind == "bitand":
        return ex.binary("and", a, ex.const(draw(st.integers(0, 9))))
    return ex.where(draw(bool_exprs(depth=depth - 1)), a, draw(int_exprs(depth=depth - 1)))


@st.composite
def bool_exprs(draw: st.DrawFn, depth: int = 3) -> ex.Expr:
    if depth == 0 or draw(st.booleans()):
        op = draw(st.sampled_from(["lt", "le", "gt", "ge", "eq", "ne"]))
        return ex.binary(op, draw(int_exprs(depth=max(depth - 1, 0))), draw(int_exprs(depth=max(depth - 1, 0))))
    kind = draw(st.sampled_from(["and", "or", "xor", "not"]))
    a = draw(bool_exprs(depth=depth - 1))
    if kind == "not":
        return ex.unary("not", a)
    return ex.binary(kind, a, draw(bool_exprs(depth=depth - 1)))


boxes = st.tuples(st.integers(-20, 40), st.integers(0, 12), st.integers(-20, 40), st.integers(0, 12))


@settings(max_examples=100, deadline=None)
@given(int_exprs(), boxes)
def test_integer_interval_contains_every_value(e: ex.Expr, box: tuple[int, int, int, int]) -> None:
    """Soundness: the abstract interval encloses the expression's values over the whole box."""
    q0, qn, k0, kn = box
    value = abstract_eval(e, _box_env(q0, q0 + qn, k0, k0 + kn))
    lo, hi = _interval(value)
    dense = _dense(e, q0, q0 + qn, k0, k0 + kn)
    assert lo <= int(dense.min()) and int(dense.max()) <= hi, (str(e), lo, hi, int(dense.min()), int(dense.max()))


@settings(max_examples=100, deadline=None)
@given(bool_exprs(), boxes)
def test_three_valued_booleans_are_sound(e: ex.Expr, box: tuple[int, int, int, int]) -> None:
    """``T`` only when true at every point, ``F`` only when false at every point."""
    q0, qn, k0, kn = box
    always, never = _flags(abstract_eval(e, _box_env(q0, q0 + qn, k0, k0 + kn)))
    dense = _dense(e, q0, q0 + qn, k0, k0 + kn)
    assert not always or bool(dense.all()), str(e)
    assert not never or not bool(dense.any()), str(e)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=3, max_size=3), boxes)
def test_affine_form_range_is_exact(coefs: list[int], box: tuple[int, int, int, int]) -> None:
    """``a*q + b*kv + c`` written with repeated variables still gets its exact range."""
    a, b, c = coefs
    q0, qn, k0, kn = box
    # q*(a+1) - q + kv*b + c: interval arithmetic alone would widen this, affine forms do not
    e = ex.binary("add", ex.binary("sub", ex.binary("mul", Q, ex.const(a + 1)), Q),
                  ex.binary("add", ex.binary("mul", KV, ex.const(b)), ex.const(c)))
    lo, hi = _interval(abstract_eval(e, _box_env(q0, q0 + qn, k0, k0 + kn)))
    dense = _dense(e, q0, q0 + qn, k0, k0 + kn)
    assert (lo, hi) == (int(dense.min()), int(dense.max()))


def test_difference_of_the_same_variables_is_a_point() -> None:
    """``(q_idx - kv_idx) - (q_idx - kv_idx) == 0`` holds everywhere: proven, not 'unknown'."""
    d = ex.binary("sub", Q, KV)
    e = ex.binary("eq", ex.binary("sub", d, d), ex.const(0))
    assert _flags(abstract_eval(e, _box_env(0, 63, 100, 163))) == (True, False)


@settings(max_examples=100, deadline=None)
@given(positive, st.integers(0, 6), boxes)
def test_modular_comparison_is_exact_unless_the_range_wraps(d: int, r: int, box: tuple[int, int, int, int]) -> None:
    """``(q_idx - kv_idx) % d == r``: decided exactly when the differences cover every residue
    or do not wrap past a multiple of ``d``; a wrapping range is only 'unknown' (still sound)."""
    q0, qn, k0, kn = box
    e = ex.binary("eq", ex.binary("mod", ex.binary("sub", Q, KV), ex.const(d)), ex.const(r))
    always, never = _flags(abstract_eval(e, _box_env(q0, q0 + qn, k0, k0 + kn)))
    dense = _dense(e, q0, q0 + qn, k0, k0 + kn)
    lo, hi = q0 - (k0 + kn), q0 + qn - k0
    assert not always or bool(dense.all())
    assert not never or not bool(dense.any())
    if hi - lo + 1 >= d or lo // d == hi // d:
        assert always == bool(dense.all()) and never == (not bool(dense.any()))


def test_shift_is_floor_division_by_a_power_of_two() -> None:
    """``q >> 3 == kv >> 3`` over aligned boxes of 8 is decided: FULL on the diagonal, EMPTY off it."""
    e = ex.binary("eq", ex.binary("rshift", Q, ex.const(3)), ex.binary("rshift", KV, ex.const(3)))
    assert _flags(abstract_eval(e, _box_env(16, 23, 16, 23))) == (True, False)
    assert _flags(abstract_eval(e, _box_env(16, 23, 24, 31))) == (False, True)


def test_a_range_that_may_wrap_in_int64_is_unbounded() -> None:
    """torch wraps int64: ``q_idx * 2**62 > 0`` holds at q = 1 and 5, fails at 2, 3 and 4. The
    float64 interval [2**62, 5 * 2**62] proved it true on the whole box."""
    e = ex.binary("gt", ex.binary("mul", Q, ex.const(2**62)), ex.const(0))
    dense = _dense(e, 1, 5, 0, 3)
    assert dense.any() and not dense.all()
    assert _flags(abstract_eval(e, _box_env(1, 5, 0, 3))) == (False, False)
    # one-sided: max(q * h, 0) is [0, inf) (h has no range here); twice it may wrap negative
    unknown = ex.binary("maximum", ex.binary("mul", Q, ex.var("h")), ex.const(0))
    twice = abstract_eval(ex.binary("ge", ex.binary("mul", unknown, ex.const(2)), ex.const(0)), _box_env(1, 5, 0, 3))
    assert _flags(twice) == (False, False)
    # within 2**53 nothing changes: an affine range stays exact
    near = ex.binary("mul", ex.binary("sub", Q, KV), ex.const(2**40))
    assert _interval(abstract_eval(near, _box_env(3, 5, 0, 1))) == (2 * 2**40, 5 * 2**40)


def test_the_int64_bound_is_strict_and_per_tile() -> None:
    """2**53 + 1 rounds to 2**53 in float64: ``kv // 100000 + (2**53 + 1) > 2**53`` holds on every
    pair but its float64 range says [2**53, 2**53]. And one tile's unbounded range must not keep
    another tile's 2**70: ``where(q < 64, kv // (q + 1), q * 2**30) * 2**40 > 0`` is false on every
    pair of q in [64, 127] (it wraps to 0 or below), true nowhere there."""
    edge = ex.binary("gt", ex.binary("add", ex.binary("floordiv", KV, ex.const(100000)), ex.const(2**53 + 1)),
                     ex.const(2**53))
    assert _dense(edge, 0, 3, 0, 3).all()
    _, never = _flags(abstract_eval(edge, _box_env(0, 3, 0, 3)))
    assert not never
    picked = ex.where(ex.binary("lt", Q, ex.const(64)), ex.binary("floordiv", KV, ex.binary("add", Q, ex.const(1))),
                      ex.binary("mul", Q, ex.const(2**30)))
    e = ex.binary("gt", ex.binary("mul", picked, ex.const(2**40)), ex.const(0))
    assert not _dense(e, 64, 127, 0, 63).any()
    q_lo, q_hi = torch.tensor([0.0, 64.0]).view(1, 1, 2, 1), torch.tensor([63.0, 127.0]).view(1, 1, 2, 1)
    kv = (torch.tensor([0.0]).view(1, 1, 1, 1), torch.tensor([63.0]).view(1, 1, 1, 1))
    value = abstract_eval(e, TileEnv({"q_idx": (q_lo, q_hi), "kv_idx": kv}))
    assert not bool(torch.as_tensor(value.T).expand(1, 1, 2, 1)[0, 0, 1, 0])
