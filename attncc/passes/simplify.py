"""Simplify: constant folding, algebraic identities, CSE, dead inputs, softmax row terms, scale.

Expression rewrites are rule tables in tinygrad's ``pm_*`` form: each rule is one small
function that matches one situation and returns the replacement, or ``None`` when it does
not apply; ``rewrite`` applies a table bottom-up to a fixed point. Graph rewrites are rules
of the same shape over the graph (``pm_graph``); ``simplify`` runs them in order.

Softmax-specific rewrites (SEMANTICS.md, softmax without sink):
- a score term depending only on ``(b, h, q_idx)`` shifts the whole row, and the row
  normalization cancels it, so it is dropped from the score and recorded as the region's
  ``row_shift`` (the lse adds it back). With a sink the denominator holds ``exp(sink)``,
  which does not move with the row, so nothing is dropped; nor is a row term that balanced a
  term growing with ``kv_idx`` (ALiBi's distance stays whole: float32 would lose it, ``drop_row_terms``);
- a constant factor on ``score`` moves into ``score_scale``: kernels multiply q once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from attncc.ir import expr as ex
from attncc.ir.expr import Expr
from attncc.ir.graph import AttentionGraph
from attncc.ir.nodes import (
    Attention,
    Combine,
    Input,
    LinearNorm,
    MaskMod,
    PointwiseNorm,
    ScoreMod,
    SoftmaxNorm,
    payload_key,
    referenced_specs,
)
from attncc.passes.causality import conjuncts, mask_implies_causal
from attncc.passes.manager import PassResult, attach, facts_of

Rule = Callable[[Expr], Expr | None]
GraphRule = Callable[[AttentionGraph], AttentionGraph | None]

ROW_VARS = frozenset({"b", "h", "q_idx"})


# ---- expression rules ------------------------------------------------------------------


def _is_const(e: Expr, value: object = None) -> bool:
    if e.op != "const":
        return False
    return value is None or (e.arg == value and type(e.arg) is not bool) or e.arg is value


def _as(e: Expr, dtype: str) -> Expr:
    """``e`` at ``dtype`` (the result of a rewrite keeps the dtype of the node it replaces)."""
    return ex.cast(e, dtype)


def fold_constants(e: Expr) -> Expr | None:
    """An operation on constants is a constant (evaluated with the reference's semantics)."""
    if e.op in ex.LEAF_OPS or e.op == "load" or not e.src or not all(s.op == "const" for s in e.src):
        return None
    from attncc.ir.evaluate import evaluate

    try:
        value = evaluate(e, {}, {}, torch.float64).item()
    except (RuntimeError, ZeroDivisionError, ValueError):
        return None  # e.g. integer division by zero: leave it for run time
    if e.dtype == "bool":
        return ex.const(bool(value))
    if e.dtype == "int":
        return ex.const(int(value))
    return ex.const(float(value))


def add_zero(e: Expr) -> Expr | None:
    """``x + 0 = 0 + x = x`` (exact in floats too, up to the sign of a zero result)."""
    if e.op != "add":
        return None
    a, b = e.src
    if _is_const(b, 0):
        return _as(a, e.dtype)
    if _is_const(a, 0):
        return _as(b, e.dtype)
    return None


def sub_zero(e: Expr) -> Expr | None:
    """``x - 0 = x``."""
    if e.op == "sub" and _is_const(e.src[1], 0):
        return _as(e.src[0], e.dtype)
    return None


def mul_one(e: Expr) -> Expr | None:
    """``x * 1 = 1 * x = x`` (exact in floats)."""
    if e.op != "mul":
        return None
    a, b = e.src
    if _is_const(b, 1):
        return _as(a, e.dtype)
    if _is_const(a, 1):
        return _as(b, e.dtype)
    return None


def mul_zero_int(e: Expr) -> Expr | None:
    """``x * 0 = 0`` for integers only: in floats ``inf * 0`` is NaN, not 0."""
    if e.op != "mul" or e.dtype != "int" or "float" in (e.src[0].dtype, e.src[1].dtype):
        return None
    return ex.const(0) if any(_is_const(s, 0) for s in e.src) else None


def sub_self_int(e: Expr) -> Expr | None:
    """``x - x = 0`` for integers (floats: ``inf - inf`` is NaN)."""
    if e.op == "sub" and e.dtype == "int" and e.src[0] == e.src[1]:
        return ex.const(0)
    return None


def div_one(e: Expr) -> Expr | None:
    """``x / 1 = x`` (as a float)."""
    if e.op == "truediv" and _is_const(e.src[1], 1):
        return _as(e.src[0], "float")
    return None


def double_neg(e: Expr) -> Expr | None:
    """``-(-x) = x``."""
    if e.op == "neg" and e.src[0].op == "neg" and e.src[0].src[0].dtype == e.dtype:
        return e.src[0].src[0]
    return None


def double_not(e: Expr) -> Expr | None:
    """``~~m = m`` for booleans (logical not, or bitwise invert of a bool) and ``~~x = x`` for ints."""
    if e.op not in ("not", "invert") or e.src[0].op not in ("not", "invert"):
        return None
    inner = e.src[0].src[0]
    if inner.dtype == "bool" or (e.op == e.src[0].op == "invert" and inner.dtype == e.dtype):
        return _as(inner, e.dtype)
    return None


def and_true(e: Expr) -> Expr | None:
    """``m & True = m``."""
    if e.op == "and" and e.dtype == "bool":
        a, b = e.src
        if _is_const(b, True):
            return a
        if _is_const(a, True):
            return b
    return None


def and_false(e: Expr) -> Expr | None:
    """``m & False = False``."""
    if e.op == "and" and e.dtype == "bool" and any(_is_const(s, False) for s in e.src):
        return ex.const(False)
    return None


def and_repeated(e: Expr) -> Expr | None:
    """``a & (a & b) = a & b``: a conjunct written twice (``causal & sliding_window(w)``, whose
    window already holds the causal term) is evaluated once per score in a kernel."""
    if e.op != "and" or e.dtype != "bool":
        return None
    terms = conjuncts(e)
    unique = list(dict.fromkeys(terms))
    if len(unique) == len(terms):
        return None
    out = unique[0]
    for term in unique[1:]:
        out = ex.binary("and", out, term)
    return out


def or_false(e: Expr) -> Expr | None:
    """``m | False = m``."""
    if e.op == "or" and e.dtype == "bool":
        a, b = e.src
        if _is_const(b, False):
            return a
        if _is_const(a, False):
            return b
    return None


def or_true(e: Expr) -> Expr | None:
    """``m | True = True``."""
    if e.op == "or" and e.dtype == "bool" and any(_is_const(s, True) for s in e.src):
        return ex.const(True)
    return None


def compare_self_int(e: Expr) -> Expr | None:
    """``x == x``, ``x <= x``, ``x >= x`` are True and ``x != x``, ``x < x``, ``x > x`` False for ints."""
    if e.op not in ex.COMPARE_OPS or e.src[0] != e.src[1] or e.src[0].dtype == "float":
        return None
    return ex.const(e.op in ("eq", "le", "ge"))


def where_const_cond(e: Expr) -> Expr | None:
    """``where(True, a, b) = a`` and ``where(False, a, b) = b``."""
    if e.op == "where" and e.src[0].op == "const":
        return _as(e.src[1] if e.src[0].arg else e.src[2], e.dtype)
    return None


def where_same_branches(e: Expr) -> Expr | None:
    """``where(c, a, a) = a``."""
    if e.op == "where" and e.src[1] == e.src[2]:
        return _as(e.src[1], e.dtype)
    return None


pm_fold: tuple[Rule, ...] = (fold_constants,)
pm_identities: tuple[Rule, ...] = (
    add_zero, sub_zero, mul_one, mul_zero_int, sub_self_int, div_one, double_neg, double_not,
    and_true, and_false, and_repeated, or_false, or_true, compare_self_int, where_const_cond, where_same_branches,
)
pm_simplify: tuple[Rule, ...] = pm_fold + pm_identities


def _is_distance(e: Expr, first: str, second: str) -> bool:
    return e.op == "sub" and [s.arg if s.op == "var" else None for s in e.src] == [first, second]


def abs_causal_distance(e: Expr) -> Expr | None:
    """``abs(q_idx - kv_idx) = q_idx - kv_idx`` on every key a causal mask keeps.

    Only valid under a mask implying ``kv_idx <= q_idx`` (scores of masked keys are never
    read), which is why this rule lives in its own table ``pm_causal``.
    """
    if e.op != "abs":
        return None
    inner = e.src[0]
    if _is_distance(inner, "q_idx", "kv_idx"):
        return inner
    if _is_distance(inner, "kv_idx", "q_idx"):
        return ex.binary("sub", inner.src[1], inner.src[0])
    return None


pm_causal: tuple[Rule, ...] = (abs_causal_distance,)


def rewrite(expr: Expr, rules: Sequence[Rule], limit: int = 64) -> Expr:
    """Apply ``rules`` bottom-up, each node to a fixed point (at most ``limit`` rewrites).

    Iterative over ``walk()`` (children first), so deep traced expressions do not recurse;
    only a rule's own result is revisited, and rules make expressions smaller.
    """
    memo: dict[Expr, Expr] = {}

    def settle(node: Expr) -> Expr:
        for _ in range(limit):
            for rule in rules:
                new = rule(node)
                if new is not None and new != node:
                    node = visit(new)
                    break
            else:
                return node
        return node

    def visit(root: Expr) -> Expr:
        for node in root.walk():
            if node not in memo:
                memo[node] = settle(node.replace(src=tuple(memo[s] for s in node.src)))
        return memo[root]

    return visit(expr)


# ---- softmax row terms ----------------------------------------------------------------

# NOTE: ops that map finite inputs to finite outputs (or to +inf, which is undefined anyway):
# a dropped row term must not be able to become -inf and mask a whole row by itself.
_FINITE_OPS = {
    "var", "const", "input", "load", "cast", "where", "add", "sub", "mul", "neg", "abs",
    "minimum", "maximum", "relu", "sigmoid", "tanh", "sin", "cos", "floor", "ceil", "exp", "exp2",
    "elu", "gelu", "softplus", "erf", "not", "invert", *ex.COMPARE_OPS, "and", "or", "xor",
}


def _is_row_term(term: Expr) -> bool:
    if not term.free_vars() <= ROW_VARS:
        return False
    for node in term.walk():
        if node.op not in _FINITE_OPS:
            return False
        if node.op == "const" and isinstance(node.arg, float) and not math.isfinite(node.arg):
            return False
    return True


def additive_terms(e: Expr, sign: int = 1) -> list[tuple[int, Expr]]:
    """``e`` as a signed sum, distributing a row-only factor over a sum when it helps.

    ``score - s[h] * (q_idx - kv_idx)`` gives ``[(+1, score), (-1, s[h]*q_idx), (+1, s[h]*kv_idx)]``.
    """
    if e.dtype != "float" and e.op not in ("add", "sub", "neg", "mul"):
        return [(sign, e)]
    if e.op == "add":
        return additive_terms(e.src[0], sign) + additive_terms(e.src[1], sign)
    if e.op == "sub":
        return additive_terms(e.src[0], sign) + additive_terms(e.src[1], -sign)
    if e.op == "neg":
        return additive_terms(e.src[0], -sign)
    if e.op == "mul":
        for factor, summed in (e.src, e.src[::-1]):
            if summed.op in ("add", "sub", "neg") and _is_row_term(factor):
                inner = additive_terms(summed, sign)
                if any(_is_row_term(t) for _, t in inner):
                    return [(s, ex.binary("mul", factor, t)) for s, t in inner]
    return [(sign, e)]


def signed_sum(terms: Sequence[tuple[int, Expr]]) -> Expr:
    if not terms:
        return ex.const(0.0)
    first_sign, total = terms[0]
    total = ex.cast(total, "float")
    if first_sign < 0:
        total = ex.unary("neg", total)
    for sign, term in terms[1:]:
        total = ex.binary("add" if sign > 0 else "sub", total, ex.cast(term, "float"))
    return total


def grows_with(expr: Expr, position: str) -> bool:
    """Whether ``expr`` uses the index variable ``position`` as a number (not only to index a
    captured tensor, whose values stay bounded however long the sequence)."""
    stack = [expr]
    while stack:
        node = stack.pop()
        if node.op == "var" and node.arg == position:
            return True
        stack.extend(node.src[:1] if node.op == "load" else node.src)
    return False


def cancels_growth(kept: Expr, shift: Expr) -> bool:
    """Whether a row term growing with ``q_idx`` balanced a kept term growing with ``kv_idx``
    (``m * (q_idx - kv_idx)``): apart, each grows with the sequence while their sum did not."""
    return grows_with(shift, "q_idx") and grows_with(kept, "kv_idx")


def split_row_terms(score: Expr) -> tuple[Expr, Expr | None]:
    """(score without its row-only terms, their sum) -- the sum is None when there are none."""
    terms = additive_terms(score)
    row = [(s, t) for s, t in terms if _is_row_term(t)]
    if not row:
        return score, None
    kept = [(s, t) for s, t in terms if not _is_row_term(t)]
    return signed_sum(kept), rewrite(signed_sum(row), pm_simplify)


# ---- the scale -------------------------------------------------------------------------


def score_factor(score: Expr) -> float | None:
    """The constant ``c`` when every use of ``score`` is ``c * score``, ``score * c`` or ``score / (1/c)``."""
    factors: set[float] = set()
    score_var = ex.var("score")
    for node in score.walk():
        for i, child in enumerate(node.src):
            if child != score_var:
                continue
            other = node.src[1 - i] if len(node.src) == 2 else None
            if other is None or other.op != "const" or other.dtype == "bool":
                return None
            if node.op == "mul":
                factors.add(float(other.arg))
            elif node.op == "truediv" and i == 0 and other.arg != 0:
                factors.add(1.0 / float(other.arg))
            else:
                return None
    if len(factors) != 1:
        return None
    (factor,) = factors
    return factor if math.isfinite(factor) and factor != 0 else None


def strip_factor(score: Expr, factor: float) -> Expr:
    score_var = ex.var("score")
    mapping = {}
    for node in score.walk():
        if node.op in ("mul", "truediv") and score_var in node.src:
            mapping[node] = score_var
    return ex.substitute(score, mapping)


# ---- graph rules -----------------------------------------------------------------------


def _replace_payload(graph: AttentionGraph, node_id: str, payload: object) -> AttentionGraph:
    out = graph.copy()
    out.replace_payload(node_id, payload)
    return out


def _expr_fields(payload: object) -> list[str]:
    if isinstance(payload, ScoreMod | MaskMod | Combine):
        return ["expr"]
    if isinstance(payload, PointwiseNorm):
        return ["phi"]
    if isinstance(payload, LinearNorm) and isinstance(payload.feature_map, Expr):
        return ["feature_map"]
    return []


def _users_of_kind(graph: AttentionGraph, node_id: str) -> list[str]:
    return [u for u in graph.users(node_id) if isinstance(graph.payload(u), Attention)]


def simplify_expressions(graph: AttentionGraph) -> AttentionGraph | None:
    """Every expression payload through ``pm_simplify`` (and ``pm_causal`` under causal masks)."""
    out = None
    for node_id in graph.topological_order():
        payload = graph.payload(node_id)
        changes = {}
        for name in _expr_fields(payload):
            rules = pm_simplify
            if isinstance(payload, ScoreMod) and _all_users_causal(graph, node_id):
                rules = pm_simplify + pm_causal
            new = rewrite(getattr(payload, name), rules)
            if new != getattr(payload, name):
                changes[name] = new
        if changes:
            out = _replace_payload(out or graph, node_id, dataclasses.replace(payload, **changes))
    return out


def _mask_of(graph: AttentionGraph, attention: str) -> Expr | None:
    mask = graph.operands(attention).get("mask")
    return graph.payload(mask).expr if mask else None


def _all_users_causal(graph: AttentionGraph, node_id: str) -> bool:
    users = _users_of_kind(graph, node_id)
    return bool(users) and all(mask_implies_causal(_mask_of(graph, u)) for u in users)


def _plain_softmax(graph: AttentionGraph, attention: str) -> bool:
    norm = graph.payload(graph.operands(attention)["normalizer"])
    return isinstance(norm, SoftmaxNorm) and norm.sink is None


def drop_row_terms(graph: AttentionGraph) -> AttentionGraph | None:
    """Under a softmax without sink, drop score terms of ``(b, h, q_idx)`` only (ALiBi's ``-s*q_idx``).

    ``exp(s_ij + r_i) / sum_j exp(s_ij + r_i) = exp(s_ij) / sum_j exp(s_ij)``: the row shift
    cancels. It is kept as the region's ``row_shift`` for the lse (``lse = lse' + r_i``).

    Not when the row term held down a term that grows with the key's position
    (``cancels_growth``): dropping ALiBi's ``-m * q_idx`` leaves ``s + m * kv_idx``, scores of size
    ``m * Lkv`` whose float32 rounding becomes error in every weight (steep slopes missed the
    float32 tolerance at 270 keys, the README's at about 16k), where ``s - m * (q_idx - kv_idx)``
    stays exact near the diagonal (and costs 2% more at L=2048, its distance computed in float32,
    ``render.Renderer._float_exact``).
    """
    out = None
    for node_id in list(graph.nodes_of(ScoreMod)):
        users = _users_of_kind(graph, node_id)
        if not users or not all(_plain_softmax(graph, u) for u in users):
            continue
        if any("row_shift" in facts_of(graph, u) for u in users):
            continue
        kept, shift = split_row_terms(graph.payload(node_id).expr)
        if shift is None or ex.var("score") not in kept.walk() or cancels_growth(kept, shift):
            continue
        out = _replace_payload(out or graph, node_id, ScoreMod(rewrite(kept, pm_simplify)))
        for user in users:
            out = attach(out, user, row_shift=shift)
    return out


def fold_scale(graph: AttentionGraph) -> AttentionGraph | None:
    """Move a constant factor on ``score`` into ``score_scale`` so kernels scale q once.

    ``c * (scale * q.k) = (c * scale * q) . k``; every region of a scored normalizer gets
    ``score_scale`` (1.0 without a factor), which tells a kernel to pre-multiply q.
    """
    out = None
    for attention in graph.attention_nodes():
        operands = graph.operands(attention)
        if isinstance(graph.payload(operands["normalizer"]), LinearNorm):
            continue
        if "score_scale" in facts_of(graph, attention):
            continue
        factor = 1.0
        score_node = operands.get("score")
        if score_node is not None and len(_users_of_kind(graph, score_node)) == 1:
            found = score_factor(graph.payload(score_node).expr)
            if found is not None:
                factor = found
                stripped = rewrite(strip_factor(graph.payload(score_node).expr, found), pm_simplify)
                out = _replace_payload(out or graph, score_node, ScoreMod(stripped))
        out = attach(out or graph, attention, score_scale=factor)
    return out


def merge_identical_payloads(graph: AttentionGraph) -> AttentionGraph | None:
    """CSE at graph level: equal score/mask/normalizer/route nodes with equal operands become one."""
    seen: dict[tuple, str] = {}
    out = None
    for node_id in graph.topological_order():
        payload = (out or graph).payload(node_id)
        if isinstance(payload, Input | Attention | Combine):
            continue
        key = (type(payload).__name__, payload_key(payload), tuple(sorted((out or graph).operands(node_id).items())))
        if key not in seen:
            seen[key] = node_id
            continue
        out = (out or graph).copy()
        keep = seen[key]
        for _, user, role in list(out.nx.out_edges(node_id, data="role")):
            out.nx.add_edge(keep, user, role=role)
        out.nx.remove_node(node_id)
    return out


def remove_dead_inputs(graph: AttentionGraph) -> AttentionGraph | None:
    """Captured inputs no payload reads any more are removed (with their edges)."""
    out = None
    for node_id in graph.topological_order():
        payload = graph.payload(node_id)
        if isinstance(payload, Input):
            continue
        read = {spec.name for spec in referenced_specs(payload)}
        for role, src in list((out or graph).operands(node_id).items()):
            spec = graph.payload(src).spec if isinstance(graph.payload(src), Input) else None
            if spec is not None and role == src and spec.name not in read:
                out = out or graph.copy()
                out.nx.remove_edge(src, node_id)
    current = out or graph
    for node_id in list(current.inputs()):
        payload = current.payload(node_id)
        if payload.spec is not None and not current.users(node_id):
            out = out or graph.copy()
            out.nx.remove_node(node_id)
    return out


pm_graph: tuple[GraphRule, ...] = (
    simplify_expressions, drop_row_terms, fold_scale, simplify_expressions, merge_identical_payloads,
    remove_dead_inputs,
)


def simplify(graph: AttentionGraph) -> PassResult:
    """Run ``pm_graph`` in order; the input graph is never mutated."""
    modified = False
    for rule in pm_graph:
        new = rule(graph)
        if new is not None:
            graph, modified = new, True
    return PassResult(graph, modified)
