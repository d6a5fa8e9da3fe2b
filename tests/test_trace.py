"""The tracer: every construct of issue 3 traced once, symbolically, then checked densely.

Each traced ``Expr`` is evaluated by the reference evaluator on broadcast index grids and
compared with calling the same Python function directly in eager torch (through
``torch.vmap`` for functions written for one element, as FlexAttention runs them).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import and_masks, create_mask, or_masks

from attncc.ir.dense import index_grid
from attncc.ir.evaluate import evaluate
from attncc.ir.trace import Captures, Symbol, trace_mask, trace_pointwise, trace_score

B, H, LQ, LKV = 2, 4, 7, 9


def _grid(q_offset: int = 0) -> dict[str, torch.Tensor]:
    return index_grid(B, H, LQ, LKV, q_offset, torch.device("cpu"))


def _scores() -> torch.Tensor:
    return torch.randn(B, H, LQ, LKV, dtype=torch.float64) * 3


def _full(t: torch.Tensor | float | bool, like: torch.Tensor) -> torch.Tensor:
    return torch.broadcast_to(torch.as_tensor(t), like.shape)


def _vmapped(fn, n_args: int):
    """FlexAttention's evaluation: ``fn`` called per element through nested vmaps."""
    for axis in reversed(range(n_args)):
        in_dims = tuple(0 if i == axis else None for i in range(n_args))
        fn = torch.vmap(fn, in_dims=in_dims)
    return fn


def _eager_score(fn, score: torch.Tensor) -> torch.Tensor:
    """``fn(score[b,h,i,j], b, h, i, j)`` for every element, in float64."""
    b, h, i, j = (torch.arange(n) for n in (B, H, LQ, LKV))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        elementwise = lambda s, b, h, q, k: torch.as_tensor(fn(s, b, h, q, k)).to(torch.float64)
        per_b = torch.vmap(
            torch.vmap(
                torch.vmap(torch.vmap(elementwise, in_dims=(0, None, None, None, 0)), in_dims=(0, None, None, 0, None)),
                in_dims=(0, None, 0, None, None),
            ),
            in_dims=(0, 0, None, None, None),
        )
        return per_b(score, b, h, i, j)
    finally:
        torch.set_default_dtype(previous)


def _eager_mask(fn) -> torch.Tensor:
    """FlexAttention's own dense mask of ``fn`` (its ``create_mask`` on the CPU)."""
    return create_mask(fn, B, H, LQ, LKV, device="cpu")


def _check_score(fn, score: torch.Tensor | None = None) -> None:
    """Traced and evaluated equals eager per element (vmap) and on broadcast grids."""
    captures = Captures()
    traced = trace_score(fn, captures)
    score = _scores() if score is None else score
    grid = _grid()
    got = _full(evaluate(traced, {**grid, "score": score}, captures.tensors, torch.float64), score)
    expected = _eager_score(fn, score.clone())  # clones: in-place ops in fn change their arguments
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
    direct = _broadcast_eager(fn, score.clone(), *(grid[n].clone() for n in ("b", "h", "q_idx", "kv_idx")))
    direct = direct.to(torch.float64)
    torch.testing.assert_close(got, _full(direct, score), rtol=1e-12, atol=1e-12, equal_nan=True)


def _check_mask(fn, broadcast: bool = True) -> None:
    captures = Captures()
    traced = trace_mask(fn, captures)
    assert traced.dtype == "bool"
    grid = _grid()
    expected = _eager_mask(fn)
    got = _full(evaluate(traced, grid, captures.tensors, torch.float64), expected)
    assert torch.equal(got, expected), f"mask {traced} differs from eager"
    if broadcast:
        direct = _broadcast_eager(fn, *(grid[n].clone() for n in ("b", "h", "q_idx", "kv_idx")))
        assert torch.equal(got, _full(direct, expected).to(torch.bool)), f"mask {traced} differs on broadcast grids"


# ---- captured tensors used by the constructs below ---------------------------------------

SLOPES = torch.rand(H, dtype=torch.float64)
DOC_IDS = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3], dtype=torch.int32)
BIAS_TABLE = torch.randn(H, LQ + LKV - 1, dtype=torch.float64)
ANCESTORS = torch.rand(LKV, LKV) > 0.5
INTERVALS = torch.tensor([[0, 4], [3, 8]], dtype=torch.int64)
WINDOWS = torch.tensor([1, 2, 3, 4], dtype=torch.int32)


SCORE_FUNCTIONS = {
    "identity": lambda s, b, h, q, k: s,
    "arithmetic": lambda s, b, h, q, k: (s * 2 + q - k) / 3 - 0.5 * s,
    "alibi": lambda s, b, h, q, k: s - SLOPES[h] * (q - k).abs(),
    "softcap": lambda s, b, h, q, k: 20.0 * torch.tanh(s / 20.0),
    "bias_table": lambda s, b, h, q, k: s + BIAS_TABLE[h, q - k + LKV - 1],
    "where_causal": lambda s, b, h, q, k: torch.where(q >= k, s, -float("inf")),
    "mod_floordiv": lambda s, b, h, q, k: s + (q % 3) - (k // 2) + (q - k) % 4 + (q - k) // 3,
    "negative_mod": lambda s, b, h, q, k: s * ((k - q) % 3) + (k - 2 * q) // 4,
    "int_bits": lambda s, b, h, q, k: s + ((q >> 1) ^ (k << 2)) + (q & 3) + (k | 4) + ((q ^ k) & 1),
    "clamp_method": lambda s, b, h, q, k: s.clamp(-1.0, 1.0) + (q - k).clamp(min=0) + (q - k).clamp(max=2),
    "torch_clamp": lambda s, b, h, q, k: torch.clamp(s, min=-0.5, max=2.0) + torch.clamp(q - k, -1, 1),
    "exp_log": lambda s, b, h, q, k: torch.exp(s / 4) + torch.exp2(s / 4) + torch.log(s.abs() + 1)
    + torch.log2(torch.abs(s) + 2),
    "sigmoid_tanh": lambda s, b, h, q, k: torch.sigmoid(s) * torch.tanh(s - k),
    "minimum_maximum": lambda s, b, h, q, k: torch.minimum(s, q * 0.25) + torch.maximum(s, k.float()),
    "activations": lambda s, b, h, q, k: F.relu(s) + F.gelu(s) + F.softplus(s) + torch.erf(s),
    "float_int_constants": lambda s, b, h, q, k: s * 1.5 + 3 - k * 2 + 0.25 * (h + 1),
    "comparisons_to_float": lambda s, b, h, q, k: s + (q > k).float() - (q == k).to(torch.float64) * 2.0,
    "torch_where_scalars": lambda s, b, h, q, k: torch.where((q - k) % 2 == 0, s, 0.0) + torch.where(h > 1, 1, 2),
    "negation_pow": lambda s, b, h, q, k: -s + s**2 - (q - k) ** 2,
    "batch_head": lambda s, b, h, q, k: s + b * 10 + h,
    "masked_fill": lambda s, b, h, q, k: s.masked_fill(q < k, -float("inf")),
    "square_sqrt_pos": lambda s, b, h, q, k: torch.square(s) + torch.sqrt(s.abs()) + (+s) - abs(q - k),
    "reflected_ops": lambda s, b, h, q, k: 1 - s + 2 * q - 3 / (k + 1) + 7 // (q + 1) + 2 ** (q % 3) + 13 % (k + 2),
    "pow_function": lambda s, b, h, q, k: torch.pow(s, 2) + torch.pow(2, s) + torch.pow(q, 2),
    "casts": lambda s, b, h, q, k: s.to(torch.int32) + (s > 0).int() + (s * 2).long() + q.to(torch.float64),
    "rsub_div_mul": lambda s, b, h, q, k: torch.sub(1.0, s) + torch.mul(s, k) + torch.div(s, 3) + torch.add(s, q),
    "floor_div_mode": lambda s, b, h, q, k: s + torch.div(q - k, 3, rounding_mode="floor") + torch.floor_divide(k, 2),
    "float_captured_scalar_table": lambda s, b, h, q, k: s * SLOPES[0] + SLOPES[h].exp(),
    "document_bias": lambda s, b, h, q, k: s + (DOC_IDS[q] == DOC_IDS[k]).float(),
    "head_window": lambda s, b, h, q, k: torch.where((q - k).abs() <= WINDOWS[h], s, -float("inf")),
}


@pytest.mark.parametrize("name", sorted(SCORE_FUNCTIONS))
def test_score_construct_matches_eager(name: str) -> None:
    _check_score(SCORE_FUNCTIONS[name])


MASK_FUNCTIONS = {
    "causal": lambda b, h, q, k: q >= k,
    "and_or_invert": lambda b, h, q, k: ((q >= k) & (q - k < 3)) | ~(k != 0),
    "xor": lambda b, h, q, k: (q > 2) ^ (k > 3),
    "document": lambda b, h, q, k: DOC_IDS[q] == DOC_IDS[k],
    "ancestors": lambda b, h, q, k: ANCESTORS[q, k],
    "chained_intervals": lambda b, h, q, k: (INTERVALS[b][0] <= k) & (k < INTERVALS[b][1]),
    "head_window": lambda b, h, q, k: (q - k).abs() <= WINDOWS[h],
    "morton_neighbourhood": lambda b, h, q, k: ((q >> 1) ^ (k >> 1)) == 0,
    "int_as_mask": lambda b, h, q, k: (q ^ k) & 1,
    "torch_where": lambda b, h, q, k: torch.where(h % 2 == 0, q >= k, q <= k),
    "dilated": lambda b, h, q, k: ((q - k) % 2 == 0) & ((q - k).abs() <= 4),
    "constant_true": lambda b, h, q, k: b.new_ones((), dtype=torch.bool),
    "logical_ops": lambda b, h, q, k: torch.logical_and(q % 3, k % 2) | torch.logical_not(q - k),
    "logical_xor": lambda b, h, q, k: torch.logical_xor(q >= k, k % 3),
}


@pytest.mark.parametrize("name", sorted(MASK_FUNCTIONS))
def test_mask_construct_matches_eager(name: str) -> None:
    # chained indexing is written for one element (vmap); on broadcast grids it means something else
    _check_mask(MASK_FUNCTIONS[name], broadcast=name != "chained_intervals")


def test_flex_and_masks_or_masks_of_traced_functions() -> None:
    """FlexAttention's combinators call ``new_ones``/``new_zeros`` on the traced arguments."""
    causal, local, first = MASK_FUNCTIONS["causal"], lambda b, h, q, k: q - k < 3, lambda b, h, q, k: k == 0
    _check_mask(and_masks(causal, local))
    _check_mask(or_masks(and_masks(causal, local), first))
    _check_mask(or_masks())  # no masks: all False
    _check_mask(and_masks(MASK_FUNCTIONS["document"], or_masks(causal, MASK_FUNCTIONS["head_window"])))


def test_pointwise_trace_matches_eager() -> None:
    phi = lambda s: F.softplus(s) * torch.sigmoid(s) + s.clamp(min=0) ** 2
    captures = Captures()
    traced = trace_pointwise(phi, captures)
    x = torch.linspace(-30, 30, 101, dtype=torch.float64)
    torch.testing.assert_close(evaluate(traced, {"score": x}, {}, torch.float64), phi(x), rtol=1e-12, atol=1e-12)


def test_captured_tensors_become_named_inputs() -> None:
    captures = Captures()
    traced = trace_score(SCORE_FUNCTIONS["alibi"], captures)
    (spec,) = traced.inputs()
    assert spec.name == "SLOPES" and spec.shape == (H,) and spec.dtype == "float64"
    assert captures.tensors["SLOPES"] is SLOPES


def test_int32_and_int64_tables_load_as_int() -> None:
    captures = Captures()
    traced = trace_mask(MASK_FUNCTIONS["document"], captures)
    loads = [n for n in traced.walk() if n.op == "load"]
    assert loads and all(n.dtype == "int" for n in loads)
    assert captures.tensors["DOC_IDS"].dtype == torch.int32


def test_function_is_called_once_with_symbols() -> None:
    calls: list[tuple[type, ...]] = []

    def score(s, b, h, q, k):
        calls.append(tuple(type(a) for a in (s, b, h, q, k)))
        return s + SLOPES[h] * (q - k)

    trace_score(score, Captures())
    assert calls == [(Symbol,) * 5]


def test_tracing_never_touches_a_dense_grid() -> None:
    """A mask reading a captured tensor of 10**7 entries traces in constant time."""
    big = torch.zeros(10**7, dtype=torch.int64)
    start = time.perf_counter()
    traced = trace_mask(lambda b, h, q, k: big[q] == big[k], Captures())
    assert time.perf_counter() - start < 0.5
    assert traced.inputs()[0].shape == (10**7,)


def test_same_function_traces_to_equal_exprs() -> None:
    first = trace_score(SCORE_FUNCTIONS["alibi"], Captures())
    second = trace_score(lambda s, b, h, q, k: s - SLOPES[h] * (q - k).abs(), Captures())
    assert first == second and first.key == second.key and hash(first) == hash(second)


def test_q_offset_shifts_q_idx_in_evaluation() -> None:
    traced = trace_mask(MASK_FUNCTIONS["causal"], Captures())
    got = evaluate(traced, _grid(q_offset=LKV - LQ), {}, torch.float64)
    i = torch.arange(LQ).view(-1, 1) + LKV - LQ
    assert torch.equal(_full(got, torch.empty(B, H, LQ, LKV))[0, 0], i >= torch.arange(LKV))


# ---- hypothesis: random expression trees, as Python source --------------------------------

TABLE_N = 5
INT_TABLE = torch.tensor([3, -1, 4, 0, 2], dtype=torch.int32)
FLOAT_TABLE = torch.tensor([0.5, -1.25, 2.0, 0.0, 3.5], dtype=torch.float64)
BOOL_TABLE = torch.tensor([True, False, False, True, True])
NAMESPACE = {"torch": torch, "F": F, "INT_TABLE": INT_TABLE, "FLOAT_TABLE": FLOAT_TABLE, "BOOL_TABLE": BOOL_TABLE}

# A generated term is (source, kind, is_tensor); constants are Python numbers (is_tensor False).
INDEX_LEAVES = st.sampled_from([("q_idx", "int", True), ("kv_idx", "int", True), ("h", "int", True),
                                ("b", "int", True)])
INT_CONSTS = st.integers(-4, 6).map(lambda n: (f"({n})", "int", False))
# 0.1 and 1/3 are not float32 values: constants must not round through float32
FLOAT_CONSTS = st.sampled_from([0.5, -1.25, 2.0, 0.1, -1 / 3, 1e-7]).map(lambda x: (f"({x!r})", "float", False))


def _combine(draw, terms, kind_pred, tensor_required=False):
    candidates = [t for t in terms if kind_pred(t[1]) and (t[2] or not tensor_required)]
    return draw(st.sampled_from(candidates)) if candidates else None


@st.composite
def _term(draw, depth: int, with_score: bool):
    leaves = [INDEX_LEAVES, INT_CONSTS, FLOAT_CONSTS]
    if with_score:
        leaves.append(st.just(("score", "float", True)))
    if depth == 0:
        return draw(st.one_of(*leaves))
    a = draw(_term(depth - 1, with_score))
    b = draw(_term(depth - 1, with_score))
    sa, ka, ta = a
    sb, kb, tb = b
    tensor = ta or tb
    numeric = lambda k: k in ("int", "float")
    options = []
    if numeric(ka) and numeric(kb):
        kind = "float" if "float" in (ka, kb) else "int"
        options += [(f"({sa} + {sb})", kind, tensor), (f"({sa} - {sb})", kind, tensor),
                    (f"({sa} * {sb})", kind, tensor)]
        if tensor:
            options += [(f"({sa} < {sb})", "bool", True), (f"({sa} >= {sb})", "bool", True),
                        (f"({sa} == {sb})", "bool", True), (f"({sa} != {sb})", "bool", True)]
        if ta and tb:
            options += [(f"torch.minimum({sa}, {sb})", kind, True), (f"torch.maximum({sa}, {sb})", kind, True)]
        if ta or tb:
            options.append((f"({sa} / {sb})", "float", True))
    if ka == "int" and ta:
        divisor = draw(st.integers(1, 5))
        shift = draw(st.integers(0, 3))
        options += [(f"({sa} // {divisor})", "int", True), (f"({sa} % {divisor})", "int", True),
                    (f"({sa} % (-{divisor}))", "int", True), (f"(-{divisor} // ({sa}.abs() + 1))", "int", True),
                    (f"({sa} >> {shift})", "int", True), (f"({sa} << {shift})", "int", True),
                    (f"(~{sa})", "int", True), (f"(-{sa})", "int", True), (f"{sa}.abs()", "int", True),
                    (f"{sa}.clamp(-2, 3)", "int", True), (f"INT_TABLE[{sa} % {TABLE_N}]", "int", True),
                    (f"FLOAT_TABLE[({sa}) % {TABLE_N}]", "float", True), (f"BOOL_TABLE[{sa} % {TABLE_N}]", "bool", True)]
        if kb == "int":
            options += [(f"({sa} & {sb})", "int", True), (f"({sa} | {sb})", "int", True), (f"({sa} ^ {sb})", "int", True)]
    if ka == "float" and ta:
        options += [(f"torch.tanh({sa})", "float", True), (f"torch.exp({sa})", "float", True),
                    (f"torch.exp2({sa})", "float", True), (f"torch.log({sa}.abs() + 1)", "float", True),
                    (f"torch.log2({sa})", "float", True), (f"torch.sigmoid({sa})", "float", True),
                    (f"F.relu({sa})", "float", True), (f"F.gelu({sa})", "float", True),
                    (f"F.softplus({sa})", "float", True), (f"torch.erf({sa})", "float", True),
                    (f"{sa}.abs()", "float", True), (f"torch.abs({sa})", "float", True),
                    (f"{sa}.clamp(-1.5, 2.5)", "float", True), (f"torch.clamp({sa}, min=0.25)", "float", True),
                    (f"(-{sa})", "float", True)]
    if ka == "bool" and kb == "bool":
        options += [(f"({sa} & {sb})", "bool", True), (f"({sa} | {sb})", "bool", True),
                    (f"({sa} ^ {sb})", "bool", True), (f"(~{sa})", "bool", True)]
    if ka == "bool":
        cond = sa
        x, y = draw(_term(depth - 1, with_score)), draw(_term(depth - 1, with_score))
        if numeric(x[1]) and numeric(y[1]):
            kind = "float" if "float" in (x[1], y[1]) else "int"
            options.append((f"torch.where({cond}, {x[0]}, {y[0]})", kind, True))
        if x[1] == "bool" and y[1] == "bool" and x[2] and y[2]:
            options.append((f"torch.where({cond}, {x[0]}, {y[0]})", "bool", True))
    if not options:
        return a
    return draw(st.sampled_from(options))


def _compile(args: str, body: str):
    return eval(f"lambda {args}: {body}", dict(NAMESPACE))


def _broadcast_eager(fn, *args):
    """Direct eager call on broadcast index grids, with float64 as the default float."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return torch.as_tensor(fn(*args))
    finally:
        torch.set_default_dtype(previous)


# NOTE: per-test settings (not a global profile) so other files keep hypothesis' defaults.
HYPOTHESIS = settings(max_examples=60, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@HYPOTHESIS
@given(_term(3, with_score=True))
def test_random_score_expressions_match_eager(term: tuple[str, str, bool]) -> None:
    source, _, _ = term
    fn = _compile("score, b, h, q_idx, kv_idx", source)
    captures = Captures()
    traced = trace_score(fn, captures)
    grid, score = _grid(), _scores()
    got = evaluate(traced, {**grid, "score": score}, captures.tensors, torch.float64)
    expected = _broadcast_eager(fn, score, grid["b"], grid["h"], grid["q_idx"], grid["kv_idx"]).to(torch.float64)
    expected = torch.broadcast_to(expected, score.shape)
    torch.testing.assert_close(_full(got, score), expected, rtol=1e-12, atol=1e-12, equal_nan=True,
                               msg=lambda m: f"{source}\ntraced as {traced}\n{m}")


@HYPOTHESIS
@given(_term(3, with_score=False).filter(lambda t: t[1] == "bool" and t[2]))
def test_random_mask_expressions_match_eager(term: tuple[str, str, bool]) -> None:
    source, _, _ = term
    fn = _compile("b, h, q_idx, kv_idx", source)
    captures = Captures()
    traced = trace_mask(fn, captures)
    grid = _grid()
    got = evaluate(traced, grid, captures.tensors, torch.float64)
    expected = _broadcast_eager(fn, grid["b"], grid["h"], grid["q_idx"], grid["kv_idx"])
    shape = (B, H, LQ, LKV)
    assert expected.dtype == torch.bool
    assert torch.equal(torch.broadcast_to(got, shape), torch.broadcast_to(expected, shape)), f"{source} -> {traced}"


# ---- mask generators in the style FlexAttention users share (written here, not copied) -------


def _compact_bits(x):
    """Every other bit of x, packed (Morton decode of one coordinate), with in-place bit ops."""
    x &= 0x55555555
    x = (x | (x >> 1)) & 0x33333333
    x = (x | (x >> 2)) & 0x0F0F0F0F
    x = (x | (x >> 4)) & 0x00FF00FF
    x = (x | (x >> 8)) & 0x0000FFFF
    return x


def _morton_window(radius: int):
    def mask(b, h, q_idx, kv_idx):
        qx, qy = _compact_bits(q_idx), _compact_bits(q_idx >> 1)
        kx, ky = _compact_bits(kv_idx), _compact_bits(kv_idx >> 1)
        return ((qx - kx).abs() <= radius) & ((qy - ky).abs() <= radius)

    return mask


def _documents_from_offsets(offsets: torch.Tensor, inner):
    doc_of = torch.repeat_interleave(torch.arange(len(offsets) - 1, dtype=torch.int32), offsets[1:] - offsets[:-1])

    def mask(b, h, q_idx, kv_idx):
        same = doc_of[q_idx] == doc_of[kv_idx]
        q_local = q_idx - offsets[doc_of[q_idx]]
        kv_local = kv_idx - offsets[doc_of[kv_idx]]
        return same & inner(b, h, q_local, kv_local)

    return mask


def _clamped_neighbourhood_2d(width: int, kernel: int):
    def mask(b, h, q_idx, kv_idx):
        qr, qc = q_idx // width, q_idx % width
        kr, kc = kv_idx // width, kv_idx % width
        centre_r = qr.clamp(kernel // 2, (LKV // width - 1) - kernel // 2)
        centre_c = qc.clamp(kernel // 2, (width - 1) - kernel // 2)
        return ((centre_r - kr).abs() <= kernel // 2) & ((centre_c - kc).abs() <= kernel // 2)

    return mask


def _alibi_generator(heads: int):
    def score(s, b, h, q_idx, kv_idx):
        slope = torch.exp2(-((h + 1) * 8.0 / heads))
        return s + (kv_idx - q_idx) * slope

    return score


@pytest.mark.parametrize("name", ["morton", "documents", "neighbourhood", "prefix_or_causal"])
def test_shared_mask_generators(name: str) -> None:
    offsets = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    masks = {
        "morton": _morton_window(1),
        "documents": _documents_from_offsets(offsets, MASK_FUNCTIONS["causal"]),
        "neighbourhood": _clamped_neighbourhood_2d(3, 3),
        "prefix_or_causal": or_masks(lambda b, h, q, k: k < 3, MASK_FUNCTIONS["causal"]),
    }
    _check_mask(masks[name])


def test_shared_score_generator() -> None:
    _check_score(_alibi_generator(H))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap of in-place ops in the eager check
def test_in_place_ops_change_the_value_they_alias() -> None:
    """``x = q_idx; x += 1`` changes q_idx too in eager torch; the trace must agree."""

    def aliasing(s, b, h, q_idx, kv_idx):
        x = q_idx
        x += 1
        x *= 3
        x -= 2
        y = kv_idx
        y <<= 1
        y //= 3
        y %= 4
        y |= 8
        z = s
        z /= 2
        z.mul_(2).add_(1.5)
        torch.relu_(z)
        z.clamp_(max=2.0)
        return s + q_idx * 10 + kv_idx  # reads the mutated values

    _check_score(aliasing)


def test_in_place_op_that_changes_dtype_is_refused() -> None:
    from attncc.ir.trace import TraceError

    def widening(b, h, q_idx, kv_idx):
        q_idx *= 0.5
        return q_idx > kv_idx

    with pytest.raises(TraceError, match="in-place"):
        trace_mask(widening, Captures())
