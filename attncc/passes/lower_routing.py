"""Lower routing: TopKBlocks becomes a gate step with a block table; TopKHeads a head selection.

The pass resolves what SEMANTICS.md ("Routing") leaves to the compiler (whether the causal
rules apply) and records a ``RoutingGate`` or ``HeadSelection`` on the region. The runtime
steps live here too, in plain torch, as the algorithm backends mirror:

- ``block_index_table``: gate cost O(L * n_blocks * D) (keys mean-pooled per block once,
  queries against block means), never an ``Lq x Lkv`` buffer; the result is an int32 table
  ``[B, Hq, rows, k]`` of selected kv blocks, ascending and padded with -1;
- ``head_selection``: per token, the top-k heads and their renormalised weights.
"""

from __future__ import annotations

import math

import torch

from attncc.ir.dense import expand_kv, normalize_scores
from attncc.ir.evaluate import evaluate
from attncc.ir.graph import AttentionGraph
from attncc.ir.nodes import TopKBlocksRoute, TopKHeadsRoute
from attncc.passes.causality import mask_implies_causal
from attncc.passes.manager import PassResult, add_note, attach, facts_of
from attncc.passes.plan import AttentionRegion, HeadSelection, RoutingGate

Tensor = torch.Tensor


def _mask_expr(graph: AttentionGraph, attention: str):
    mask = graph.operands(attention).get("mask")
    return graph.payload(mask).expr if mask else None


def lower_routing(graph: AttentionGraph) -> PassResult:
    """Record each routed region's gate step (TopKBlocks) or head selection (TopKHeads)."""
    out, modified = graph, False
    for attention in graph.attention_nodes():
        route_node = graph.operands(attention).get("routing")
        if route_node is None or "gate" in facts_of(graph, attention) or "head_select" in facts_of(graph, attention):
            continue
        route = graph.payload(route_node)
        if isinstance(route, TopKBlocksRoute):
            causal = route.causal if route.causal is not None else mask_implies_causal(_mask_expr(graph, attention))
            gate = RoutingGate(route.block, route.k, route.per, bool(causal))
            out = attach(out, attention, gate=gate, routing_causal=bool(causal))
            out = add_note(out, f"lower_routing: %{attention} gate over {route.block}-token key blocks, "
                                f"top {route.k} per {route.per}, causal={bool(causal)}")
        elif isinstance(route, TopKHeadsRoute):
            out = attach(out, attention, head_select=HeadSelection(route.k, route.router.name))
            out = add_note(out, f"lower_routing: %{attention} keeps top {route.k} heads per token "
                                f"(router {route.router.name}); unselected heads are skipped")
        modified = True
    return PassResult(out, modified)


# ---- runtime: TopKBlocks gate ----------------------------------------------------------


def key_block_means(k: Tensor, block: int, dtype: torch.dtype) -> Tensor:
    """``[B, Hkv, n_blocks, D]``: the mean of each block's keys (a partial last block over its real keys)."""
    B, Hkv, Lkv, D = k.shape
    n_blocks, whole = -(-Lkv // block), Lkv // block
    # NOTE: sums accumulate in ``dtype`` straight from k (no converted copy of the keys)
    sums = torch.empty(B, Hkv, n_blocks, D, dtype=dtype, device=k.device)
    sums[:, :, :whole] = k[:, :, : whole * block].reshape(B, Hkv, whole, block, D).sum(dim=3, dtype=dtype)
    if whole < n_blocks:
        sums[:, :, whole] = k[:, :, whole * block :].sum(dim=2, dtype=dtype)
    counts = torch.full((n_blocks,), block, dtype=dtype, device=k.device)
    counts[-1] = Lkv - (n_blocks - 1) * block
    return sums / counts.view(1, 1, -1, 1)


def query_rows(q: Tensor, block: int, per: str, q_offset: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(gate queries ``[B, Hq, rows, D]``, the q_idx block of each row ``[rows]``).

    ``per="token"``: one row per query; ``per="query_block"``: the mean of the queries of
    each ``block``-sized query block (by ``q_idx // block``, so ``q_offset`` matters).
    """
    Lq = q.shape[2]
    q_idx = torch.arange(Lq, device=q.device) + q_offset
    if per == "token":
        return q.to(dtype), q_idx // block
    first = q_offset // block
    group = q_idx // block - first
    rows = int(group[-1]) + 1 if Lq else 0
    sums = torch.zeros(*q.shape[:2], rows, q.shape[-1], dtype=dtype, device=q.device)
    sums.index_add_(2, group, q.to(dtype))
    sizes = torch.bincount(group, minlength=rows).to(dtype).view(1, 1, -1, 1)
    return sums / sizes, torch.arange(rows, device=q.device) + first


def block_index_table(
    q: Tensor,
    k: Tensor,
    *,
    block: int,
    k_top: int,
    per: str = "token",
    causal: bool = False,
    q_offset: int = 0,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """MoBA's selection as an int32 table ``[B, Hq, rows, k_top]`` (ascending, -1 padded).

    Gate ``q . mean(k_J)`` (unscaled); the largest ``k_top`` win, ties towards the lower
    block. Causal: blocks starting after the query are ineligible and the query's own block
    is always selected (it counts towards ``k_top``). Cost O(rows * n_blocks * D).
    """
    B, Hq, _, D = q.shape
    Hkv, Lkv = k.shape[1], k.shape[2]
    n_blocks = -(-Lkv // block)
    if k_top > n_blocks:
        raise ValueError(f"TopKBlocks(k={k_top}) exceeds the {n_blocks} key blocks of Lkv={Lkv}, block={block}")
    dtype = dtype or torch.promote_types(q.dtype, torch.float32)
    means = key_block_means(k, block, dtype)  # [B, Hkv, nb, D]
    queries, own = query_rows(q, block, per, q_offset, dtype)  # [B, Hq, rows, D], [rows]
    rows = queries.shape[2]
    group = Hq // Hkv
    gate = queries.reshape(B, Hkv, group, rows, D) @ means.unsqueeze(2).transpose(-1, -2)
    gate = gate.reshape(B, Hq, rows, n_blocks)
    blocks = torch.arange(n_blocks, device=q.device)
    eligible = torch.ones(rows, n_blocks, dtype=torch.bool, device=q.device)
    if causal:
        eligible = blocks.view(1, -1) <= own.view(-1, 1)
        gate = torch.where(blocks.view(1, -1) == own.view(-1, 1), torch.inf, gate)
    gate = torch.where(eligible, gate, -torch.inf)
    order = top_indices(gate, k_top)
    chosen_ok = torch.gather(eligible.expand(B, Hq, rows, n_blocks), -1, order)
    table = torch.where(chosen_ok, order, n_blocks)  # ineligible picks sort last, then become -1
    table = torch.sort(table, dim=-1).values
    return torch.where(table == n_blocks, -1, table).to(torch.int32)


def top_indices(gate: Tensor, k_top: int) -> Tensor:
    """The first ``k_top`` indices of a stable descending sort of each row (ties towards the lower
    index), by ``topk``; only rows tied at the k-th place pay for the sort."""
    n = gate.shape[-1]
    if k_top >= n:
        return torch.sort(gate, dim=-1, descending=True, stable=True).indices[..., :k_top]
    values, order = torch.topk(gate, k_top + 1, dim=-1)  # descending
    tied = values[..., k_top - 1] == values[..., k_top]
    if bool(tied.any()):
        order[tied] = torch.sort(gate[tied], dim=-1, descending=True, stable=True).indices[..., : k_top + 1]
    return order[..., :k_top]


def table_to_token_mask(table: Tensor, block: int, per: str, Lq: int, Lkv: int, q_offset: int = 0) -> Tensor:
    """Expand a block table to ``[B, Hq, Lq, Lkv]`` booleans (for tests and the dense fallback)."""
    B, Hq, rows, _ = table.shape
    n_blocks = -(-Lkv // block)
    hit = torch.zeros(B, Hq, rows, n_blocks + 1, dtype=torch.bool, device=table.device)
    hit.scatter_(-1, torch.where(table < 0, n_blocks, table).long(), True)
    hit = hit[..., :n_blocks]
    if per != "token":
        q_idx = torch.arange(Lq, device=table.device) + q_offset
        hit = hit[:, :, q_idx // block - q_offset // block]
    return hit[..., torch.arange(Lkv, device=table.device) // block]


# ---- runtime: TopKHeads selection -------------------------------------------------------


def head_selection(router: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(kept heads ``[B, Lq, k]`` ascending, their weights ``[B, Lq, k]``) from logits ``[B, Lq, Hq]``.

    Top ``k`` logits per token, ties towards the lower head, softmax over the kept logits.
    """
    if router.dim() != 3:
        raise ValueError(f"router must be [B, Lq, Hq] logits, got shape {tuple(router.shape)}")
    if not 1 <= k <= router.shape[-1]:
        raise ValueError(f"k={k} must be between 1 and the router's {router.shape[-1]} heads")
    order = torch.sort(router, dim=-1, descending=True, stable=True).indices[..., :k]
    heads = torch.sort(order, dim=-1).values
    weights = torch.softmax(torch.gather(router, -1, heads), dim=-1)
    return heads, weights


def head_weights_dense(heads: Tensor, weights: Tensor, Hq: int) -> Tensor:
    """Scatter a selection back to ``[B, Hq, Lq, 1]`` (zeros for skipped heads), as the reference."""
    B, Lq, _ = heads.shape
    dense = torch.zeros(B, Lq, Hq, dtype=weights.dtype, device=weights.device)
    dense.scatter_(-1, heads, weights)
    return dense.permute(0, 2, 1).unsqueeze(-1)


# ---- runtime: a block-sparse region consuming the table ---------------------------------


def routed_attention(
    region: AttentionRegion,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tensors: dict[str, Tensor],
    table: Tensor,
    *,
    scale: float | None = None,
    q_offset: int = 0,
) -> Tensor:
    """A TopKBlocks region on its selected key blocks only: cost O(Lq * k * block * D).

    Each query gathers the ``k * block`` keys its table row names (-1 and positions past
    ``Lkv`` are masked), then applies the region's score, mask and normaliser there, as
    the dense reference does on the full row (SEMANTICS.md: routing intersects the mask).
    """
    gate = region.gate
    if gate is None:
        raise ValueError(f"region %{region.node} has no TopKBlocks gate (run lower_routing first)")
    dtype = torch.promote_types(q.dtype, torch.float32)
    B, Hq, Lq, D = q.shape
    Lkv = k.shape[2]
    if gate.per != "token":
        q_idx = torch.arange(Lq, device=q.device) + q_offset
        table = table[:, :, q_idx // gate.block - q_offset // gate.block]
    offsets = torch.arange(gate.block, device=q.device)
    pos = (table.long().unsqueeze(-1) * gate.block + offsets).flatten(-2)  # [B, Hq, Lq, k * block]
    valid = (table.long().unsqueeze(-1) >= 0).expand(*table.shape, gate.block).flatten(-2) & (pos < Lkv)
    pos = torch.where(valid, pos, 0)
    ctx = {n: (t.to(dtype) if t.is_floating_point() else t) for n, t in tensors.items()}
    flat = pos.flatten(2).unsqueeze(-1)
    keys = torch.gather(expand_kv(k, Hq).to(dtype), 2, flat.expand(-1, -1, -1, D)).view(*pos.shape, D)
    values = torch.gather(expand_kv(v, Hq).to(dtype), 2, flat.expand(-1, -1, -1, v.shape[-1]))
    values = values.view(*pos.shape, v.shape[-1])
    scale = (1.0 / math.sqrt(D) if scale is None else scale) * (region.score_scale or 1.0)
    raw = scale * torch.einsum("bhqd,bhqnd->bhqn", q.to(dtype), keys)
    grid = {
        "b": torch.arange(B, device=q.device).view(B, 1, 1, 1),
        "h": torch.arange(Hq, device=q.device).view(1, Hq, 1, 1),
        "q_idx": (torch.arange(Lq, device=q.device) + q_offset).view(1, 1, Lq, 1),
        "kv_idx": pos,
    }
    s = raw if region.score is None else evaluate(region.score, {**grid, "score": raw}, ctx, dtype)
    if region.row_shift is not None:
        s = s + evaluate(region.row_shift, grid, ctx, dtype)
    s = torch.broadcast_to(s, pos.shape)
    keep = valid & (s != -math.inf)
    if region.mask is not None:
        keep = keep & evaluate(region.mask, grid, ctx, dtype)
    # NOTE: the normalisers are the reference's own (attncc.ir.dense): routing changes which keys, not how they weigh.
    weights, _ = normalize_scores(region.normalizer, s, keep, ctx, Lkv, dtype)
    return torch.einsum("bhqn,bhqnd->bhqd", weights, values).to(q.dtype)
