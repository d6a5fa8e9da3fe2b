"""lower_routing: gate steps on the plan; block tables and head selections vs the reference."""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.codegen.reference.attention import topk_blocks_selection, topk_heads_weights
from attncc.ir.nodes import TopKBlocksRoute, TopKHeadsRoute
from attncc.passes.lower_routing import (
    block_index_table,
    head_selection,
    head_weights_dense,
    lower_routing,
    table_to_token_mask,
)
from attncc.passes.plan import HeadSelection, RoutingGate
from attncc.testing import assert_close_to_reference


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def qk(Lq: int, Lkv: int, Hq: int = 4, Hkv: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, Hq, Lq, 8, generator=gen, dtype=torch.float64),
            torch.randn(2, Hkv, Lkv, 8, generator=gen, dtype=torch.float64))


# ---- the pass ------------------------------------------------------------------------


def test_gate_causal_from_mask() -> None:
    """``causal=None`` with a mask implying ``kv_idx <= q_idx``: the causal rules apply."""
    var = attncc.variant(mask=causal, routing=attncc.TopKBlocks(block=16, k=3))
    region = var.plan.regions[0]
    assert region.gate == RoutingGate(16, 3, "token", True)
    assert region.routing_causal


def test_gate_not_causal_without_mask() -> None:
    var = attncc.variant(routing=attncc.TopKBlocks(block=16, k=3, per="query_block"))
    assert var.plan.regions[0].gate == RoutingGate(16, 3, "query_block", False)


def test_explicit_causal_wins() -> None:
    var = attncc.variant(routing=attncc.TopKBlocks(block=8, k=2, causal=True))
    assert var.plan.regions[0].gate.causal


def test_heads_selection_recorded() -> None:
    router = torch.randn(1, 10, 4)
    var = attncc.variant(mask=causal, routing=attncc.TopKHeads(k=2, router=router))
    (region,) = var.plan.regions
    assert region.head_select == HeadSelection(2, region.routing.router.name)


def test_no_routing_unchanged() -> None:
    assert not lower_routing(attncc.variant(mask=causal).ir).modified


# ---- block tables against the reference's token selection -----------------------------


@pytest.mark.parametrize("per", ["token", "query_block"])
@pytest.mark.parametrize("causal_rules", [False, True])
@pytest.mark.parametrize(("Lq", "Lkv", "q_offset", "block", "k"), [
    (37, 37, 0, 8, 2),  # partial last block
    (40, 40, 0, 8, 5),  # k == number of blocks
    (5, 45, 40, 8, 3),  # decoding with a cache
    (12, 50, 19, 7, 4),  # mid-sequence queries, odd block
    (33, 33, 0, 16, 1),  # only the own block under causal rules
])
def test_block_table_matches_reference(per: str, causal_rules: bool, Lq: int, Lkv: int, q_offset: int,
                                       block: int, k: int) -> None:
    q, key = qk(Lq, Lkv)
    table = block_index_table(q, key, block=block, k_top=k, per=per, causal=causal_rules, q_offset=q_offset)
    assert table.dtype == torch.int32 and table.shape[-1] == k
    expected = topk_blocks_selection(TopKBlocksRoute(block, k, per, causal_rules), causal_rules, q, key, q_offset)
    got = table_to_token_mask(table, block, per, Lq, Lkv, q_offset)
    assert torch.equal(got, expected)


def test_table_rows_ascending_and_padded() -> None:
    """Under causal rules early queries have fewer eligible blocks than k: -1 pads the row's end."""
    q, key = qk(24, 24)
    table = block_index_table(q, key, block=4, k_top=3, causal=True)
    assert torch.equal(table[0, 0, 0], torch.tensor([0, -1, -1], dtype=torch.int32))
    assert torch.equal(table[0, 0, 5], torch.tensor([0, 1, -1], dtype=torch.int32))
    valid = table[table >= 0].view(-1)
    assert valid.numel() > 0
    rows = table.view(-1, 3)
    for row in rows:
        kept = row[row >= 0]
        assert torch.all(kept[1:] > kept[:-1]) and torch.all(row[len(kept):] == -1)


def test_ties_go_to_the_lower_block() -> None:
    """All gates equal (zero keys): the lowest-index blocks win, as in the reference."""
    q = torch.randn(1, 2, 9, 4, dtype=torch.float64)
    key = torch.zeros(1, 2, 32, 4, dtype=torch.float64)
    table = block_index_table(q, key, block=8, k_top=2)
    assert torch.all(table == torch.tensor([0, 1], dtype=torch.int32))
    route = TopKBlocksRoute(8, 2)
    assert torch.equal(table_to_token_mask(table, 8, "token", 9, 32), topk_blocks_selection(route, False, q, key, 0))


def test_query_block_table_has_one_row_per_query_block() -> None:
    q, key = qk(20, 64)
    table = block_index_table(q, key, block=8, k_top=2, per="query_block", q_offset=4)
    assert table.shape == (2, 4, 3, 2)  # q_idx 4..23 spans query blocks 0, 1, 2


def test_too_many_blocks_is_an_error() -> None:
    q, key = qk(4, 20)
    with pytest.raises(ValueError, match="exceeds"):
        block_index_table(q, key, block=8, k_top=4)


def test_gate_cost_is_linear_in_length() -> None:
    """L = 16384 with 64-token blocks: the gate is [rows, 256], never [Lq, Lkv] (a 2 GiB buffer here)."""
    q = torch.randn(1, 2, 16384, 16)
    key = torch.randn(1, 1, 16384, 16)
    table = block_index_table(q, key, block=64, k_top=4, causal=True)
    assert table.shape == (1, 2, 16384, 4)
    assert torch.all(table[0, :, -1] >= 0)


# ---- head selection against the reference ---------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4])
def test_head_selection_matches_reference(k: int) -> None:
    router = torch.randn(3, 11, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    heads, weights = head_selection(router, k)
    assert heads.shape == weights.shape == (3, 11, k)
    assert torch.all(heads[..., 1:] > heads[..., :-1])
    expected = topk_heads_weights(TopKHeadsRoute(k, None), router)  # type: ignore[arg-type]
    torch.testing.assert_close(head_weights_dense(heads, weights, 4), expected, rtol=0, atol=1e-15)


def test_head_selection_ties_to_lower_head() -> None:
    router = torch.zeros(1, 2, 4, dtype=torch.float64)
    heads, weights = head_selection(router, 2)
    assert torch.equal(heads, torch.tensor([[[0, 1], [0, 1]]]))
    assert torch.allclose(weights, torch.full_like(weights, 0.5))


def test_head_selection_bad_input() -> None:
    with pytest.raises(ValueError, match="k=5"):
        head_selection(torch.zeros(1, 2, 4), 5)
    with pytest.raises(ValueError, match="router"):
        head_selection(torch.zeros(2, 4), 1)


# ---- the block-sparse region consuming the table -----------------------------------------


@pytest.mark.parametrize("normalizer", ["softmax", attncc.Softmax(sink=torch.tensor([0.1, -0.5, 1.0, 0.0])),
                                        "sigmoid", "relu", "stick_breaking"])
@pytest.mark.parametrize("per", ["token", "query_block"])
def test_routed_attention_matches_reference(normalizer: object, per: str) -> None:
    """Attention on the gathered blocks equals the dense reference with the token selection."""
    from attncc.codegen.reference.attention import attention
    from attncc.passes.lower_routing import routed_attention

    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    var = attncc.variant(alibi, mask=causal, normalizer=normalizer, routing=attncc.TopKBlocks(6, 3, per=per))
    region = var.plan.regions[0]
    tensors = {n: t.double() for n, t in var.tensors.items()}
    for Lq, Lkv, q_offset in ((29, 29, 0), (5, 40, 35)):
        q, key = qk(Lq, Lkv, seed=4)
        v = torch.randn(2, 2, Lkv, 5, dtype=torch.float64)
        table = block_index_table(q, key, block=6, k_top=3, per=per, causal=region.gate.causal, q_offset=q_offset)
        got = routed_attention(region, q, key, v, tensors, table, q_offset=q_offset)
        want, _ = attention(region, q, key, v, tensors, scale=None, q_offset=q_offset)
        assert_close_to_reference(got, want, None, Lkv)


@pytest.mark.parametrize("k_top", [1, 3, 7, 8])
def test_top_indices_match_a_stable_sort_with_ties(k_top: int) -> None:
    """topk picks the same set as a stable descending sort, ties (small integers, +-inf) included."""
    from attncc.passes.lower_routing import top_indices

    gate = torch.randint(-2, 3, (3, 50, 8), generator=torch.Generator().manual_seed(k_top)).double()
    gate[0, :5] = -torch.inf
    gate[1, :5, 2] = torch.inf
    want = torch.sort(gate, dim=-1, descending=True, stable=True).indices[..., :k_top]
    assert torch.equal(torch.sort(top_indices(gate, k_top), dim=-1).values, torch.sort(want, dim=-1).values)
