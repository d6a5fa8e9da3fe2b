"""fuse: one fused region per attention; attentions sharing k/v tiles become one region group."""

from __future__ import annotations

import torch

import attncc
from attncc.codegen.reference.attention import run_plan
from attncc.passes.fuse import fuse
from attncc.passes.lower import graph_to_plan
from attncc.passes.plan import RegionGroup
from attncc.testing import assert_close_to_reference


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def differential(shared_k: bool = False, linear: bool = False) -> attncc.ComposedProgram:
    g = attncc.GraphBuilder("diff")
    q1, k1, q2, k2, v = g.inputs("q1", "k1", "q2", "k2", "v")
    lam = g.scalar("lam")
    norm = attncc.Linear() if linear else "softmax"
    o1 = g.attention(q1, k1, v, mask=causal)
    o2 = g.attention(q2, k1 if shared_k else k2, v, mask=causal, normalizer=norm)
    return g.build(o1 - lam * o2)


def test_single_attention_is_one_fused_region() -> None:
    """Score, mask, normalizer and value product run in one loop nest: no group needed."""
    plan = attncc.variant(mask=causal).plan
    assert plan.regions[0].fused and plan.groups == ()


def test_differential_attention_shares_v() -> None:
    """``attn(q1, k1, v) - lam * attn(q2, k2, v)``: one kernel reads each v tile once."""
    program = differential()
    plan = program.plan
    assert plan.groups == (RegionGroup(tuple(r.node for r in plan.regions), ("v",)),)
    assert any("read" in note and "v" in note for note in plan.notes)
    assert "fuse: regions" in program.explain()


def test_shared_k_and_v() -> None:
    plan = differential(shared_k=True).plan
    assert plan.groups[0].shared == ("k1", "v")


def test_independent_attentions_not_grouped() -> None:
    g = attncc.GraphBuilder("two")
    q1, k1, v1, q2, k2, v2 = g.inputs("q1", "k1", "v1", "q2", "k2", "v2")
    program = g.build(g.attention(q1, k1, v1) + g.attention(q2, k2, v2))
    assert program.plan.groups == ()


def test_linear_region_not_grouped() -> None:
    """A Linear region runs its own chunked schedule, so it cannot share the tiled kv loop."""
    assert differential(linear=True).plan.groups == ()


def test_fuse_changes_no_numbers() -> None:
    """Fuse only records facts: the reference gives the same output before and after it."""
    program = differential()
    gen = torch.Generator().manual_seed(0)
    ops = {n: torch.randn(1, 2, 17, 8, generator=gen, dtype=torch.float64) for n in ("q1", "k1", "q2", "k2", "v")}
    tensors = {"lam": torch.tensor(0.8, dtype=torch.float64)}
    before = run_plan(graph_to_plan(program.ir), ops, tensors, scale=None, q_offset=0, return_lse=False)
    result = fuse(program.ir)
    assert result.modified and str(result.graph) == str(program.ir)
    after = run_plan(graph_to_plan(result.graph), ops, tensors, scale=None, q_offset=0, return_lse=False)
    assert_close_to_reference(after, before, None, 17)


def test_fuse_is_idempotent() -> None:
    once = fuse(differential().ir).graph
    assert not fuse(once).modified
