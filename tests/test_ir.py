"""The IR: frozen structural ``Expr`` values, typing rules, the printer and the graph verifier."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import attncc
from attncc.ir import expr as ex
from attncc.ir import nodes
from attncc.ir.evaluate import evaluate
from attncc.ir.expr import Expr, TensorSpec
from attncc.ir.graph import AttentionGraph
from attncc.ir.printer import format_expr, format_graph
from attncc.ir.verify import VerifyError, verify

q_idx, kv_idx, h, score = ex.var("q_idx"), ex.var("kv_idx"), ex.var("h"), ex.var("score")


# ---- values ----------------------------------------------------------------------------------


def test_expr_is_frozen() -> None:
    e = ex.binary("add", q_idx, ex.const(1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.op = "sub"  # type: ignore[misc]


def test_structural_equality_hash_and_key() -> None:
    a = ex.binary("ge", q_idx, ex.binary("sub", kv_idx, ex.const(2)))
    b = ex.binary("ge", ex.var("q_idx"), ex.binary("sub", ex.var("kv_idx"), ex.const(2)))
    assert a is not b and a == b and hash(a) == hash(b) and a.key == b.key
    c = ex.binary("ge", q_idx, ex.binary("sub", kv_idx, ex.const(3)))
    assert a != c and a.key != c.key
    assert len({a, b, c}) == 2


def test_constants_of_different_types_differ() -> None:
    """1, 1.0 and True are equal in Python, but not as IR constants."""
    consts = [ex.const(1), ex.const(1.0), ex.const(True)]
    assert len(set(consts)) == 3 and len({c.key for c in consts}) == 3


def test_signed_zero_and_nan_constants() -> None:
    """0.0 and -0.0 differ (1 / x tells them apart); nan equals nan, so traces are reproducible."""
    assert ex.const(0.0) != ex.const(-0.0) and ex.const(0.0).key != ex.const(-0.0).key
    assert ex.const(float("nan")) == ex.const(float("nan"))
    assert hash(ex.const(float("nan"))) == hash(ex.const(float("nan")))


def test_equality_agrees_with_key() -> None:
    exprs = [ex.const(0.0), ex.const(-0.0), ex.const(0), ex.const(False), q_idx, ex.var("q_idx", "float"),
             ex.unary("neg", q_idx), ex.unary("abs", q_idx), ex.binary("add", q_idx, kv_idx),
             ex.binary("add", kv_idx, q_idx)]
    for a in exprs:
        for b in exprs:
            assert (a == b) == (a.key == b.key)


def test_replace_returns_same_object_when_unchanged() -> None:
    e = ex.binary("add", q_idx, ex.const(1))
    assert e.replace(op="add") is e
    assert e.replace(op="sub") == ex.binary("sub", q_idx, ex.const(1))


def test_deep_trees_do_not_recurse() -> None:
    """A score built in a Python loop of thousands of steps: walk, key, == and evaluate work."""

    def build() -> Expr:
        e = score
        for i in range(5000):
            e = ex.binary("add", e, ex.const(float(i % 3)))
        return e

    first, second = build(), build()
    assert first == second and first.key == second.key
    assert len(first.walk()) == 5000 + 1 + 3
    value = evaluate(first, {"score": torch.zeros(1, dtype=torch.float64)}, {})
    assert value.item() == sum(float(i % 3) for i in range(5000))


def test_walk_children_first_and_distinct() -> None:
    shared = ex.binary("sub", q_idx, kv_idx)
    e = ex.binary("mul", shared, shared)
    order = e.walk()
    assert order == [q_idx, kv_idx, shared, e]


def test_substitute_free_vars_and_inputs() -> None:
    spec = TensorSpec("slopes", (4,), "float32")
    e = ex.binary("sub", score, ex.binary("mul", ex.load(ex.input_ref(spec), (h,)), ex.binary("sub", q_idx, kv_idx)))
    assert e.free_vars() == {"score", "h", "q_idx", "kv_idx"}
    assert e.inputs() == (spec,)
    shifted = ex.substitute(e, {q_idx: ex.binary("add", q_idx, ex.const(3))})
    assert "q_idx + 3" in format_expr(shifted)
    assert ex.substitute(e, {}) == e


def test_partial_loads_flatten_and_check_indices() -> None:
    spec = TensorSpec("intervals", (3, 2), "int64")
    base = ex.input_ref(spec)
    partial = ex.load(base, (ex.var("b"),))
    assert partial.shape == (2,)
    assert ex.load(partial, (ex.const(0),)) == ex.load(base, (ex.var("b"), ex.const(0)))
    with pytest.raises(IndexError, match="intervals"):
        ex.load(base, (q_idx, kv_idx, h))
    with pytest.raises(TypeError, match="floating-point"):
        ex.load(base, (score,))


def test_typing_rules() -> None:
    mask = ex.binary("ge", q_idx, kv_idx)
    assert mask.dtype == "bool"
    assert ex.binary("add", q_idx, kv_idx).dtype == "int"
    assert ex.binary("add", mask, mask).dtype == "int"
    assert ex.binary("truediv", q_idx, ex.const(2)).dtype == "float"
    assert ex.binary("floordiv", q_idx, ex.const(2)).dtype == "int"
    assert ex.binary("mul", q_idx, score).dtype == "float"
    assert ex.binary("and", mask, mask).dtype == "bool"
    assert ex.binary("xor", q_idx, kv_idx).dtype == "int"
    assert ex.unary("exp", q_idx).dtype == "float"
    assert ex.unary("abs", q_idx).dtype == "int"
    assert ex.unary("not", mask).dtype == "bool"
    assert ex.where(mask, q_idx, score).dtype == "float"
    with pytest.raises(TypeError, match="bitwise"):
        ex.binary("lshift", score, q_idx)


def test_evaluate_follows_ir_types() -> None:
    """bool + bool is an int sum (not torch's logical or); int / int is a float; floor semantics."""
    env = {"q_idx": torch.tensor([-7, -1, 0, 5]), "kv_idx": torch.tensor([2, 2, 3, 3])}
    ge, lt = ex.binary("ge", q_idx, ex.const(-1)), ex.binary("lt", q_idx, ex.const(5))
    assert evaluate(ex.binary("add", ge, lt), env, {}).tolist() == [1, 2, 2, 1]
    assert evaluate(ex.binary("truediv", q_idx, kv_idx), env, {}).tolist() == [-3.5, -0.5, 0.0, 5 / 3]
    assert evaluate(ex.binary("floordiv", q_idx, kv_idx), env, {}).tolist() == [-4, -1, 0, 1]
    assert evaluate(ex.binary("mod", q_idx, kv_idx), env, {}).tolist() == [1, 1, 0, 2]
    assert evaluate(ex.unary("abs", ge), env, {}).tolist() == [0, 1, 1, 1]


# ---- printer: the text reads back as Python with the same value --------------------------------

GRID = {
    "b": torch.arange(2).view(2, 1, 1, 1), "h": torch.arange(3).view(1, 3, 1, 1),
    "q_idx": torch.arange(5).view(1, 1, 5, 1) - 2, "kv_idx": torch.arange(4).view(1, 1, 1, 4),
    "score": torch.linspace(-3, 3, 2 * 3 * 5 * 4, dtype=torch.float64).view(2, 3, 5, 4),
}
TABLE = TensorSpec("table", (6,), "float64")
TABLE_VALUES = {"table": torch.tensor([0.5, -1.0, 2.0, 0.0, 4.0, -3.5], dtype=torch.float64)}


def _t(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, bool):
        return torch.tensor(x)
    return torch.tensor(x, dtype=torch.int64 if isinstance(x, int) else torch.float64)


def _float_fn(fn):
    return lambda x: fn(_t(x).to(torch.float64))


READBACK = {
    "inf": math.inf, "nan": math.nan, "table": TABLE_VALUES["table"],
    "where": lambda c, a, b: torch.where(_t(c), _t(a), _t(b)),
    "minimum": lambda a, b: torch.minimum(_t(a), _t(b)), "maximum": lambda a, b: torch.maximum(_t(a), _t(b)),
    "abs": lambda x: torch.abs(_t(x)), "relu": lambda x: torch.relu(_t(x)),
    "float": lambda x: _t(x).to(torch.float64), "int": lambda x: _t(x).to(torch.int64),
    "bool": lambda x: _t(x).to(torch.bool),
    **{name: _float_fn(getattr(torch, name)) for name in ("exp", "tanh", "sigmoid", "erf", "exp2")},
}


@st.composite
def _expr(draw, depth: int) -> Expr:
    if depth == 0:
        return draw(st.sampled_from([q_idx, kv_idx, h, ex.var("b"), score, ex.const(3), ex.const(-2),
                                     ex.const(0.5), ex.const(-1.5), ex.const(-0.0), ex.const(0.1), ex.const(-1 / 3)]))
    a, b = draw(_expr(depth - 1)), draw(_expr(depth - 1))
    options: list[Expr] = []
    if a.dtype != "bool" and b.dtype != "bool":
        options += [ex.binary(op, a, b) for op in ("add", "sub", "mul", "minimum", "maximum", "lt", "ge", "eq")]
        options.append(ex.unary("neg", a))
        options.append(ex.binary("pow", ex.binary("add", ex.unary("abs", a), ex.const(0.5)),
                                 draw(st.sampled_from([ex.const(2), ex.const(-1), ex.const(0.5)]))))
        options.append(ex.binary("pow", ex.unary("neg", ex.unary("abs", a)), ex.const(2)))
        options.append(ex.binary("pow", ex.const(-2), ex.const(2)))
        options.append(ex.where(ex.binary("gt", a, b), a, b))
        options += [ex.unary(op, a) for op in ("exp", "tanh", "sigmoid", "erf", "abs", "relu")]
        options.append(ex.cast(a, "int"))
        options.append(ex.binary("truediv", a, ex.binary("add", ex.unary("abs", b), ex.const(1))))
    if a.dtype == "int" and b.dtype == "int":
        options += [ex.binary(op, a, b) for op in ("and", "or", "xor")]
        options += [ex.binary("floordiv", a, ex.const(3)), ex.binary("mod", a, ex.const(-3)),
                    ex.binary("rshift", a, ex.const(1)), ex.binary("lshift", a, ex.const(2)),
                    ex.unary("invert", a), ex.load(ex.input_ref(TABLE), (ex.binary("mod", a, ex.const(6)),))]
    if a.dtype == "bool" and b.dtype == "bool":
        options += [ex.binary(op, a, b) for op in ("and", "or", "xor")] + [ex.unary("not", a)]
    if a.dtype == "bool":
        options.append(ex.cast(a, "float"))
    return draw(st.sampled_from(options)) if options else a


@settings(max_examples=80, deadline=None)
@given(_expr(3))
@example(ex.cast(ex.unary("not", ex.binary("lt", ex.const(3), ex.const(3))), "float"))  # ~False is -1 in Python
def test_printed_text_reads_back_to_the_same_values(e: Expr) -> None:
    text = format_expr(e)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        readback = _t(eval(text, {**READBACK}, dict(GRID)))
    finally:
        torch.set_default_dtype(previous)
    got = evaluate(e, GRID, TABLE_VALUES, torch.float64)
    shape = GRID["score"].shape
    expected_dtype = {"bool": torch.bool, "int": torch.int64, "float": torch.float64}[e.dtype]
    torch.testing.assert_close(torch.broadcast_to(readback.to(expected_dtype), shape), torch.broadcast_to(got, shape),
                               rtol=1e-12, atol=1e-12, equal_nan=True, msg=lambda m: f"{text}\n{m}")


def test_printer_examples() -> None:
    assert format_expr(ex.binary("pow", ex.unary("neg", q_idx), ex.const(2))) == "(-q_idx) ** 2"
    assert format_expr(ex.binary("pow", ex.const(-2), ex.const(2))) == "(-2) ** 2"
    assert format_expr(ex.unary("neg", ex.binary("pow", q_idx, ex.const(2)))) == "-q_idx ** 2"
    assert format_expr(ex.binary("sub", q_idx, ex.binary("sub", kv_idx, h))) == "q_idx - (kv_idx - h)"
    mask = ex.binary("and", ex.binary("ge", q_idx, kv_idx), ex.binary("lt", q_idx, ex.const(4)))
    assert format_expr(mask) == "(q_idx >= kv_idx) & (q_idx < 4)"


# ---- graphs ------------------------------------------------------------------------------------


def _causal(b, h, q, k):
    return q >= k


def test_variant_graph_verifies_and_prints() -> None:
    slopes = torch.rand(4)
    var = attncc.variant(lambda s, b, h, q, k: s - slopes[h] * (q - k).abs(), mask=_causal,
                         normalizer=attncc.Softmax(sink=torch.zeros(4)), routing=attncc.TopKBlocks(4, 2))
    graph = verify(var.ir)
    text = format_graph(graph)
    for needle in ("ScoreMod", "MaskMod", "SoftmaxNorm", "TopKBlocksRoute", "Attention", "return %attn0", "slopes"):
        assert needle in text, text
    assert str(graph) == text


def _graph_with(**payloads: object) -> AttentionGraph:
    graph = AttentionGraph("broken")
    for role in ("q", "k", "v"):
        graph.add(role, nodes.Input(role, role))
    operands = {"q": "q", "k": "k", "v": "v"}
    for role, payload in payloads.items():
        operands[role] = graph.add(role + "0", payload)
    graph.outputs.append(graph.add("attn0", nodes.Attention(), **operands))
    return graph


def test_verify_accepts_a_well_formed_graph() -> None:
    verify(_graph_with(normalizer=nodes.SoftmaxNorm(), mask=nodes.MaskMod(ex.binary("ge", q_idx, kv_idx))))


@pytest.mark.parametrize(
    "payloads,needle",
    [
        ({}, "lacks operands ['normalizer']"),
        ({"normalizer": nodes.SoftmaxNorm(), "mask": nodes.MaskMod(ex.binary("sub", q_idx, kv_idx))}, "dtype int"),
        ({"normalizer": nodes.SoftmaxNorm(), "mask": nodes.MaskMod(ex.binary("ge", score, ex.const(0.0)))}, "score"),
        ({"normalizer": nodes.SoftmaxNorm(), "score": nodes.ScoreMod(ex.binary("add", score, ex.var("x")))}, "'x'"),
        ({"normalizer": nodes.LinearNorm("elu1"), "score": nodes.ScoreMod(score)}, "Linear"),
        ({"normalizer": nodes.MaskMod(ex.const(True))}, "normalizer"),
        ({"normalizer": nodes.PointwiseNorm(ex.binary("add", score, q_idx))}, "phi"),
    ],
    ids=["no_normalizer", "int_mask", "mask_reads_score", "unknown_var", "linear_with_score", "wrong_kind",
         "phi_reads_index"],
)
def test_verify_rejects_broken_graphs(payloads: dict, needle: str) -> None:
    with pytest.raises(VerifyError) as info:
        verify(_graph_with(**payloads))
    assert needle in str(info.value)


def test_verify_rejects_cycles_and_missing_outputs() -> None:
    graph = _graph_with(normalizer=nodes.SoftmaxNorm())
    empty = graph.copy()
    empty.outputs.clear()
    with pytest.raises(VerifyError, match="no outputs"):
        verify(empty)
    graph.nx.add_edge("attn0", "q", role="x")
    with pytest.raises(VerifyError, match="cycle"):
        verify(graph)


def test_graph_copy_is_independent() -> None:
    graph = _graph_with(normalizer=nodes.SoftmaxNorm())
    other = graph.copy()
    other.replace_payload("normalizer0", nodes.SigmoidNorm())
    assert isinstance(graph.payload("normalizer0"), nodes.SoftmaxNorm)
    assert graph.fingerprint != other.fingerprint


def test_fingerprint_does_not_depend_on_node_ids() -> None:
    first = _graph_with(normalizer=nodes.SoftmaxNorm())
    second = AttentionGraph("other_name")
    for role in ("q", "k", "v"):
        second.add(role, nodes.Input(role, role))
    second.add("n", nodes.SoftmaxNorm())
    second.outputs.append(second.add("out", nodes.Attention(), q="q", k="k", v="v", normalizer="n"))
    assert first.fingerprint == second.fingerprint


def test_differential_graph_has_two_attentions_and_a_combine() -> None:
    g = attncc.GraphBuilder("diff")
    q1, k1, q2, k2, v = g.inputs("q1", "k1", "q2", "k2", "v")
    lam = g.scalar("lam")
    program = g.build(g.attention(q1, k1, v, mask=_causal) - lam * g.attention(q2, k2, v, mask=_causal))
    graph = verify(program.ir)
    assert len(graph.attention_nodes()) == 2
    (combine,) = list(graph.nodes_of(nodes.Combine))
    assert format_expr(graph.payload(combine).expr) == "o0 - (lam * o1)"
