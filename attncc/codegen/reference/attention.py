"""The reference backend: dense eager torch, exactly SEMANTICS.md. Every test compares to it.

It materialises the ``[B, Hq, Lq, Lkv]`` score matrix on purpose: clarity over speed.
"""

from __future__ import annotations

import math

import torch

from attncc.ir import nodes
from attncc.ir.dense import divide_rows, expand_kv, feature_map, index_grid, normalize_scores
from attncc.ir.evaluate import evaluate
from attncc.passes.plan import AttentionRegion, KernelPlan

Tensor = torch.Tensor


def run_plan(
    plan: KernelPlan,
    operands: dict[str, Tensor],
    tensors: dict[str, Tensor],
    *,
    scale: float | None,
    q_offset: int,
    return_lse: bool,
    compute_dtype: torch.dtype | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Run every region of ``plan`` densely and combine the results."""
    outputs: dict[str, tuple[Tensor, Tensor | None]] = {}
    for region in plan.regions:
        outputs[region.node] = attention(
            region, operands[region.q], operands[region.k], operands[region.v], tensors,
            scale=scale, q_offset=q_offset, compute_dtype=compute_dtype,
        )
    if plan.combine is None:
        out, lse = outputs[plan.regions[0].node]
        return (out, lse) if return_lse else out
    env = plan.combine_inputs(outputs)
    dtype = next(iter(env.values())).dtype
    combined = evaluate(plan.combine, env, tensors, float_dtype=torch.float64).to(dtype)
    return combined


def attention(
    region: AttentionRegion,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tensors: dict[str, Tensor],
    *,
    scale: float | None,
    q_offset: int,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One attention node: returns (o in q's dtype, lse in float32 or None)."""
    dtype = compute_dtype or torch.promote_types(q.dtype, torch.float32)
    B, Hq, Lq, D = q.shape
    Lkv = k.shape[2]
    norm = region.normalizer
    qc, kc, vc = q.to(dtype), expand_kv(k, Hq).to(dtype), expand_kv(v, Hq).to(dtype)
    grid = index_grid(B, Hq, Lq, Lkv, q_offset, q.device)
    ctx = {n: (t.to(dtype) if t.is_floating_point() else t) for n, t in tensors.items()}

    keep = torch.ones(B, Hq, Lq, Lkv, dtype=torch.bool, device=q.device)
    if region.mask is not None:
        keep = keep & evaluate(region.mask, grid, ctx, dtype)
    if isinstance(region.routing, nodes.TopKBlocksRoute):
        keep = keep & topk_blocks_selection(region.routing, region.routing_causal, q, k, q_offset)

    if isinstance(norm, nodes.LinearNorm):
        weights = _linear_weights(norm, qc, kc, keep, grid, ctx, dtype)
        lse = None
    else:
        scale = 1.0 / math.sqrt(D) if scale is None else scale
        if region.score_scale is not None:  # simplify folded a constant factor into q's scale
            scale = scale * region.score_scale
        raw = scale * (qc @ kc.transpose(-1, -2))
        s = raw if region.score is None else evaluate(region.score, {**grid, "score": raw}, ctx, dtype)
        if region.row_shift is not None:  # simplify dropped these row-only terms; restore them
            s = s + evaluate(region.row_shift, grid, ctx, dtype)
        s = torch.broadcast_to(s, keep.shape)
        keep = keep & (s != float("-inf"))
        weights, lse = normalize_scores(norm, s, keep, ctx, Lkv, dtype)
    out = weights @ vc
    if isinstance(region.routing, nodes.TopKHeadsRoute):
        out = out * topk_heads_weights(region.routing, ctx[region.routing.router.name]).to(dtype)
    return out.to(q.dtype), (lse.float() if lse is not None else None)


def _linear_weights(
    norm: nodes.LinearNorm, q: Tensor, k: Tensor, keep: Tensor, grid: dict[str, Tensor],
    ctx: dict[str, Tensor], dtype: torch.dtype,
) -> Tensor:
    """a_ij = phi(q_i).phi(k_j) * decay_h ** (q_idx - kv_idx), masked, optionally normalised."""
    a = feature_map(norm.feature_map, q, ctx) @ feature_map(norm.feature_map, k, ctx).transpose(-1, -2)
    if norm.decay is not None:
        distance = (grid["q_idx"] - grid["kv_idx"]).clamp_min(0).to(dtype)
        decay = ctx[norm.decay.name].view(1, -1, 1, 1)
        a = a * decay**distance
    a = torch.where(keep, a, 0.0)
    return divide_rows(a) if norm.normalize else a


def topk_blocks_selection(route: nodes.TopKBlocksRoute, causal: bool, q: Tensor, k: Tensor, q_offset: int) -> Tensor:
    """MoBA's token-level selection ``[B, Hq, Lq, Lkv]`` (SEMANTICS.md, TopKBlocks)."""
    B, Hq, Lq, _ = q.shape
    Lkv, block = k.shape[2], route.block
    n_blocks = -(-Lkv // block)
    if route.k > n_blocks:
        raise ValueError(f"TopKBlocks(k={route.k}) exceeds the {n_blocks} key blocks of Lkv={Lkv}, block={block}")
    kf = expand_kv(k, Hq).double()
    q_idx = torch.arange(Lq, device=q.device) + q_offset
    block_of_key = torch.arange(Lkv, device=q.device) // block
    counts = torch.bincount(block_of_key, minlength=n_blocks).double()
    key_means = torch.zeros(B, Hq, n_blocks, kf.shape[-1], dtype=torch.float64, device=q.device)
    key_means.index_add_(2, block_of_key, kf)
    key_means = key_means / counts.view(1, 1, -1, 1)
    queries = q.double()
    if route.per == "query_block":
        group = q_idx // block
        _, inverse = torch.unique(group, return_inverse=True)
        n_groups = int(inverse.max()) + 1 if Lq else 0
        sums = torch.zeros(B, Hq, n_groups, q.shape[-1], dtype=torch.float64, device=q.device)
        sums.index_add_(2, inverse, queries)
        sizes = torch.bincount(inverse).double().view(1, 1, -1, 1)
        queries = (sums / sizes)[:, :, inverse]
    gate = queries @ key_means.transpose(-1, -2)  # [B, Hq, Lq, n_blocks]
    block_idx = torch.arange(n_blocks, device=q.device)
    eligible = torch.ones(Lq, n_blocks, dtype=torch.bool, device=q.device)
    if causal:
        own = (q_idx // block).view(-1, 1)
        eligible = block_idx.view(1, -1) * block <= q_idx.view(-1, 1)
        gate = torch.where(block_idx.view(1, -1) == own, float("inf"), gate)
    gate = torch.where(eligible, gate, float("-inf"))
    order = torch.sort(gate, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n_blocks, device=q.device).expand_as(order).contiguous())
    selected = (rank < route.k) & eligible
    return selected[..., block_of_key]


def topk_heads_weights(route: nodes.TopKHeadsRoute, router: Tensor) -> Tensor:
    """MoH: softmax over each token's top-k head logits; 0 for heads not kept. [B, Hq, Lq, 1]."""
    order = torch.sort(router, dim=-1, descending=True, stable=True).indices[..., : route.k]
    kept = torch.zeros_like(router, dtype=torch.bool).scatter_(-1, order, True)
    weights = torch.softmax(torch.where(kept, router, float("-inf")), dim=-1)
    return torch.where(kept, weights, 0.0).permute(0, 2, 1).unsqueeze(-1)


def recompute_input(t: Tensor, create: bool, wanted: bool = True) -> Tensor:
    """An input of a backward that recomputes through this backend: with ``create_graph=True``
    (``create``) a view of a saved tensor that requires grad, so that the gradients found are
    differentiable again (a view per role: ``q = k = v = x`` gives each its own share); otherwise
    a fresh leaf that requires grad when ``wanted``."""
    if create and t.requires_grad:
        return t.view_as(t)
    return t.detach().requires_grad_(wanted)
