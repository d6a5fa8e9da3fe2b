"""Half-plane conjuncts: which mask terms a kernel may test at a box's corners, and why that is sound."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from attncc.ir import expr as ex
from attncc.passes.halfplanes import halfplane_conjuncts, is_halfplane, only_halfplanes

Q, KV, B, H = ex.var("q_idx"), ex.var("kv_idx"), ex.var("b"), ex.var("h")


def _affine(a: int, b: int, c: int) -> ex.Expr:
    return ex.binary("add", ex.binary("add", ex.binary("mul", ex.const(a), Q), ex.binary("mul", KV, ex.const(b))),
                     ex.const(c))


def test_window_and_causal_terms_are_halfplanes() -> None:
    causal = ex.binary("ge", Q, KV)
    near = ex.binary("lt", ex.binary("sub", Q, KV), ex.const(256))
    assert halfplane_conjuncts(ex.binary("and", causal, near)) == (causal, near)


def test_only_halfplanes_needs_every_conjunct() -> None:
    causal = ex.binary("ge", Q, KV)
    assert only_halfplanes(ex.binary("and", causal, ex.binary("lt", ex.binary("sub", Q, KV), ex.const(256))))
    assert not only_halfplanes(ex.binary("and", causal, ex.binary("eq", B, ex.const(0))))
    assert not only_halfplanes(None)


def test_non_convex_or_run_time_terms_are_not() -> None:
    """``==`` / ``!=`` sets are not convex; ``b``/``h`` and products of positions are not affine."""
    assert not is_halfplane(ex.binary("ne", Q, KV))
    assert not is_halfplane(ex.binary("eq", Q, KV))
    assert not is_halfplane(ex.binary("ge", ex.binary("add", Q, H), KV))
    assert not is_halfplane(ex.binary("ge", ex.binary("mul", Q, KV), ex.const(3)))
    assert halfplane_conjuncts(ex.binary("or", ex.binary("ge", Q, KV), ex.binary("lt", KV, ex.const(4)))) == ()
    assert halfplane_conjuncts(None) == ()


@settings(max_examples=200, deadline=None)
@given(st.integers(-3, 3), st.integers(-3, 3), st.integers(-40, 40), st.sampled_from(["lt", "le", "gt", "ge"]),
       st.integers(0, 50), st.integers(0, 50), st.integers(0, 6), st.integers(0, 6))
def test_false_at_every_corner_means_false_on_the_box(a, b, c, op, q0, k0, dq, dk) -> None:
    """What ``kernels._live_box`` relies on: a half-plane false at a box's four corners is false
    on every (query, key) pair of the box."""
    term = ex.binary(op, _affine(a, b, c), ex.const(0))
    assert is_halfplane(term)

    def holds(q: int, k: int) -> bool:
        value = a * q + b * k + c
        return {"lt": value < 0, "le": value <= 0, "gt": value > 0, "ge": value >= 0}[op]

    corners = [holds(q, k) for q, k in itertools.product((q0, q0 + dq), (k0, k0 + dk))]
    if not any(corners):
        assert not any(holds(q, k) for q in range(q0, q0 + dq + 1) for k in range(k0, k0 + dk + 1))


def test_a_term_that_may_wrap_in_int64_is_not_a_halfplane() -> None:
    """``q_idx * 2**62 > 0`` wraps (true at 1 and 5, false at 2 to 4): its corners say nothing of
    the box between them."""
    assert not is_halfplane(ex.binary("gt", ex.binary("mul", Q, ex.const(2**62)), ex.const(0)))
    assert not is_halfplane(ex.binary("ge", ex.binary("mul", ex.binary("mul", Q, ex.const(2**30)), ex.const(2**30)), KV))
    assert is_halfplane(ex.binary("ge", ex.binary("mul", Q, ex.const(2**20)), KV))
