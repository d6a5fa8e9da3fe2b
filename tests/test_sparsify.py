"""The sparsify pass against brute force: dense evaluation of the mask on the whole grid.

Every block map must be *sound* (EMPTY only if every pair of the tile is masked, FULL only
if every pair is kept) on hypothesis-generated masks, and *exact* (no PARTIAL where brute
force finds the tile uniform) on the structured masks the issue names. Brute force evaluates
the mask with the oracle's ``attncc.ir.evaluate`` on every (q_idx, kv_idx), then reduces per
tile; it shares no code with the abstract interpretation under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attncc
from attncc import masks as M
from attncc.ir import expr as ex
from attncc.ir.evaluate import evaluate
from attncc.ir.trace import Captures, trace_mask, trace_score
from attncc.passes.manager import facts_of
from attncc.passes.sparsify import (
    EMPTY,
    FULL,
    PARTIAL,
    MaskSparsity,
    analyze,
    block_tables_for,
    sparsify,
    tables_from_map,
)

# ---- brute force ---------------------------------------------------------------------------


def dense_keep(expr: ex.Expr, tensors: dict, B: int, H: int, Lq: int, Lkv: int, q_offset: int) -> torch.Tensor:
    env = {
        "b": torch.arange(B).view(-1, 1, 1, 1), "h": torch.arange(H).view(1, -1, 1, 1),
        "q_idx": (q_offset + torch.arange(Lq)).view(1, 1, -1, 1), "kv_idx": torch.arange(Lkv).view(1, 1, 1, -1),
    }
    return evaluate(expr, env, tensors).expand(B, H, Lq, Lkv).bool()


def brute_map(keep: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """Tile classes by looking at every element (loops over tiles; small sizes only)."""
    B, H, Lq, Lkv = keep.shape
    bq, bk = tile
    nq, nkv = -(-Lq // bq), -(-Lkv // bk)
    out = torch.empty(B, H, nq, nkv, dtype=torch.int8)
    for i in range(nq):
        for j in range(nkv):
            block = keep[:, :, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk].reshape(B, H, -1)
            out[:, :, i, j] = torch.where(block.all(-1), FULL, torch.where(block.any(-1), PARTIAL, EMPTY))
    return out


def assert_sound(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    want = want.expand(*got.shape[:2], *want.shape[2:]) if want.shape[:2] != got.shape[:2] else want
    bad_empty = (got == EMPTY) & (want != EMPTY)
    bad_full = (got == FULL) & (want != FULL)
    assert not bad_empty.any(), f"{what}: EMPTY where a pair is kept at {bad_empty.nonzero()[:5].tolist()}"
    assert not bad_full.any(), f"{what}: FULL where a pair is masked at {bad_full.nonzero()[:5].tolist()}"


def check_mask(fn, tensors_seen: Captures | None, *, B=2, H=3, Lq=200, Lkv=232, tile=(16, 24), q_offset=0,
               exact=False) -> torch.Tensor:
    captures = tensors_seen or Captures()
    mask = trace_mask(fn, captures)
    sp = analyze(mask)
    got = sp.block_map(B, H, Lq, Lkv, tile, q_offset, captures.tensors)
    Bp, Hp = got.shape[:2]
    assert (Bp, Hp) == (B if "b" in mask.free_vars() else 1, H if "h" in mask.free_vars() else 1)
    keep = dense_keep(mask, captures.tensors, Bp, Hp, Lq, Lkv, q_offset)
    want = brute_map(keep, tile)
    what = f"{mask} Lq={Lq} Lkv={Lkv} tile={tile} q_offset={q_offset}"
    assert_sound(got, want, what)
    if exact:
        assert torch.equal(got, want), f"{what}: not exact, {int((got != want).sum())} tiles differ"
    check_kv_range(sp, got, want, B, H, Lq, Lkv, tile, q_offset, captures.tensors, what)
    return got


def check_kv_range(sp, got, want, B, H, Lq, Lkv, tile, q_offset, tensors, what) -> None:
    """No non-empty tile outside ``[lo, hi)``; every tile of ``[full_lo, full_hi)`` FULL by brute force."""
    kr = sp.kv_range(B, H, Lq, Lkv, tile, q_offset, tensors)
    j = torch.arange(got.shape[-1])
    lo, hi, flo, fhi = (x[..., None].long() for x in (kr.lo, kr.hi, kr.full_lo, kr.full_hi))
    outside = (want != EMPTY) & ~((j >= lo) & (j < hi))
    assert not outside.any(), f"{what}: kv_range misses a non-empty tile"
    claimed_full = (j >= flo) & (j < fhi)
    assert not (claimed_full & (want != FULL)).any(), f"{what}: kv_range claims a FULL tile that is not"


# ---- hypothesis-generated masks --------------------------------------------------------------


@st.composite
def mask_trees(draw: st.DrawFn, depth: int = 3):
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        kind = draw(st.sampled_from([
            "causal", "window", "chunk", "prefix", "q_after", "dilation", "kv_stride", "shift", "doc", "length",
            "head_window", "distance", "clamp_window",
        ]))
        return (kind, draw(st.integers(1, 70)), draw(st.integers(0, 5)))
    op = draw(st.sampled_from(["and", "or", "not"]))
    if op == "not":
        return ("not", draw(mask_trees(depth=depth - 1)))
    return (op, draw(mask_trees(depth=depth - 1)), draw(mask_trees(depth=depth - 1)))


def build(tree, doc, lengths, windows):
    """A Python mask function (traced like a user's) from a generated tree."""
    kind = tree[0]
    if kind == "not":
        inner = build(tree[1], doc, lengths, windows)
        return lambda b, h, q, kv: ~inner(b, h, q, kv)
    if kind in ("and", "or"):
        left, right = build(tree[1], doc, lengths, windows), build(tree[2], doc, lengths, windows)
        if kind == "and":
            return lambda b, h, q, kv: left(b, h, q, kv) & right(b, h, q, kv)
        return lambda b, h, q, kv: left(b, h, q, kv) | right(b, h, q, kv)
    n, r = tree[1], tree[2]
    d = max(2, r + 1)
    atoms = {
        "causal": lambda b, h, q, kv: q >= kv,
        "window": lambda b, h, q, kv: q - kv < n,
        "chunk": lambda b, h, q, kv: q // n == kv // n,
        "prefix": lambda b, h, q, kv: kv < n,
        "q_after": lambda b, h, q, kv: q >= 3 * n,
        "dilation": lambda b, h, q, kv: (q - kv) % d == r % d,
        "kv_stride": lambda b, h, q, kv: kv % n >= n - r - 1,
        "shift": lambda b, h, q, kv: (q >> r) == (kv >> r),
        "doc": lambda b, h, q, kv: doc[q] == doc[kv],
        "length": lambda b, h, q, kv: kv < lengths[b],
        "head_window": lambda b, h, q, kv: (q - kv < windows[h]) & (kv <= q),
        "distance": lambda b, h, q, kv: (q - kv).abs() <= n,
        "clamp_window": lambda b, h, q, kv: kv >= torch.clamp(q - n, 0, 150),
    }
    return atoms[kind]


geometry = st.tuples(
    st.integers(1, 120), st.integers(1, 240), st.integers(1, 48), st.integers(1, 48), st.integers(0, 60),
)


@settings(max_examples=80, deadline=None)
@given(mask_trees(), geometry, st.integers(0, 2**31 - 1), st.booleans())
def test_block_map_is_sound_on_generated_masks(tree, geo, seed, sorted_ids) -> None:
    """Never EMPTY if one pair is kept, FULL only if all are: random compositions with & | ~."""
    Lq, Lkv, bq, bk, q_offset = geo
    g = torch.Generator().manual_seed(seed)
    n = max(q_offset + Lq, Lkv)
    doc = torch.randint(0, 5, (n,), generator=g)
    doc = doc.sort().values if sorted_ids else doc
    lengths = torch.randint(0, Lkv + 1, (2,), generator=g)
    windows = torch.randint(1, 64, (3,), generator=g)
    check_mask(build(tree, doc, lengths, windows), None, B=2, H=3, Lq=Lq, Lkv=Lkv, tile=(bq, bk), q_offset=q_offset)


# ---- exactness on structured masks ----------------------------------------------------------------

GEOMETRIES = [
    dict(Lq=232, Lkv=232, tile=(32, 32), q_offset=0),
    dict(Lq=200, Lkv=232, tile=(16, 24), q_offset=20),
    dict(Lq=100, Lkv=232, tile=(13, 64), q_offset=132),
    dict(Lq=232, Lkv=150, tile=(48, 20), q_offset=0),
]

STRUCTURED = {
    "causal": M.causal,
    "sliding_window": M.sliding_window(40),
    "sliding_window_gym": lambda b, h, q, kv: (q >= kv) & (q - kv <= 17),
    "prefix_lm": M.prefix_lm(30),
    "chunked": M.chunked(40),
    "chunked_causal": M.chunked(24) & M.causal,
    "sinks_window": M.sinks(4) | M.sliding_window(30),
    "neighborhood_1d": M.neighborhood(7, grid=(232,)),
    "neighborhood_1d_dilated": M.neighborhood(5, dilation=2, grid=(232,)),
    "neighborhood_2d": M.neighborhood(3, grid=(8, 29)),
    "neighborhood_2d_causal": M.neighborhood((3, 5), grid=(8, 29), causal=(True, False)),
    "neighborhood_3d": M.neighborhood((3, 1, 3), grid=(4, 2, 29)),
    "shift_blocks": lambda b, h, q, kv: (q >> 5) == (kv >> 5),
}


@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: f"{g['Lq']}x{g['Lkv']}_{g['tile']}_off{g['q_offset']}")
@pytest.mark.parametrize("name", sorted(STRUCTURED))
def test_structured_masks_are_exact(name: str, geo: dict) -> None:
    """No PARTIAL where brute force finds a uniform tile (lengths not tile multiples, q_offset > 0)."""
    fn = STRUCTURED[name]
    if name.startswith("neighborhood") and geo["Lkv"] != 232:
        return  # a neighborhood mask is defined over its grid: Lkv = 232
    check_mask(fn, None, B=1, H=1, exact=True, **geo)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=12), st.integers(1, 40), st.integers(1, 40),
       st.integers(0, 30), st.booleans())
def test_document_mask_with_sorted_ids_is_exact(lengths, bq, bk, q_offset, causal) -> None:
    """``doc[q_idx] == doc[kv_idx]`` from per-tile [min, max]: exact when ids are sorted."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    L = doc.numel()
    if q_offset >= L:
        q_offset = 0
    mask = M.document(doc) & M.causal if causal else M.document(doc)
    check_mask(mask, None, B=1, H=1, Lq=L - q_offset, Lkv=L, tile=(bq, bk), q_offset=q_offset, exact=True)


def test_document_ids_per_batch_give_per_batch_maps() -> None:
    doc = torch.tensor([[0] * 40 + [1] * 60, [0] * 90 + [1] * 10])
    got = check_mask(M.document(doc), None, B=2, H=4, Lq=100, Lkv=100, tile=(10, 10), exact=True)
    assert got.shape == (2, 1, 10, 10)


def test_per_head_windows_give_per_head_maps() -> None:
    """MoA-style ``windows[h]``: one map per head, each exact."""
    windows = torch.tensor([8, 30, 64, 200])
    got = check_mask(lambda b, h, q, kv: (q - kv < windows[h]) & (q >= kv), None, B=3, H=4, Lq=232, Lkv=232,
                     tile=(16, 16), exact=True)
    assert got.shape == (1, 4, 15, 15)
    assert not torch.equal(got[0, 0], got[0, 3])


def test_lengths_per_batch() -> None:
    lengths = torch.tensor([5, 100, 232])
    got = check_mask(lambda b, h, q, kv: kv < lengths[b], None, B=3, H=2, Lq=64, Lkv=232, tile=(32, 32), exact=True)
    assert got.shape == (3, 1, 2, 8)


def test_boolean_captured_tensor_over_q_and_kv() -> None:
    """A dense ``allowed[q_idx, kv_idx]`` tensor: per-tile all/any summaries, exact."""
    allowed = torch.rand(100, 90) < 0.02
    allowed[:40, :30] = True
    check_mask(lambda b, h, q, kv: allowed[q, kv], None, B=1, H=1, Lq=100, Lkv=90, tile=(10, 15), exact=True)


def test_captured_tensor_too_short_is_a_clear_error() -> None:
    doc = torch.zeros(50, dtype=torch.int64)
    with pytest.raises(ValueError, match="doc"):
        check_mask(M.document(doc), None, B=1, H=1, Lq=64, Lkv=64, tile=(16, 16))


def test_no_mask_is_all_full() -> None:
    sp = analyze(None)
    assert bool((sp.block_map(2, 2, 100, 70, (16, 16)) == FULL).all())


@pytest.mark.parametrize("bad", [dict(tile=(0, 16)), dict(tile=16), dict(Lq=0), dict(q_offset=-1)])
def test_bad_sizes_are_clear_errors(bad: dict) -> None:
    args = dict(B=1, H=1, Lq=64, Lkv=64, tile=(16, 16), q_offset=0) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        analyze(trace_mask(M.causal, Captures())).block_map(**args)


# ---- score functions that return -inf ---------------------------------------------------------


def _score_keep(score: ex.Expr, tensors: dict, Lq: int, Lkv: int, q_offset: int) -> torch.Tensor:
    """Pairs whose score is not -inf (evaluated with a raw score of 0)."""
    env = {
        "score": torch.zeros(()), "b": torch.zeros(1, 1, 1, 1, dtype=torch.int64),
        "h": torch.zeros(1, 1, 1, 1, dtype=torch.int64),
        "q_idx": (q_offset + torch.arange(Lq)).view(1, 1, -1, 1), "kv_idx": torch.arange(Lkv).view(1, 1, 1, -1),
    }
    values = evaluate(score, env, tensors).expand(1, 1, Lq, Lkv)
    return values != -math.inf


@pytest.mark.parametrize(
    "score_fn",
    [
        lambda s, b, h, q, kv: torch.where(kv <= q, s, -math.inf),
        lambda s, b, h, q, kv: torch.where(q - kv >= 40, -math.inf, s),
        lambda s, b, h, q, kv: s + torch.where(kv > q, -math.inf, 0.0),
        lambda s, b, h, q, kv: s - 0.1 * (q - kv).abs(),
    ],
    ids=["where_keep", "where_drop", "additive_minus_inf", "alibi_like"],
)
def test_minus_inf_scores_count_as_masked(score_fn) -> None:
    """A tile whose scores are -inf is EMPTY or PARTIAL, never FULL (SEMANTICS.md: -inf is masked)."""
    captures = Captures()
    score = trace_score(score_fn, captures)
    mask = trace_mask(M.prefix_lm(20), captures)
    sp = analyze(mask, score)
    Lq, Lkv, tile = 120, 130, (16, 16)
    got = sp.block_map(1, 1, Lq, Lkv, tile, 5, captures.tensors)
    keep = dense_keep(mask, captures.tensors, 1, 1, Lq, Lkv, 5) & _score_keep(score, captures.tensors, Lq, Lkv, 5)
    assert_sound(got, brute_map(keep, tile), str(score))


def test_score_peeled_condition_proves_empty_tiles() -> None:
    """``where(kv <= q, score, -inf)`` without a mask still skips the future: EMPTY tiles exist."""
    captures = Captures()
    score = trace_score(lambda s, b, h, q, kv: torch.where(kv <= q, s, -math.inf), captures)
    got = analyze(None, score).block_map(1, 1, 64, 64, (16, 16))
    assert int((got == EMPTY).sum()) == 6 and int((got == FULL).sum()) == 6


def test_float_bias_tensor_is_checked_at_run_time() -> None:
    """A captured float bias may hold -inf: FULL tiles only when it holds none."""
    bias = torch.zeros(64)
    captures = Captures()
    score = trace_score(lambda s, b, h, q, kv: s + bias[kv], captures)
    sp = analyze(None, score)
    assert bool((sp.block_map(1, 1, 64, 64, (16, 16), 0, {"bias": bias}) == FULL).all())
    bias_inf = bias.clone()
    bias_inf[3] = -math.inf
    assert bool((sp.block_map(1, 1, 64, 64, (16, 16), 0, {"bias": bias_inf}) == PARTIAL).all())


# ---- block tables, kv ranges, the pass ---------------------------------------------------------------


def test_block_tables_list_tiles_in_ascending_order() -> None:
    """Tables agree with the map they come from, element by element (independent loop)."""
    sp = analyze(trace_mask(M.sliding_window(50) | M.sinks(8), Captures()))
    block_map = sp.block_map(1, 1, 232, 232, (24, 16))
    tables = sp.block_tables(1, 1, 232, 232, (24, 16))
    assert tables.b_broadcast and tables.h_broadcast
    for i in range(block_map.shape[2]):
        row = block_map[0, 0, i].tolist()
        for cls, count, index in ((PARTIAL, tables.partial_count, tables.partial_index),
                                  (FULL, tables.full_count, tables.full_index)):
            expected = [j for j, c in enumerate(row) if c == cls]
            n = int(count[0, 0, i])
            assert index.dtype == torch.int32 and count.dtype == torch.int32
            assert index[0, 0, i, :n].tolist() == expected
            assert all(v == 0 for v in index[0, 0, i, n:].tolist())


def test_tables_from_an_all_empty_map_have_width_one() -> None:
    tables = tables_from_map(torch.zeros(1, 2, 3, 4, dtype=torch.int8))
    assert tables.partial_index.shape == (1, 2, 3, 1) and int(tables.partial_count.sum()) == 0
    assert not tables.h_broadcast


class _Region:
    def __init__(self, mask, score, sparsity=None):
        self.mask, self.score, self.sparsity = mask, score, sparsity


def test_block_tables_for_without_sparsity() -> None:
    """Unanalysed regions are dense: all PARTIAL; no mask and no score: all FULL."""
    mask = trace_mask(M.causal, Captures())
    dense = block_tables_for(_Region(mask, None), 2, 2, 100, 100, (32, 32))
    assert dense.partial_count.tolist() == [[[4, 4, 4, 4]]] and int(dense.full_count.sum()) == 0
    free = block_tables_for(_Region(None, None), 2, 2, 100, 100, (32, 32))
    assert free.full_count.tolist() == [[[4, 4, 4, 4]]]
    proven = block_tables_for(_Region(mask, None, analyze(mask)), 2, 2, 100, 100, (32, 32))
    assert proven.partial_count.tolist() == [[[1, 1, 1, 1]]] and proven.full_count.tolist() == [[[0, 1, 2, 3]]]


def test_structured_kv_range_is_exact_for_sliding_window() -> None:
    """Per q tile, the kv range and its FULL sub-range match brute force exactly."""
    mask = trace_mask(M.sliding_window(64), Captures())
    sp = analyze(mask)
    assert sp.structured
    Lq = Lkv = 1000
    want = brute_map(dense_keep(mask, {}, 1, 1, Lq, Lkv, 0), (64, 64))[0, 0]
    kr = sp.kv_range(1, 1, Lq, Lkv, (64, 64))
    for i in range(want.shape[0]):
        nonempty = (want[i] != EMPTY).nonzero().flatten().tolist()
        full = (want[i] == FULL).nonzero().flatten().tolist()
        assert (int(kr.lo[0, 0, i]), int(kr.hi[0, 0, i])) == (nonempty[0], nonempty[-1] + 1)
        got_full = list(range(int(kr.full_lo[0, 0, i]), int(kr.full_hi[0, 0, i])))
        assert got_full == full


def test_kv_range_at_a_million_tokens_is_per_q_tile() -> None:
    """O(number of q tiles): a causal window over 2^20 tokens gives [nq] ranges without a map."""
    sp = analyze(trace_mask(M.sliding_window(4096), Captures()))
    kr = sp.kv_range(1, 1, 1 << 20, 1 << 20, (128, 128))
    assert kr.lo.shape == (1, 1, 8192)
    i = torch.arange(8192)
    assert torch.equal(kr.hi[0, 0].long(), i + 1)
    assert torch.equal(kr.lo[0, 0].long(), (i - 32).clamp(min=0))
    assert torch.equal(kr.full_lo[0, 0].long(), (i - 31).clamp(min=0))
    assert torch.equal(kr.full_hi[0, 0].long(), i)


def test_pass_attaches_hashable_sparsity() -> None:
    var = attncc.variant(mask=M.sliding_window(16))(lambda s, b, h, q, kv: s)
    result = sparsify(var.ir)
    attention = var.ir.attention_nodes()[0]
    fact = facts_of(result.graph, attention)["sparsity"]
    assert isinstance(fact, MaskSparsity) and hash(fact) == hash(analyze(fact.mask))
    assert "sparsity" not in facts_of(var.ir, attention)  # the input graph is not mutated
    region = var.plan.regions[0]
    assert isinstance(region.sparsity, MaskSparsity) and region.sparsity.structured


def test_public_block_map() -> None:
    doc = torch.tensor([[0] * 100 + [1] * 132, [0] * 10 + [1] * 222])
    var = attncc.variant(mask=M.document(doc) & M.causal)(lambda s, b, h, q, kv: s)
    got = attncc.block_map(var, 232, 232, tile=(64, 64))
    assert got.shape == (2, 1, 4, 4) and got.dtype == torch.int8
    keep = dense_keep(var.plan.regions[0].mask, var.tensors, 2, 1, 232, 232, 0)
    assert torch.equal(got, brute_map(keep, (64, 64)))
    plain = attncc.variant(mask=lambda b, h, q, kv: (b == 1) | (q >= kv))(lambda s, b, h, q, kv: s)
    with pytest.raises(ValueError, match="B="):
        attncc.block_map(plain, 64, 64, tile=(32, 32))
    assert attncc.block_map(plain, 64, 64, tile=(32, 32), B=3).shape == (3, 1, 2, 2)


def test_refinement_keeps_q_tiles_whole_when_only_kv_is_split() -> None:
    """Regression: ``kv_idx % 2`` splits kv tiles; q tiles (offset 8, size 3) must stay whole."""
    check_mask(lambda b, h, q, kv: (q >= kv) & (kv % 2 >= 1), None, B=1, H=1, Lq=2, Lkv=11, tile=(3, 3),
               q_offset=8, exact=True)


def test_document_kv_range_is_narrowed_by_sorted_ids() -> None:
    """Sorted ids: per q tile, kv_range is exactly the hull of the tiles sharing a document."""
    doc = torch.repeat_interleave(torch.arange(6), torch.tensor([30, 70, 5, 60, 40, 27]))
    captures = Captures()
    mask = trace_mask(M.document(doc), captures)
    sp = analyze(mask)
    want = brute_map(dense_keep(mask, captures.tensors, 1, 1, 232, 232, 0), (16, 16))[0, 0]
    kr = sp.kv_range(1, 1, 232, 232, (16, 16), 0, captures.tensors)
    for i in range(want.shape[0]):
        nonempty = (want[i] != EMPTY).nonzero().flatten().tolist()
        assert (int(kr.lo[0, 0, i]), int(kr.hi[0, 0, i])) == (nonempty[0], nonempty[-1] + 1)


def test_tables_of_captured_tensors_follow_in_place_writes_and_new_tensors() -> None:
    """Tables of a document mask are reused while its id tensor is the same, unmodified one; an
    in-place write (``_version``) or another tensor gives fresh tables, equal to a rebuild."""
    docs = torch.repeat_interleave(torch.arange(4), 32)
    captures = Captures()
    sp = analyze(trace_mask(lambda b, h, q, kv: docs[q] == docs[kv], captures))
    (name,) = captures.tensors

    def tables(t: torch.Tensor):
        return sp.block_tables(1, 1, 128, 128, (16, 16), 0, {name: t})

    first = tables(docs)
    assert tables(docs) is first  # reused
    docs[:64] = 0  # documents 0 and 1 merge
    merged = tables(docs)
    assert merged is not first
    assert int(merged.full_count.sum()) > int(first.full_count.sum())
    other = torch.zeros(128, dtype=torch.int64)
    single = tables(other)
    assert int(single.full_count.sum()) == 8 * 8 and int(single.partial_count.sum()) == 0
    expected = tables_from_map(sp.block_map(1, 1, 128, 128, (16, 16), 0, {name: docs}))
    assert torch.equal(merged.full_index, expected.full_index) and torch.equal(merged.full_count, expected.full_count)
