"""TVM backend: routing (TopKBlocks / MoBA, TopKHeads / MoH) and combine plans against the reference.

Besides matching the reference (SEMANTICS.md tolerances), the routed paths must skip work:
the block tables handed to the kernel list no tile outside the MoBA selection, and MoH's
kernel rows are exactly the kept (token, head) pairs. Shapes are small and share kernels
(D = 16 throughout) so the file compiles a handful of modules.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("tvm")

import attncc
from attncc import masks
from attncc.codegen.reference.attention import topk_blocks_selection
from attncc.codegen.tvm import BACKEND, heads, launcher, routing_tokens
from attncc.ir import nodes
from attncc.passes.lower_routing import block_index_table
from attncc.testing import (
    assert_close_to_reference,
    check_against_reference,
    check_gradient_penalty,
    random_qkv,
    reference_outputs,
)

SLOPES = torch.tensor([2.0 ** (-2.0 * (i + 1)) for i in range(4)])
SINK = torch.tensor([0.5, -1.0, 0.0, 2.0])


pytestmark = pytest.mark.usefixtures("tvm_cache_dir")


qkv = functools.partial(random_qkv, B=2, Hq=4, Hkv=2, Lq=75, Lkv=75, D=16)


def _alibi(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * (q_idx - kv_idx).abs()


class LaunchSpy:
    """Records what each kernel call was given, then runs it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict] = []
        real = launcher.launch

        def spy(region, shape, q, k, v, tensors, tables, **kwargs):
            self.calls.append({"region": region, "shape": shape, "q": q, "k": k, "tables": tables, "tensors": tensors})
            return real(region, shape, q, k, v, tensors, tables, **kwargs)

        monkeypatch.setattr(launcher, "launch", spy)


# ---- TopKBlocks (MoBA) ---------------------------------------------------------------------

MOBA = {
    "token_causal": lambda: attncc.variant(mask=masks.causal, routing=attncc.TopKBlocks(16, 3)),
    "block_causal": lambda: attncc.variant(mask=masks.causal, routing=attncc.TopKBlocks(16, 2, per="query_block")),
    "token_window_alibi": lambda: attncc.variant(
        _alibi, mask=masks.sliding_window(40), routing=attncc.TopKBlocks(16, 2, causal=False)),
    "token_dense": lambda: attncc.variant(routing=attncc.TopKBlocks(32, 2)),
    "block_dense_sink": lambda: attncc.variant(
        normalizer=attncc.Softmax(sink=SINK), routing=attncc.TopKBlocks(32, 2, per="query_block")),
    "token_sink": lambda: attncc.variant(
        mask=masks.causal, normalizer=attncc.Softmax(sink=SINK), routing=attncc.TopKBlocks(16, 2)),
    "token_sigmoid": lambda: attncc.variant(mask=masks.causal, normalizer="sigmoid", routing=attncc.TopKBlocks(16, 3)),
    # a normalised map cannot merge per-block partials: the tile path with a per-row bitmap
    "token_relu": lambda: attncc.variant(mask=masks.causal, normalizer="relu", routing=attncc.TopKBlocks(16, 3)),
}
_BUILT: dict[str, attncc.Variant] = {}


def moba(name: str) -> attncc.Variant:
    if name not in _BUILT:
        _BUILT[name] = MOBA[name]()
    return _BUILT[name]


@pytest.mark.parametrize("name", sorted(MOBA))
def test_topk_blocks_matches_reference(name: str) -> None:
    """Per token and per query block, causal and not, masks and score functions, GQA, lengths that
    are not multiples of the block, with the lse."""
    program = moba(name)
    assert BACKEND.checker(program.plan, torch.empty(1, 1, 1, 1)) is None
    q, k, v = qkv(Lq=75, Lkv=75)
    softmax = isinstance(program.plan.regions[0].normalizer, nodes.SoftmaxNorm)
    check_against_reference(program, q, k, v, backend="tvm", return_lse=softmax)


def test_topk_blocks_with_offset() -> None:
    """Decoding rows at the end of a cache: the gate, own block and causality use q_offset."""
    q, k, v = qkv(Lq=6, Lkv=83, seed=2)
    check_against_reference(moba("token_causal"), q, k, v, backend="tvm", q_offset=77)
    q, k, v = qkv(Lq=40, Lkv=90, seed=3)
    for name in ("token_causal", "block_causal"):
        check_against_reference(moba(name), q, k, v, backend="tvm", q_offset=50)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_topk_blocks_low_precision(dtype: torch.dtype) -> None:
    q, k, v = qkv(Lq=50, Lkv=50, dtype=dtype)
    out = moba("token_causal")(q, k, v, backend="tvm")
    assert out.dtype == dtype
    check_against_reference(moba("token_causal"), q, k, v, backend="tvm")


def _listed(tables) -> list[tuple[int, int, int, int]]:
    found = []
    for count, index in ((tables.partial_count, tables.partial_index), (tables.full_count, tables.full_index)):
        for b, h, qt in torch.nonzero(count > 0).tolist():
            found += [(b, h, qt, kt) for kt in index[b, h, qt, : count[b, h, qt]].tolist()]
    return found


@pytest.mark.parametrize("name", ["token_causal", "token_window_alibi"])
def test_topk_blocks_by_token_computes_only_selected_pairs(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per token, the kernel's rows are the selected (query, block) pairs, grouped by block, and a
    tile lists only kv tiles of its group's block, which every real row of it selected."""
    spy = LaunchSpy(monkeypatch)
    program = moba(name)
    q, k, v = qkv(B=1, Lq=160, Lkv=160)
    program(q, k, v, backend="tvm")
    (call,) = spy.calls
    gate = program.plan.regions[0].gate
    table = block_index_table(q, k, block=gate.block, k_top=gate.k, causal=gate.causal, dtype=torch.float64)
    bm, bn = call["shape"].block_m, call["shape"].block_n
    token, _, tile_block = routing_tokens.group_rows(table, -(-160 // gate.block), bm)
    assert call["q"].shape[2] == token.shape[2]
    assert int((token >= 0).sum()) == int((table >= 0).sum())  # one kernel row per selected pair
    for b, h, qt, kt in _listed(call["tables"]):
        assert kt * bn // gate.block == tile_block[b, h, qt]
        tokens = token[b, h, qt * bm : (qt + 1) * bm]
        assert (tokens >= 0).any()
        for i in tokens[tokens >= 0].tolist():
            assert int(tile_block[b, h, qt]) in table[b, h, i].tolist()


@pytest.mark.parametrize("name", ["block_causal", "token_relu"])
def test_topk_blocks_tables_list_only_selected_tiles(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tile path: every tile the kernel is told to visit holds a selected (query, key) pair,
    and the kernel's tile count is below the dense count."""
    spy = LaunchSpy(monkeypatch)
    program = moba(name)
    q, k, v = qkv(B=1, Lq=160, Lkv=160)
    program(q, k, v, backend="tvm")
    (call,) = spy.calls
    route = program.plan.regions[0]
    selected = topk_blocks_selection(route.routing, route.routing_causal, q, k, 0)  # [B, Hq, Lq, Lkv]
    bm, bn = call["shape"].block_m, call["shape"].block_n
    tables = call["tables"]
    visited = 0
    for count, index in ((tables.partial_count, tables.partial_index), (tables.full_count, tables.full_index)):
        for b, h, qt in torch.nonzero(count > 0).tolist():
            for kt in index[b, h, qt, : count[b, h, qt]].tolist():
                tile = selected[b, h, qt * bm : (qt + 1) * bm, kt * bn : (kt + 1) * bn]
                assert tile.any(), f"tile ({b}, {h}, {qt}, {kt}) lies outside the selection"
                visited += 1
    dense = q.shape[1] * -(-160 // bm) * -(-160 // bn)
    assert visited < dense


def test_topk_blocks_full_tiles_skip_the_bitmap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Query blocks aligned with tiles select whole tiles: no per-row bitmap enters the kernel."""
    spy = LaunchSpy(monkeypatch)
    q, k, v = qkv(Lq=64, Lkv=64)
    moba("block_dense_sink")(q, k, v, backend="tvm")
    (call,) = spy.calls
    assert call["region"].mask is None
    assert int(call["tables"].partial_count.sum()) == 0


def routed_grads(program: attncc.Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, *,
                 q_offset: int = 0, learn: tuple[torch.Tensor, ...] = (), dtype: torch.dtype | None = None):
    """Gradients of a fixed random projection of the output (q, k, v, then ``learn``)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in (q, k, v)]
    out = program(*leaves, backend=backend, q_offset=q_offset)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return torch.autograd.grad((out.double() * weights).sum(), (*leaves, *learn))


def check_routed_grads(program: attncc.Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                       q_offset: int = 0, learn: tuple[torch.Tensor, ...] = ()) -> None:
    """TVM gradients against the float64 reference's at twice the forward tolerance (SEMANTICS.md)."""
    got = routed_grads(program, q, k, v, "tvm", q_offset=q_offset, learn=learn)
    want = routed_grads(program, q, k, v, "reference", q_offset=q_offset, learn=learn, dtype=torch.float64)
    names = ("dq", "dk", "dv", *(f"dlearned{i}" for i in range(len(learn))))
    for name, g, w in zip(names, got, want, strict=True):
        assert_close_to_reference(g, w, None, k.shape[2], what=name, factor=2.0)


@pytest.mark.parametrize("name", sorted(MOBA))
def test_topk_blocks_gradients_come_from_the_generated_backward(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """TopKBlocks under autograd: the generated backward kernels on the tiles the forward visited
    (per-token routing included), no fallback warning, gradients as the reference's."""
    from attncc.codegen.tvm import autograd as tvm_autograd

    given_tables = []
    real = tvm_autograd.launch_backward

    def spy(*args, **kwargs):
        given_tables.append(kwargs.get("tables"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tvm_autograd, "launch_backward", spy)
    q, k, v = qkv(Lq=40, Lkv=75)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_routed_grads(moba(name), q, k, v, q_offset=35)
    assert given_tables and all(t is not None for t in given_tables)


@pytest.mark.parametrize("name", sorted(MOBA))
def test_topk_blocks_bfloat16_gradients(name: str) -> None:
    """TopKBlocks under autograd in bfloat16 (the backward multiplies by pairs where the host has
    AVX-512 BF16 and the tiles allow, ``backward_launch.uses_pair_dots``): SEMANTICS.md's rule."""
    q, k, v = (t.to(torch.bfloat16) for t in qkv(Lq=40, Lkv=75))
    got = routed_grads(moba(name), q, k, v, "tvm", q_offset=35)
    want = routed_grads(moba(name), q, k, v, "reference", q_offset=35, dtype=torch.float64)
    lowp = routed_grads(moba(name), q, k, v, "reference", q_offset=35)
    for what, g, w, low in zip(("dq", "dk", "dv"), got, want, lowp, strict=True):
        assert g.dtype == torch.bfloat16
        assert_close_to_reference(g, w, low, k.shape[2], what=what, factor=2.0)


def test_topk_blocks_learned_tensors_get_gradients() -> None:
    """A learned sink and a learned ALiBi slope table under MoBA routing."""
    sink = SINK.clone().requires_grad_(True)
    slopes = SLOPES.clone().requires_grad_(True)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    program = attncc.variant(alibi, mask=masks.causal, normalizer=attncc.Softmax(sink=sink),
                             routing=attncc.TopKBlocks(16, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_routed_grads(program, *qkv(Lq=70, Lkv=70), learn=(sink, slopes))


def test_routed_stick_breaking_gradients_are_generated() -> None:
    """Stick-breaking under TopKBlocks (the selected tiles, in order) and under TopKHeads (the kept
    rows, with the learned router): the generated backward, no warning."""
    blocks = attncc.variant(mask=masks.causal, normalizer="stick_breaking", routing=attncc.TopKBlocks(16, 2))
    router = torch.randn(2, 70, 4, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    heads = attncc.variant(mask=masks.causal, normalizer="stick_breaking", routing=attncc.TopKHeads(2, router))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_routed_grads(blocks, *qkv(Lq=40, Lkv=40))
        check_routed_grads(heads, *qkv(Lq=70, Lkv=70), learn=(router,))


def test_routed_grad_without_a_generated_backward_falls_back_with_its_reason() -> None:
    """A learned tensor read by the mask has no generated backward: under routing too the
    reference computes the gradients, after a warning that says why."""
    widths = torch.tensor([30.0, 40.0, 50.0, 60.0], requires_grad=True)
    program = attncc.variant(mask=lambda b, h, qi, ki: (qi >= ki) & (qi - ki < widths[h]),
                             routing=attncc.TopKBlocks(16, 2))
    q, k, v = qkv(Lq=40, Lkv=40)
    with pytest.warns(UserWarning, match="no gradient for this routed attention .*read by the mask"):
        got = routed_grads(program, q, k, v, "tvm")
    want = routed_grads(program, q, k, v, "reference", dtype=torch.float64)
    for g, w in zip(got, want):
        assert_close_to_reference(g, w, None, 40, factor=2.0)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    k_top=st.integers(1, 3),
    per=st.sampled_from(["token", "query_block"]),
    causal=st.booleans(),
    Lq=st.integers(17, 70),
    extra=st.integers(0, 40),
    seed=st.integers(0, 1000),
)
def test_topk_blocks_random_cases(k_top: int, per: str, causal: bool, Lq: int, extra: int, seed: int) -> None:
    """Random lengths, offsets and selections (block 16, so that the modules compiled above serve)."""
    block = 16
    Lkv = max(Lq + extra, block * k_top)
    mask = masks.causal if causal else None
    program = attncc.variant(mask=mask, routing=attncc.TopKBlocks(block, k_top, per=per))
    q, k, v = qkv(B=1, Hq=2, Hkv=1, Lq=Lq, Lkv=Lkv, seed=seed)
    check_against_reference(program, q, k, v, backend="tvm", q_offset=Lkv - Lq)


@settings(max_examples=6, deadline=None)
@given(
    k_top=st.integers(1, 3),
    per=st.sampled_from(["token", "query_block"]),
    causal=st.booleans(),
    normalizer=st.sampled_from(["softmax", "sigmoid"]),
    Lq=st.integers(1, 70),
    extra=st.integers(0, 40),
    seed=st.integers(0, 1000),
)
def test_topk_blocks_random_gradients(k_top: int, per: str, causal: bool, normalizer: str, Lq: int, extra: int,
                                      seed: int) -> None:
    """Random lengths, offsets (decoding rows included) and selections under autograd: generated
    gradients, no fallback, as the reference's."""
    block = 16
    Lkv = max(Lq + extra, block * k_top)
    program = attncc.variant(mask=masks.causal if causal else None, normalizer=normalizer,
                             routing=attncc.TopKBlocks(block, k_top, per=per))
    q, k, v = qkv(B=1, Hq=2, Hkv=1, Lq=Lq, Lkv=Lkv, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_routed_grads(program, q, k, v, q_offset=Lkv - Lq)


# ---- TopKHeads (MoH) -----------------------------------------------------------------------


def moh(k_top: int, Lq: int, score=None, normalizer="softmax", seed=5) -> attncc.Variant:
    router = torch.randn(2, Lq, 4, generator=torch.Generator().manual_seed(seed))
    return attncc.variant(score, mask=masks.causal, normalizer=normalizer, routing=attncc.TopKHeads(k_top, router))


@pytest.mark.parametrize("k_top", [1, 2, 3, 4])
def test_topk_heads_matches_reference(k_top: int) -> None:
    program = moh(k_top, 70)
    assert BACKEND.checker(program.plan, torch.empty(1, 1, 1, 1)) is None
    q, k, v = qkv(Lq=70, Lkv=70)
    check_against_reference(program, q, k, v, backend="tvm")


@pytest.mark.parametrize("k_top", [1, 2, 4])
def test_topk_heads_gradients_come_from_the_generated_backward(k_top: int) -> None:
    """TopKHeads under autograd: the kernel on the kept rows under the generated backward (an ALiBi
    score), q, k, v and the learned router (through the weights' softmax). A learned table the
    score reads goes through the same ``generated_backward`` as TopKBlocks' (tested above)."""
    router = torch.randn(2, 70, 4, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    program = attncc.variant(_alibi, mask=masks.causal, routing=attncc.TopKHeads(k_top, router))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_routed_grads(program, *qkv(Lq=70, Lkv=70), learn=(router,))


def test_topk_heads_score_reads_real_rows() -> None:
    """ALiBi reads h and q_idx: the compacted rows must see the real token's q_idx (with offset)."""
    program = moh(2, 30, score=_alibi)
    q, k, v = qkv(Lq=30, Lkv=90)
    check_against_reference(program, q, k, v, backend="tvm", q_offset=60)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_heads_sink_and_lse(dtype: torch.dtype) -> None:
    """Kept pairs match the reference's output and lse; skipped pairs are zero with lse -inf."""
    program = moh(2, 45, normalizer=attncc.Softmax(sink=SINK))
    q, k, v = qkv(Lq=45, Lkv=45, dtype=dtype)
    out, lse = program(q, k, v, backend="tvm", return_lse=True)
    (ref_out, ref_lse), lowp = reference_outputs(program, {"q": q, "k": k, "v": v}, return_lse=True)
    assert_close_to_reference(out, ref_out, lowp[0] if lowp else None, 45)
    compact = heads.compact_heads(program.tensors[program.plan.regions[0].head_select.router], 2, 4)
    kept = torch.zeros(2, 4, 45, dtype=torch.bool)
    kept.scatter_(2, compact.tokens, compact.valid)
    assert_close_to_reference(lse[kept].double(), ref_lse.double()[kept], None, 45, what="lse")
    assert torch.all(lse[~kept] == -torch.inf)
    assert torch.all(out[~kept] == 0)


@pytest.mark.parametrize("k_top", [1, 3])
def test_topk_heads_computes_only_kept_pairs(k_top: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's rows are the kept (token, head) pairs: counts sum to B * Lq * k, the
    compacted query has the largest count as its length, and no tile of padding rows is listed."""
    spy = LaunchSpy(monkeypatch)
    program = moh(k_top, 70)
    q, k, v = qkv(Lq=70, Lkv=70)
    program(q, k, v, backend="tvm")
    (call,) = spy.calls
    compact = heads.compact_heads(program.tensors[program.plan.regions[0].head_select.router], k_top, 4)
    assert int(compact.count.sum()) == 2 * 70 * k_top
    assert call["q"].shape[2] == int(compact.count.max())
    bm = call["shape"].block_m
    tiles_needed = -(-compact.count // bm)  # [B, Hq]
    listed = (call["tables"].partial_count + call["tables"].full_count) > 0  # [B, Hq, nq]
    for b in range(2):
        for h in range(4):
            assert not listed[b, h, int(tiles_needed[b, h]) :].any()


# ---- combine (differential attention) ------------------------------------------------------


def differential(mask=masks.causal) -> attncc.ComposedProgram:
    g = attncc.GraphBuilder("differential")
    q1, k1, q2, k2, v = g.inputs("q1", "k1", "q2", "k2", "v")
    lam = g.scalar("lam")
    return g.build(g.attention(q1, k1, v, mask=mask) - lam * g.attention(q2, k2, v, mask=mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_differential_attention(dtype: torch.dtype) -> None:
    program = differential()
    gen = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(2, 4, 53, 16, generator=gen).to(dtype) for n in ("q1", "k1", "q2", "k2", "v")}
    assert BACKEND.checker(program.plan, inputs["q1"]) is None
    out = program(**inputs, lam=torch.tensor(0.7), backend="tvm")
    assert program.last_choice.backend.name == "tvm"
    ref64, lowp = reference_outputs(program, inputs)
    assert out.dtype == dtype
    assert_close_to_reference(out, ref64, lowp, 53)


def test_combine_refuses_lse() -> None:
    """return_lse is defined for one attention, not a combined graph (as the reference says)."""
    program = differential()
    plan = program.plan
    q = torch.randn(1, 1, 8, 16)
    operands = dict.fromkeys(("q1", "k1", "q2", "k2", "v"), q)
    with pytest.raises(ValueError, match="single attention"):
        BACKEND.run(plan, operands, {"lam": torch.tensor(0.5)}, scale=None, q_offset=0, return_lse=True)


@settings(max_examples=6, deadline=None)
@given(k_top=st.integers(1, 4), Lq=st.integers(17, 60), extra=st.integers(0, 30), seed=st.integers(0, 1000))
def test_topk_heads_random_cases(k_top: int, Lq: int, extra: int, seed: int) -> None:
    program = moh(k_top, Lq, seed=seed)
    q, k, v = qkv(Lq=Lq, Lkv=Lq + extra, seed=seed)
    check_against_reference(program, q, k, v, backend="tvm", q_offset=extra)


@pytest.mark.parametrize(("block", "per"), [(8, "query_block"), (24, "query_block"), (24, "token")])
def test_topk_blocks_odd_block_sizes(block: int, per: str) -> None:
    """Blocks that no tile size divides (tiles straddle key blocks) or that force small query tiles:
    the register block must be refitted to the space's rules."""
    program = attncc.variant(mask=masks.causal, routing=attncc.TopKBlocks(block, 2, per=per))
    q, k, v = qkv(B=1, Hq=2, Hkv=1, Lq=90, Lkv=90, seed=7)
    check_against_reference(program, q, k, v, backend="tvm", return_lse=True)
    check_against_reference(program, q[:, :, :5], k, v, backend="tvm", q_offset=85)


@pytest.mark.parametrize("name", ["block_causal", "token_causal", "block_dense_sink", "moh"])
def test_routed_gradient_penalty_matches_the_reference(name: str) -> None:
    """``create_graph=True`` through routed attention: the reference recomputes the routed region
    itself, not the kernel's re-indexed one (where no selection mask is needed only the tiles say
    which blocks it attends: the penalty's gradients had been dense attention's)."""
    program = moh(2, 64) if name == "moh" else moba(name)
    check_gradient_penalty(program, *qkv(Lq=64, Lkv=64), backend="tvm")
