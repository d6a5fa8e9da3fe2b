"""Simplify: one test per rewrite rule, with the reason it must hold (tvm simplify-test style).

Expression rules are checked as before/after pairs; graph rules show the rewritten IR text
and check that the reference backend gives the same numbers before and after the pass.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from attncc.codegen.reference.attention import run_plan
from attncc.ir import expr as ex
from attncc.ir.expr import Expr, TensorSpec
from attncc.ir.graph import AttentionGraph
from attncc.ir.nodes import Input, MaskMod, ScoreMod, SigmoidNorm, SoftmaxNorm
from attncc.ir.verify import verify
from attncc.passes import simplify as simp
from attncc.passes.lower import graph_to_plan
from attncc.testing import assert_close_to_reference
from attncc.variant import add_attention

Q, KV, H, B = ex.var("q_idx"), ex.var("kv_idx"), ex.var("h"), ex.var("b")
SCORE = ex.var("score")
SLOPES = TensorSpec("slopes", (4,), "float32")
BIAS = TensorSpec("bias", (4,), "float32")


def graph_of(score: Expr | None = None, mask: Expr | None = None, norm: object = None) -> AttentionGraph:
    """One attention over inputs q, k, v (hand-written, no tracing)."""
    g = AttentionGraph("t")
    for role in ("q", "k", "v"):
        g.add(role, Input(role, role))
    payloads: dict[str, object] = {}
    if score is not None:
        payloads["score"] = ScoreMod(score)
    if mask is not None:
        payloads["mask"] = MaskMod(mask)
    payloads["normalizer"] = norm if norm is not None else SoftmaxNorm()
    g.outputs.append(add_attention(g, payloads, q="q", k="k", v="v"))
    return verify(g)


def score_text(graph: AttentionGraph) -> str:
    (attn,) = graph.attention_nodes()
    return str(graph.payload(graph.operands(attn)["score"]).expr)


def tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "slopes": torch.rand(4, generator=gen, dtype=torch.float64),
        "bias": torch.randn(4, generator=gen, dtype=torch.float64),
        "sink": torch.randn(4, generator=gen, dtype=torch.float64),
    }


def operands(Lq: int = 19, Lkv: int = 23) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {n: torch.randn(2, 4, L, 8, generator=gen, dtype=torch.float64) for n, L in (("q", Lq), ("k", Lkv), ("v", Lkv))}


def assert_same_numbers(before: AttentionGraph, after: AttentionGraph, q_offset: int = 0) -> None:
    """The reference backend on the plans of both graphs: outputs (and lse for softmax) agree."""
    ops, ts = operands(), tensors()
    softmax = isinstance(graph_to_plan(before).regions[0].normalizer, SoftmaxNorm)
    ref = run_plan(graph_to_plan(before), ops, ts, scale=None, q_offset=q_offset, return_lse=softmax)
    got = run_plan(graph_to_plan(after), ops, ts, scale=None, q_offset=q_offset, return_lse=softmax)
    if softmax:
        assert_close_to_reference(got[0], ref[0], None, 23)
        assert_close_to_reference(got[1].double(), ref[1].double(), None, 23, what="lse")
    else:
        assert_close_to_reference(got, ref, None, 23)


# ---- expression rules: before / after --------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "why"),
    [
        (ex.binary("add", ex.const(2), ex.const(3)), ex.const(5), "constants fold"),
        (ex.binary("add", Q, ex.binary("mul", ex.const(2), ex.const(3))), ex.binary("add", Q, ex.const(6)),
         "a constant subtree folds inside a larger expression"),
        (ex.binary("floordiv", ex.const(-7), ex.const(2)), ex.const(-4), "floordiv folds with floor semantics"),
        (ex.binary("lt", ex.const(3), ex.const(5)), ex.const(True), "comparisons of constants fold"),
        (ex.binary("floordiv", Q, ex.binary("sub", ex.const(1), ex.const(1))),
         ex.binary("floordiv", Q, ex.const(0)), "division by zero is left for run time, not folded"),
    ],
)
def test_fold_constants(before: Expr, after: Expr, why: str) -> None:
    assert simp.rewrite(before, simp.pm_simplify) == after, why


def test_add_zero() -> None:
    """``x + 0 = x``: adding zero changes no value (floats included, up to the sign of zero)."""
    assert simp.rewrite(ex.binary("add", Q, ex.const(0)), simp.pm_simplify) == Q
    assert simp.rewrite(ex.binary("add", ex.const(0.0), SCORE), simp.pm_simplify) == SCORE


def test_sub_zero_and_div_one() -> None:
    """``x - 0 = x`` and ``x / 1 = x`` hold exactly in every dtype."""
    assert simp.rewrite(ex.binary("sub", SCORE, ex.const(0.0)), simp.pm_simplify) == SCORE
    assert simp.rewrite(ex.binary("truediv", SCORE, ex.const(1.0)), simp.pm_simplify) == SCORE


def test_mul_one() -> None:
    """``x * 1 = x``: exact in floating point."""
    assert simp.rewrite(ex.binary("mul", ex.const(1.0), SCORE), simp.pm_simplify) == SCORE


def test_mul_zero_only_for_ints() -> None:
    """``x * 0 = 0`` for integers; for floats ``inf * 0`` is NaN, so the product must stay."""
    assert simp.rewrite(ex.binary("mul", Q, ex.const(0)), simp.pm_simplify) == ex.const(0)
    float_product = ex.binary("mul", SCORE, ex.const(0.0))
    assert simp.rewrite(float_product, simp.pm_simplify) == float_product


def test_sub_self_only_for_ints() -> None:
    """``x - x = 0`` for integers; ``inf - inf`` is NaN for floats."""
    assert simp.rewrite(ex.binary("sub", Q, Q), simp.pm_simplify) == ex.const(0)
    assert simp.rewrite(ex.binary("sub", SCORE, SCORE), simp.pm_simplify) == ex.binary("sub", SCORE, SCORE)


def test_double_negation() -> None:
    """``-(-x) = x``."""
    assert simp.rewrite(ex.unary("neg", ex.unary("neg", SCORE)), simp.pm_simplify) == SCORE


def test_double_not() -> None:
    """``~~m = m`` for a boolean mask (logical not twice, or invert twice)."""
    m = ex.binary("ge", Q, KV)
    assert simp.rewrite(ex.unary("not", ex.unary("not", m)), simp.pm_simplify) == m
    assert simp.rewrite(ex.unary("invert", ex.unary("invert", m)), simp.pm_simplify) == m


def test_and_true_or_false() -> None:
    """``m & True = m``, ``m | False = m``, ``m & False = False``, ``m | True = True``."""
    m = ex.binary("ge", Q, KV)
    assert simp.rewrite(ex.binary("and", m, ex.const(True)), simp.pm_simplify) == m
    assert simp.rewrite(ex.binary("or", ex.const(False), m), simp.pm_simplify) == m
    assert simp.rewrite(ex.binary("and", m, ex.const(False)), simp.pm_simplify) == ex.const(False)
    assert simp.rewrite(ex.binary("or", m, ex.const(True)), simp.pm_simplify) == ex.const(True)


def test_and_repeated_conjunct() -> None:
    """``a & (a & b) = a & b``: ``causal & sliding_window(w)`` holds the causal term twice; the
    order of first appearance is kept, and distinct terms are left alone."""
    causal = ex.binary("ge", Q, KV)
    near = ex.binary("lt", ex.binary("sub", Q, KV), ex.const(256))
    twice = ex.binary("and", causal, ex.binary("and", causal, near))
    assert simp.rewrite(twice, simp.pm_simplify) == ex.binary("and", causal, near)
    assert simp.rewrite(ex.binary("and", near, causal), simp.pm_simplify) == ex.binary("and", near, causal)


def test_compare_self_int() -> None:
    """``i <= i`` is True for integers (a float could be NaN, so floats are left alone)."""
    assert simp.rewrite(ex.binary("le", Q, Q), simp.pm_simplify) == ex.const(True)
    assert simp.rewrite(ex.binary("ne", Q, Q), simp.pm_simplify) == ex.const(False)
    assert simp.rewrite(ex.binary("eq", SCORE, SCORE), simp.pm_simplify) == ex.binary("eq", SCORE, SCORE)


def test_where_constant_condition() -> None:
    """``where(True, a, b) = a``; ``where(c, a, a) = a``."""
    assert simp.rewrite(ex.where(ex.const(True), SCORE, ex.const(0.0)), simp.pm_simplify) == SCORE
    assert simp.rewrite(ex.where(ex.binary("lt", ex.const(5), ex.const(3)), SCORE, ex.const(0.0)),
                        simp.pm_simplify) == ex.const(0.0)
    assert simp.rewrite(ex.where(ex.binary("ge", Q, KV), SCORE, SCORE), simp.pm_simplify) == SCORE


def test_rewrite_keeps_dtype() -> None:
    """A rewrite never changes a node's dtype: ``q_idx + 0.0`` is still a float."""
    out = simp.rewrite(ex.binary("add", Q, ex.const(0.0)), simp.pm_simplify)
    assert out.dtype == "float" and str(out) == "float(q_idx)"


# ---- graph rules ----------------------------------------------------------------------


def alibi_score() -> Expr:
    slope = ex.load(ex.input_ref(SLOPES), (H,))
    return ex.binary("sub", SCORE, ex.binary("mul", slope, ex.binary("sub", Q, KV)))


def test_alibi_distance_kept_whole_under_softmax() -> None:
    """``score - s[h]*(q_idx - kv_idx)``: ``-s[h]*q_idx`` alone shifts the row, but it balances
    ``s[h]*kv_idx``; apart, both grow with the sequence and float32 loses the distance (steep
    slopes missed the tolerance at 270 keys). The distance stays whole, no row_shift."""
    before = graph_of(alibi_score(), ex.binary("ge", Q, KV))
    after = simp.simplify(before).graph
    assert score_text(after) == "score - (slopes[h] * (q_idx - kv_idx))"
    assert graph_to_plan(after).regions[0].row_shift is None
    assert_same_numbers(before, after)


def row_score() -> Expr:
    """``score + 0.5 * q_idx + bias[h] * q_idx``: terms of the row only, dropped under softmax."""
    bias = ex.load(ex.input_ref(BIAS), (H,))
    return ex.binary("add", ex.binary("add", SCORE, ex.binary("mul", ex.const(0.5), Q)), ex.binary("mul", bias, Q))


def test_row_term_dropped_under_softmax() -> None:
    """A row term that balances nothing growing with kv_idx shifts the whole row: softmax cancels
    it and the lse adds it back (``row_shift``)."""
    before = graph_of(row_score(), ex.binary("ge", Q, KV))
    result = simp.simplify(before)
    assert result.modified
    assert score_text(result.graph) == "score"
    region = graph_to_plan(result.graph).regions[0]
    assert region.row_shift is not None and "q_idx" in str(region.row_shift)
    assert_same_numbers(before, result.graph)
    assert_same_numbers(before, result.graph, q_offset=4)


def test_dropped_row_term_really_cancels() -> None:
    """Without adding ``row_shift`` back, the output (not the lse) is still the same."""
    before = graph_of(row_score(), ex.binary("ge", Q, KV))
    plan = graph_to_plan(simp.simplify(before).graph)
    assert plan.regions[0].row_shift is not None
    stripped = dataclasses.replace(plan, regions=(dataclasses.replace(plan.regions[0], row_shift=None),))
    ops, ts = operands(), tensors()
    ref = run_plan(graph_to_plan(before), ops, ts, scale=None, q_offset=0, return_lse=False)
    got = run_plan(stripped, ops, ts, scale=None, q_offset=0, return_lse=False)
    assert_close_to_reference(got, ref, None, 23)


def test_abs_distance_under_causal_mask() -> None:
    """``abs(q_idx - kv_idx) = q_idx - kv_idx`` wherever a causal mask keeps the key."""
    slope = ex.load(ex.input_ref(SLOPES), (H,))
    score = ex.binary("sub", SCORE, ex.binary("mul", slope, ex.unary("abs", ex.binary("sub", Q, KV))))
    before = graph_of(score, ex.binary("ge", Q, KV))
    after = simp.simplify(before).graph
    assert score_text(after) == "score - (slopes[h] * (q_idx - kv_idx))"
    assert_same_numbers(before, after)


def test_abs_distance_kept_without_causal_mask() -> None:
    """Without a causal mask ``abs`` is not the identity on the kept keys; nothing is dropped."""
    slope = ex.load(ex.input_ref(SLOPES), (H,))
    score = ex.binary("sub", SCORE, ex.binary("mul", slope, ex.unary("abs", ex.binary("sub", Q, KV))))
    after = simp.simplify(graph_of(score)).graph
    assert score_text(after) == "score - (slopes[h] * abs(q_idx - kv_idx))"


def test_row_term_kept_with_sink() -> None:
    """With a sink the denominator holds ``exp(sink)``, which does not shift with the row."""
    sink = TensorSpec("sink", (4,), "float32")
    before = graph_of(alibi_score(), ex.binary("ge", Q, KV), SoftmaxNorm(sink))
    after = simp.simplify(before).graph
    assert score_text(after) == "score - (slopes[h] * (q_idx - kv_idx))"
    assert graph_to_plan(after).regions[0].row_shift is None
    assert_same_numbers(before, after)


def test_row_term_kept_for_sigmoid() -> None:
    """Sigmoid has no row sum: a row shift changes every weight."""
    score = ex.binary("add", SCORE, ex.cast(Q, "float"))
    after = simp.simplify(graph_of(score, None, SigmoidNorm())).graph
    assert score_text(after) == "score + float(q_idx)"


def test_infinite_row_term_kept() -> None:
    """A row term that can be -inf masks whole rows (o = 0); dropping it would change them."""
    score = ex.binary("add", SCORE, ex.where(ex.binary("gt", Q, ex.const(3)), ex.const(0.0), ex.const(-math.inf)))
    before = graph_of(score)
    after = simp.simplify(before).graph
    assert "inf" in score_text(after)
    assert_same_numbers(before, after)


def test_row_only_bias_dropped() -> None:
    """``score + bias[h] + 2*q_idx``: both terms are per row, both go to ``row_shift``."""
    bias = ex.load(ex.input_ref(BIAS), (H,))
    score = ex.binary("add", ex.binary("add", SCORE, bias), ex.binary("mul", ex.const(2), Q))
    before = graph_of(score)
    after = simp.simplify(before).graph
    assert score_text(after) == "score"
    assert "bias" not in after.nx  # the captured input is dead now (its term moved to row_shift)
    assert_same_numbers(before, after)


def test_scale_folded_into_query() -> None:
    """``(score / 2) * ...`` with every use of ``score`` scaled by one constant: q is scaled once."""
    score = ex.binary("mul", ex.const(30.0), ex.unary("tanh", ex.binary("truediv", SCORE, ex.const(30.0))))
    before = graph_of(score)
    after = simp.simplify(before).graph
    assert score_text(after) == "30.0 * tanh(score)"
    assert graph_to_plan(after).regions[0].score_scale == pytest.approx(1 / 30)
    assert_same_numbers(before, after)


def test_scale_not_folded_when_score_is_used_unscaled() -> None:
    """``score * 2 + score`` uses ``score`` unscaled too: nothing can move into q."""
    score = ex.binary("add", ex.binary("mul", SCORE, ex.const(2.0)), SCORE)
    after = simp.simplify(graph_of(score)).graph
    assert score_text(after) == "score * 2.0 + score"
    assert graph_to_plan(after).regions[0].score_scale == 1.0


def test_dead_input_removed() -> None:
    """``where(True, score, score + bias[h])`` no longer reads ``bias``: its input node goes."""
    bias = ex.load(ex.input_ref(BIAS), (H,))
    score = ex.where(ex.const(True), SCORE, ex.binary("add", SCORE, bias))
    before = graph_of(score)
    assert "bias" in before.nx
    after = simp.simplify(before).graph
    assert "bias" not in after.nx and score_text(after) == "score"
    assert graph_to_plan(after).captured == ()
    assert_same_numbers(before, after)


def test_identical_payloads_merged() -> None:
    """Two attentions with equal masks read one mask node (graph-level CSE)."""
    g = AttentionGraph("two")
    for name in ("q1", "q2", "k", "v"):
        g.add(name, Input(name, "tensor"))
    mask = ex.binary("ge", Q, KV)
    a = add_attention(g, {"mask": MaskMod(mask), "normalizer": SoftmaxNorm()}, q="q1", k="k", v="v")
    b = add_attention(g, {"mask": MaskMod(mask), "normalizer": SoftmaxNorm()}, q="q2", k="k", v="v")
    from attncc.ir.nodes import Combine

    g.add("combine0", Combine(ex.binary("sub", ex.var("o0", "float"), ex.var("o1", "float"))), o0=a, o1=b)
    g.outputs.append("combine0")
    verify(g)
    after = simp.simplify(g).graph
    masks = [n for n in after.topological_order() if isinstance(after.payload(n), MaskMod)]
    norms = [n for n in after.topological_order() if isinstance(after.payload(n), SoftmaxNorm)]
    assert len(masks) == 1 and len(norms) == 1
    assert after.operands(a)["mask"] == after.operands(b)["mask"]


def test_mask_identities_in_graph() -> None:
    """``~~(q >= kv) & True`` becomes ``q_idx >= kv_idx`` in the mask node; numbers unchanged."""
    m = ex.binary("and", ex.unary("not", ex.unary("not", ex.binary("ge", Q, KV))), ex.const(True))
    before = graph_of(None, m)
    after = simp.simplify(before).graph
    (attn,) = after.attention_nodes()
    assert str(after.payload(after.operands(attn)["mask"]).expr) == "q_idx >= kv_idx"
    assert_same_numbers(before, after)


def test_input_not_mutated_and_idempotent() -> None:
    """A pass copies: the input graph is unchanged, and a second run finds nothing to do."""
    before = graph_of(alibi_score(), ex.binary("ge", Q, KV))
    text = str(before)
    first = simp.simplify(before)
    assert str(before) == text
    second = simp.simplify(first.graph)
    assert not second.modified and str(second.graph) == str(first.graph)


# ---- every rule at once, against evaluation, on generated expressions ---------------------

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from attncc.ir.evaluate import evaluate  # noqa: E402


def _int_exprs() -> st.SearchStrategy[Expr]:
    leaves = st.one_of(
        st.sampled_from(["q_idx", "kv_idx", "h", "b"]).map(ex.var),
        st.integers(-3, 3).map(ex.const),
    )

    def extend(children: st.SearchStrategy[Expr]) -> st.SearchStrategy[Expr]:
        binary = st.tuples(st.sampled_from(["add", "sub", "mul", "minimum", "maximum"]), children, children)
        divide = st.tuples(st.sampled_from(["floordiv", "mod"]), children, st.sampled_from([1, 2, 3]).map(ex.const))
        return st.one_of(
            binary.map(lambda t: ex.binary(*t)),
            divide.map(lambda t: ex.binary(*t)),
            children.map(lambda c: ex.unary("neg", c)),
            children.map(lambda c: ex.unary("abs", c)),
            st.tuples(_bools(children), children, children).map(lambda t: ex.where(*t)),
        )

    return st.recursive(leaves, extend, max_leaves=8)


def _bools(ints: st.SearchStrategy[Expr]) -> st.SearchStrategy[Expr]:
    compare = st.tuples(st.sampled_from(sorted(ex.COMPARE_OPS)), ints, ints).map(lambda t: ex.binary(*t))
    leaf = st.one_of(compare, st.booleans().map(ex.const))
    return st.recursive(
        leaf,
        lambda c: st.one_of(
            st.tuples(st.sampled_from(["and", "or"]), c, c).map(lambda t: ex.binary(*t)),
            c.map(lambda m: ex.unary("not", m)),
        ),
        max_leaves=4,
    )


def _grid() -> dict[str, torch.Tensor]:
    return {
        "b": torch.arange(2).view(2, 1, 1, 1), "h": torch.arange(3).view(1, 3, 1, 1),
        "q_idx": torch.arange(-2, 7).view(1, 1, -1, 1), "kv_idx": torch.arange(-2, 7).view(1, 1, 1, -1),
    }


@pytest.mark.filterwarnings("ignore:Generating overly large repr")
@given(_int_exprs())
def test_rules_preserve_integer_values(expr: Expr) -> None:
    """Every rule of ``pm_simplify`` (and folding) keeps the value on every index."""
    out = simp.rewrite(expr, simp.pm_simplify)
    assert out.dtype == expr.dtype
    want = torch.broadcast_to(evaluate(expr, _grid(), {}), (2, 3, 9, 9))
    got = torch.broadcast_to(evaluate(out, _grid(), {}), (2, 3, 9, 9))
    assert torch.equal(got, want), f"{expr} -> {out}"


@pytest.mark.filterwarnings("ignore:Generating overly large repr")
@given(_bools(_int_exprs()))
def test_rules_preserve_masks(mask: Expr) -> None:
    out = simp.rewrite(mask, simp.pm_simplify)
    want = torch.broadcast_to(evaluate(mask, _grid(), {}), (2, 3, 9, 9))
    got = torch.broadcast_to(evaluate(out, _grid(), {}), (2, 3, 9, 9))
    assert torch.equal(got, want), f"{mask} -> {out}"
