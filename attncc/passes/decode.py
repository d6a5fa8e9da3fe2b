"""Specialize decoding: few queries over a long cache split the keys and merge by log-sum-exp.

With ``Lq <= 16`` a tiled kernel has ``B * Hq`` programs, too few to fill a GPU while each
walks the whole cache; cutting the keys into ``n`` splits gives ``n`` times the programs.
Each split returns a partial ``(m, l, o)`` (row max, sum of ``exp(s - m)``, unnormalised
output); the merge rescales them to the global max, adds a softmax sink once, and divides.
``Lq`` is known only at run time, so the pass records a ``DecodeSplit`` rule on the plan
and ``split_kv_attention`` is the runtime algorithm (plain torch) backends mirror.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from attncc.ir import nodes
from attncc.ir.dense import expand_kv, index_grid
from attncc.ir.evaluate import evaluate
from attncc.ir.graph import AttentionGraph
from attncc.passes.manager import PassResult, add_note, attach, facts_of
from attncc.passes.plan import AttentionRegion, DecodeSplit, KernelPlan

Tensor = torch.Tensor

SPLITTABLE = (nodes.SoftmaxNorm, nodes.SigmoidNorm, nodes.PointwiseNorm)


def _splittable(graph: AttentionGraph, attention: str) -> bool:
    operands = graph.operands(attention)
    norm = graph.payload(operands["normalizer"])
    route = graph.payload(operands["routing"]) if "routing" in operands else None
    return isinstance(norm, SPLITTABLE) and not isinstance(route, nodes.TopKBlocksRoute)


def decode(graph: AttentionGraph) -> PassResult:
    """Attach ``decode_split`` when every region's normalizer merges across key splits."""
    attentions = graph.attention_nodes()
    if "decode_split" in facts_of(graph) or not all(_splittable(graph, a) for a in attentions):
        return PassResult(graph, False)
    rule = DecodeSplit()
    out = attach(graph, decode_split=rule)
    out = add_note(out, f"decode: Lq <= {rule.max_lq} and Lkv >= {rule.min_lkv} run split-KV "
                        f"(chunks >= {rule.min_chunk} keys) with a log-sum-exp merge")
    return PassResult(out, True)


def specialize(plan: KernelPlan, B: int, Hq: int, Lq: int, Lkv: int) -> KernelPlan:
    """The plan for one call's shape: strategy "split_kv" when its ``decode_split`` rule applies."""
    rule = plan.decode_split
    if rule is None or plan.strategy != "tiled" or not rule.applies(Lq, Lkv):
        return plan
    splits = rule.num_splits(B, Hq, Lkv)
    if splits < 2:
        return plan
    note = f"decode: Lq={Lq}, Lkv={Lkv}: {splits} key splits merged by log-sum-exp"
    return dataclasses.replace(plan, strategy="split_kv", notes=(*plan.notes, note))


# ---- runtime ---------------------------------------------------------------------------


def _split_scores(
    region: AttentionRegion, q: Tensor, k: Tensor, start: int, tensors: dict[str, Tensor], scale: float,
    q_offset: int, dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """(scores, keep) for keys ``start .. start + k.shape[2]`` of one split."""
    B, Hq, Lq, _ = q.shape
    grid = index_grid(B, Hq, Lq, k.shape[2], q_offset, q.device)
    grid["kv_idx"] = grid["kv_idx"] + start
    raw = scale * (q @ k.transpose(-1, -2))
    s = raw if region.score is None else evaluate(region.score, {**grid, "score": raw}, tensors, dtype)
    s = torch.broadcast_to(s, (B, Hq, Lq, k.shape[2]))
    keep = s != -math.inf
    if region.mask is not None:
        keep = keep & evaluate(region.mask, grid, tensors, dtype)
    return s, keep


def split_kv_attention(
    region: AttentionRegion,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tensors: dict[str, Tensor],
    *,
    scale: float | None = None,
    q_offset: int = 0,
    num_splits: int = 4,
) -> tuple[Tensor, Tensor | None]:
    """One region by key splits: ``(o, lse)`` (lse for softmax, else None), as SEMANTICS.md."""
    norm = region.normalizer
    if not isinstance(norm, SPLITTABLE) or isinstance(region.routing, nodes.TopKBlocksRoute):
        raise ValueError(f"split-KV needs a softmax, sigmoid or pointwise region without TopKBlocks, got {region}")
    dtype = torch.promote_types(q.dtype, torch.float32)
    B, Hq, Lq, D = q.shape
    Lkv = k.shape[2]
    scale = (1.0 / math.sqrt(D) if scale is None else scale) * (region.score_scale or 1.0)
    ctx = {n: (t.to(dtype) if t.is_floating_point() else t) for n, t in tensors.items()}
    qc, kc, vc = q.to(dtype), expand_kv(k, Hq).to(dtype), expand_kv(v, Hq).to(dtype)
    size = -(-Lkv // max(1, num_splits))
    partials = []
    for start in range(0, Lkv, size):
        s, keep = _split_scores(region, qc, kc[:, :, start : start + size], start, ctx, scale, q_offset, dtype)
        partials.append(_partial(norm, s, keep, vc[:, :, start : start + size], ctx, Lkv))
    shift = None
    if region.row_shift is not None:
        grid = index_grid(B, Hq, Lq, 1, q_offset, q.device)
        shift = torch.broadcast_to(evaluate(region.row_shift, grid, ctx, dtype), (B, Hq, Lq, 1))
    out, lse = _merge(norm, partials, ctx, shift)
    if region.head_select is not None or isinstance(region.routing, nodes.TopKHeadsRoute):
        from attncc.passes.lower_routing import head_selection, head_weights_dense

        route = region.routing
        heads, weights = head_selection(ctx[route.router.name], route.k)
        out = out * head_weights_dense(heads, weights, Hq)
    return out.to(q.dtype), (lse.float() if lse is not None else None)


def _partial(
    norm: object, s: Tensor, keep: Tensor, v: Tensor, ctx: dict[str, Tensor], Lkv: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(m, l, o)`` of one split: softmax keeps a row max; the others use m = 0."""
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    if isinstance(norm, nodes.SoftmaxNorm):
        masked = torch.where(keep, s, -math.inf)
        m = masked.amax(dim=-1, keepdim=True)
        p = torch.where(keep, torch.exp(masked - torch.where(torch.isfinite(m), m, zero)), zero)
        return m, p.sum(-1, keepdim=True), p @ v
    safe = torch.where(keep, s, zero)
    if isinstance(norm, nodes.SigmoidNorm):
        bias = -math.log(Lkv) if norm.bias is None else norm.bias
        p = torch.where(keep, torch.sigmoid(safe + bias), zero)
    else:
        p = torch.where(keep, evaluate(norm.phi, {"score": safe}, ctx, s.dtype), zero)
    return torch.zeros_like(s[..., :1]), p.sum(-1, keepdim=True), p @ v


def _merge(
    norm: object, partials: list[tuple[Tensor, Tensor, Tensor]], ctx: dict[str, Tensor], shift: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Rescale every partial to the global row max, add the sink once, divide (softmax/normalised)."""
    m = torch.cat([p[0] for p in partials], dim=-1)  # [B, H, Lq, n]
    l_all = torch.cat([p[1] for p in partials], dim=-1)
    o_all = torch.stack([p[2] for p in partials], dim=-1)  # [B, H, Lq, Dv, n]
    if not isinstance(norm, nodes.SoftmaxNorm):
        num, den = o_all.sum(-1), l_all.sum(-1, keepdim=True)
        if isinstance(norm, nodes.PointwiseNorm) and norm.normalize:
            nonzero = den != 0
            return torch.where(nonzero, num / torch.where(nonzero, den, 1.0), 0.0), None
        return num, None
    if norm.sink is not None:
        sink = ctx[norm.sink.name].view(1, -1, 1, 1).expand(*m.shape[:3], 1)
        m = torch.cat([m, sink], dim=-1)
        l_all = torch.cat([l_all, torch.ones_like(sink)], dim=-1)
    top = m.amax(dim=-1, keepdim=True)
    safe_top = torch.where(torch.isfinite(top), top, 0.0)
    factor = torch.where(torch.isfinite(m), torch.exp(m - safe_top), 0.0)
    total = (l_all * factor).sum(-1, keepdim=True)
    o_factor = factor[..., : o_all.shape[-1]].unsqueeze(-2)
    nonzero = total > 0
    out = torch.where(nonzero, (o_all * o_factor).sum(-1) / torch.where(nonzero, total, 1.0), 0.0)
    lse = torch.where(nonzero, safe_top + torch.log(torch.where(nonzero, total, 1.0)), -math.inf).squeeze(-1)
    if shift is not None:
        lse = lse + shift.squeeze(-1)
        out = torch.where(shift == -math.inf, 0.0, out)
    return out, lse
