"""attncc.masks against brute-force boolean grids written independently, in plain Python loops.

Every helper is evaluated two ways and both must equal the brute force: through attncc's
tracer (the Expr it produces, evaluated densely) and through torch's own ``create_mask``,
which runs the function under ``vmap`` as FlexAttention does. Lengths such as 37 and query
offsets keep tile- and power-of-two-friendly sizes from hiding off-by-one errors.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.nn.attention.flex_attention import and_masks, create_mask, or_masks

from attncc import masks
from attncc.ir.evaluate import evaluate
from attncc.ir.trace import Captures, trace_mask


def traced_grid(mask, Lq: int, Lkv: int, q_offset: int = 0, B: int = 1, H: int = 1) -> torch.Tensor:
    """The mask through attncc: trace to an Expr, evaluate it on broadcast index tensors."""
    captures = Captures()
    expr = trace_mask(mask, captures)
    env = {
        "b": torch.arange(B).view(B, 1, 1, 1),
        "h": torch.arange(H).view(1, H, 1, 1),
        "q_idx": (torch.arange(Lq) + q_offset).view(1, 1, Lq, 1),
        "kv_idx": torch.arange(Lkv).view(1, 1, 1, Lkv),
    }
    return evaluate(expr, env, captures.tensors).expand(B, H, Lq, Lkv)


def vmap_grid(mask, Lq: int, Lkv: int, B: int = 1, H: int = 1) -> torch.Tensor:
    """The mask through FlexAttention's own vmap evaluation."""
    return create_mask(mask, B, H, Lq, Lkv, device="cpu")


def brute(rule, Lq: int, Lkv: int, q_offset: int = 0) -> torch.Tensor:
    grid = torch.zeros(1, 1, Lq, Lkv, dtype=torch.bool)
    for i in range(Lq):
        for j in range(Lkv):
            grid[0, 0, i, j] = bool(rule(i + q_offset, j))
    return grid


def assert_mask_equals(mask, rule, L: int) -> None:
    expected = brute(rule, L, L)
    assert torch.equal(traced_grid(mask, L, L), expected), f"{mask!r}: traced mask differs from brute force"
    assert torch.equal(vmap_grid(mask, L, L), expected), f"{mask!r}: vmap (flex) mask differs from brute force"


LENGTHS = [1, 17, 37, 64]


@pytest.mark.parametrize("L", LENGTHS)
def test_causal(L):
    assert_mask_equals(masks.causal, lambda i, j: j <= i, L)


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("w", [1, 3, 8, 100])
def test_sliding_window_sees_last_w_keys(L, w):
    """Convention: the query itself plus the w - 1 keys before it."""
    assert_mask_equals(masks.sliding_window(w), lambda i, j: j <= i and j > i - w, L)


def test_sliding_window_row_counts():
    row_counts = traced_grid(masks.sliding_window(5), 37, 37).sum(-1).flatten().tolist()
    assert row_counts == [min(i + 1, 5) for i in range(37)]


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("n", [0, 1, 5, 40])
def test_prefix_lm(L, n):
    assert_mask_equals(masks.prefix_lm(n), lambda i, j: j < n or j <= i, L)


@pytest.mark.parametrize("L", [17, 37])
def test_document(L):
    gen = torch.Generator().manual_seed(L)
    ids = torch.sort(torch.randint(0, 4, (L,), generator=gen)).values
    doc = ids.tolist()
    assert_mask_equals(masks.document(ids), lambda i, j: doc[i] == doc[j], L)
    assert_mask_equals(masks.document(ids.int()) & masks.causal, lambda i, j: doc[i] == doc[j] and j <= i, L)


def test_document_per_batch():
    B, L = 2, 23
    ids = torch.tensor([[0] * 10 + [1] * 13, [0] * 3 + [1] * 7 + [2] * 13])
    mask = masks.document(ids)
    expected = torch.tensor(
        [[[ids[b, i] == ids[b, j] for j in range(L)] for i in range(L)] for b in range(B)]
    ).view(B, 1, L, L)
    assert torch.equal(traced_grid(mask, L, L, B=B), expected)
    assert torch.equal(vmap_grid(mask, L, L, B=B), expected)


@pytest.mark.parametrize("L", [17, 37])
@pytest.mark.parametrize(("w", "d"), [(1, 1), (3, 2), (4, 3), (2, 5)])
def test_dilated_window(L, w, d):
    def rule(i, j):
        return any(j == i - t * d for t in range(w))

    assert_mask_equals(masks.dilated_window(w, d), rule, L)


@pytest.mark.parametrize("L", [17, 37, 64])
@pytest.mark.parametrize("stride", [1, 3, 8])
def test_strided_is_union_of_the_papers_two_heads(L, stride):
    """Child et al. 2019: A1 = {max(0, i - l) .. i}, A2 = {j : (i - j) mod l = 0}, causal."""

    def rule(i, j):
        head1 = max(0, i - stride) <= j <= i
        head2 = j <= i and (i - j) % stride == 0
        return head1 or head2

    assert_mask_equals(masks.strided(stride), rule, L)


@pytest.mark.parametrize("L", [17, 37, 64])
@pytest.mark.parametrize(("block", "c"), [(1, 1), (4, 1), (8, 2), (5, 5)])
def test_fixed_is_union_of_the_papers_two_heads(L, block, c):
    """Child et al. 2019: A1 = same block, A2 = {j : j mod l in {l - c, ..., l - 1}}, causal."""

    def rule(i, j):
        same_block = math.floor(j / block) == math.floor(i / block)
        summary = (j % block) in range(block - c, block)
        return j <= i and (same_block or summary)

    assert_mask_equals(masks.fixed(block, c), rule, L)


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("n", [1, 4])
def test_sinks(L, n):
    assert_mask_equals(masks.sinks(n), lambda i, j: j < n and j <= i, L)
    assert_mask_equals(masks.sinks(n, causal=False), lambda i, j: j < n, L)


@pytest.mark.parametrize("L", [37, 64])
def test_sinks_or_window_is_streaming_llm(L):
    mask = masks.sinks(4) | masks.sliding_window(8)
    assert_mask_equals(mask, lambda i, j: j <= i and (j < 4 or i - j < 8), L)


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("c", [1, 5, 16])
def test_chunked(L, c):
    assert_mask_equals(masks.chunked(c), lambda i, j: i // c == j // c, L)
    assert_mask_equals(masks.chunked(c) & masks.causal, lambda i, j: i // c == j // c and j <= i, L)


def test_masks_use_absolute_query_positions_with_offset():
    """Decoding: row i is q_idx = q_offset + i (SEMANTICS.md), Lq != Lkv."""
    Lq, Lkv, offset = 5, 37, 32
    for mask, rule in [
        (masks.sliding_window(6), lambda i, j: i - 6 < j <= i),
        (masks.strided(4), lambda i, j: j <= i and (i - j < 4 or (i - j) % 4 == 0)),
        (masks.sinks(2) | masks.chunked(8), lambda i, j: (j < 2 and j <= i) or i // 8 == j // 8),
    ]:
        assert torch.equal(traced_grid(mask, Lq, Lkv, q_offset=offset), brute(rule, Lq, Lkv, offset)), mask


# ---- composition ------------------------------------------------------------------------------


def _plain_even_kv(b, h, q_idx, kv_idx):
    return kv_idx % 2 == 0


@pytest.mark.parametrize(
    ("build", "rule"),
    [
        (lambda: masks.causal & masks.chunked(8), lambda i, j: j <= i and i // 8 == j // 8),
        (lambda: masks.sinks(3) | masks.sliding_window(4), lambda i, j: j <= i and (j < 3 or i - j < 4)),
        (lambda: ~masks.causal, lambda i, j: j > i),
        (lambda: ~(masks.causal | masks.chunked(5)), lambda i, j: not (j <= i or i // 5 == j // 5)),
        (lambda: masks.causal & _plain_even_kv, lambda i, j: j <= i and j % 2 == 0),
        (lambda: _plain_even_kv & masks.causal, lambda i, j: j <= i and j % 2 == 0),
        (lambda: _plain_even_kv | masks.causal, lambda i, j: j <= i or j % 2 == 0),
        (lambda: (masks.causal | _plain_even_kv) & ~masks.sinks(2), lambda i, j: (j <= i or j % 2 == 0) and not (j < 2 and j <= i)),
    ],
    ids=["and", "or", "not", "not-or", "and-fn", "fn-and", "fn-or", "nested"],
)
def test_composition(build, rule):
    mask = build()
    assert isinstance(mask, masks.Mask)
    assert_mask_equals(mask, rule, 37)


def test_composition_returns_new_masks_and_keeps_operands():
    a, b = masks.sliding_window(4), masks.chunked(8)
    combined = a & b
    assert combined is not a and combined is not b
    assert repr(a) == "Mask(sliding_window(4))"
    assert str(combined) == "sliding_window(4) & chunked(8)"
    assert str(~(a | b)) == "~(sliding_window(4) | chunked(8))"
    assert combined.__name__.isidentifier() and (~masks.causal).__name__.isidentifier()


def test_flex_and_or_masks_accept_attncc_masks():
    """torch's and_masks / or_masks (new_ones / new_zeros) on Mask objects, traced and vmapped."""
    anded = and_masks(masks.causal, masks.chunked(6))
    ored = or_masks(masks.sinks(2), masks.sliding_window(3))
    assert_mask_equals(anded, lambda i, j: j <= i and i // 6 == j // 6, 37)
    assert_mask_equals(ored, lambda i, j: j <= i and (j < 2 or i - j < 3), 37)


def test_mask_decorator_names_after_function():
    @masks.Mask
    def every_third(b, h, q_idx, kv_idx):
        return kv_idx % 3 == 0

    assert every_third.name == "every_third"
    assert_mask_equals(every_third & masks.causal, lambda i, j: j <= i and j % 3 == 0, 20)


# ---- neighborhood attention, against NATTEN's rules -------------------------------------------


def natten_window_start(i: int, n: int, k: int, d: int) -> int:
    """NATTEN's index-space window start for odd ``k`` (its CUDA kernels' ``get_window_start``)."""
    ns = k // 2
    if d <= 1:
        return max(i - ns, 0) + (i + ns >= n) * (n - i - ns - 1)
    if i - ns * d < 0:
        return i % d
    if i + ns * d >= n:
        imodd, a = i % d, (n // d) * d
        rem = n - a
        return n - rem + imodd - 2 * ns * d if imodd < rem else a + imodd - k * d
    return i - ns * d


def natten_keys_1d(i: int, n: int, k: int, d: int, is_causal: bool) -> set[int]:
    """The keys query ``i`` sees along one axis, from the explicit member list of its group."""
    members = list(range(i % d, n, d))
    pos = members.index(i)
    if is_causal:
        return set(members[max(0, pos - k + 1) : pos + 1])
    start = min(max(pos - k // 2, 0), len(members) - k)
    window = set(members[start : start + k])
    if k % 2 == 1:  # NOTE: cross-check the list construction against NATTEN's closed form
        first = natten_window_start(i, n, k, d)
        assert window == set(range(first, first + k * d, d))
    return window


def natten_grid(grid: tuple[int, ...], kernels, dilations, causals) -> torch.Tensor:
    cells = list(itertools.product(*(range(n) for n in grid)))  # row-major: last axis fastest
    L = len(cells)
    out = torch.zeros(1, 1, L, L, dtype=torch.bool)
    for qi, qc in enumerate(cells):
        seen = [natten_keys_1d(qc[a], grid[a], kernels[a], dilations[a], causals[a]) for a in range(len(grid))]
        for ki, kc in enumerate(cells):
            out[0, 0, qi, ki] = all(kc[a] in seen[a] for a in range(len(grid)))
    return out


NEIGHBORHOOD_CASES = [
    # grid, kernel_size, dilation, causal
    ((37,), 1, 1, False),
    ((37,), 5, 1, False),
    ((37,), 4, 1, False),
    ((37,), 37, 1, False),
    ((37,), 5, 3, False),
    ((37,), 3, 12, False),
    ((37,), 4, 2, False),
    ((37,), 5, 1, True),
    ((37,), 3, 4, True),
    ((6, 7), 3, 1, False),
    ((6, 7), (3, 5), 1, False),
    ((6, 9), 3, (2, 3), False),
    ((6, 9), (2, 3), 2, (True, False)),
    ((5, 8), 3, 1, True),
    ((3, 4, 5), 3, 1, False),
    ((3, 4, 5), (1, 2, 3), (3, 2, 1), False),
    ((4, 4, 6), (2, 3, 3), (2, 1, 2), (False, True, True)),
]


@pytest.mark.parametrize(("grid", "kernel_size", "dilation", "causal"), NEIGHBORHOOD_CASES)
def test_neighborhood_matches_natten(grid, kernel_size, dilation, causal):
    ndim = len(grid)
    as_tuple = lambda v: tuple(v) if isinstance(v, tuple) else (v,) * ndim
    mask = masks.neighborhood(kernel_size, dilation=dilation, causal=causal, grid=grid)
    expected = natten_grid(grid, as_tuple(kernel_size), as_tuple(dilation), as_tuple(causal))
    L = math.prod(grid)
    assert torch.equal(traced_grid(mask, L, L), expected), mask
    assert torch.equal(vmap_grid(mask, L, L), expected), mask


def test_neighborhood_every_query_sees_kernel_volume():
    """Non-causal NATTEN windows shift inward at borders: always prod(kernel_size) keys."""
    mask = masks.neighborhood((3, 5), dilation=(2, 1), grid=(7, 9))
    counts = traced_grid(mask, 63, 63).sum(-1)
    assert torch.all(counts == 15)


# ---- argument errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "needle"),
    [
        (lambda: masks.sliding_window(0), ValueError, "w must be positive"),
        (lambda: masks.sliding_window(2.0), TypeError, "w must be an int"),
        (lambda: masks.sliding_window(True), TypeError, "w must be an int"),
        (lambda: masks.prefix_lm(-1), ValueError, "n must be >= 0"),
        (lambda: masks.dilated_window(4, 0), ValueError, "dilation must be positive"),
        (lambda: masks.strided(0), ValueError, "stride must be positive"),
        (lambda: masks.fixed(4, c=5), ValueError, "c must be at most block"),
        (lambda: masks.fixed(0), ValueError, "block must be positive"),
        (lambda: masks.sinks(0), ValueError, "n must be positive"),
        (lambda: masks.sinks(2, causal="yes"), TypeError, "causal must be a bool"),
        (lambda: masks.chunked(-3), ValueError, "c must be positive"),
        (lambda: masks.document([0, 0, 1]), TypeError, "ids must be a torch.Tensor"),
        (lambda: masks.document(torch.zeros(4)), TypeError, "int32 or int64"),
        (lambda: masks.document(torch.zeros(2, 2, 2, dtype=torch.long)), ValueError, "shape [L] or [B, L]"),
        (lambda: masks.neighborhood(3), TypeError, "grid is required"),
        (lambda: masks.neighborhood(3, grid=(4, 4, 4, 4)), ValueError, "1 to 3"),
        (lambda: masks.neighborhood(3, grid=(0, 4)), ValueError, "grid[0] must be positive"),
        (lambda: masks.neighborhood((3, 3, 3), grid=(8, 8)), ValueError, "kernel_size has 3 entries"),
        (lambda: masks.neighborhood(5, dilation=2, grid=(9,)), ValueError, "exceeds grid[0]"),
        (lambda: masks.neighborhood(0, grid=(9,)), ValueError, "kernel_size must be positive"),
        (lambda: masks.neighborhood(3, causal=1, grid=(9,)), TypeError, "causal must be a bool"),
        (lambda: masks.Mask(3), TypeError, "expects a callable"),
        (lambda: masks.causal & 3, TypeError, "cannot combine a Mask with int"),
        (lambda: 3 | masks.causal, TypeError, "cannot combine a Mask with int"),
    ],
)
def test_argument_errors(call, error, needle):
    with pytest.raises(error, match=None) as info:
        call()
    assert needle in str(info.value)
