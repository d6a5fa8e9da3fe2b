"""Split-KV decoding on the TVM kernel: key chunks folded into the batch, one call, then a merge.

With few queries (``Lq <= 16``) over a long cache the tiled kernel has only ``B * Hq`` tasks,
each walking the whole cache with mostly empty query rows. Here (SEMANTICS.md, softmax sinks;
``attncc.passes.decode.split_kv_attention`` is the algorithm):

- the keys are cut into ``S`` chunks of ``C`` keys (``C`` a multiple of ``block_n``) and the
  chunks are folded into the batch of the queries, so the one kernel call runs every chunk in
  parallel; the kernel reads chunk ``b % S`` of sequence ``b // S`` from K and V in place
  (``KernelShape.kv_chunks``): a copy of the cache into ``[B * S, Hkv, C, D]`` cost more than
  the kernel itself (a decode step over 4096 keys, 8 kv heads of 128: 14 of 23 ms);
- the query heads that share a kv head are folded into the rows, ``Q -> [B * S, Hkv, G * Lq, D]``
  (GQA with ``G = Hq / Hkv``), so a decode step fills a query tile instead of one row of it;
- the region's expressions see the real indices: ``b -> b // S``, ``h -> h * G + r // Lq``,
  ``q_idx -> r % Lq + q_offset``, ``kv_idx -> kv_idx + C * (b % S)`` with ``r`` the kernel's row,
  and keys past the cache end (the last chunk's padding) are masked;
- partials: softmax without its sink returns ``(o_s, lse_s)``; the merge rescales them to the
  largest lse and adds ``exp(sink_h)`` once. Sigmoid and unnormalised pointwise maps sum. A
  normalised pointwise map would need the kernel's row sums, which it does not return, so
  those regions keep the plain kernel.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from attncc.codegen.tvm import rows as rw
from attncc.codegen.tvm.memo import by_value
from attncc.ir import expr as ex
from attncc.ir import nodes
from attncc.passes.plan import AttentionRegion, KernelPlan
from attncc.passes.sparsify import FULL, PARTIAL

Tensor = torch.Tensor


def num_splits(plan: KernelPlan, region: AttentionRegion, q: Tensor, k: Tensor) -> int:
    """How many key chunks this call is split into; 1 when the plan's rule or the normalizer says no."""
    rule = plan.decode_split
    B, Hq, Lq, _ = q.shape
    Lkv = k.shape[2]
    if rule is None or plan.strategy != "tiled" or not rule.applies(Lq, Lkv):
        return 1
    if region.gate is not None or region.head_select is not None or region.routing is not None:
        return 1
    norm = region.normalizer
    mergeable = isinstance(norm, nodes.SoftmaxNorm | nodes.SigmoidNorm) or (
        isinstance(norm, nodes.PointwiseNorm) and not norm.normalize)
    return rule.num_splits(B, Hq, Lkv) if mergeable else 1


def split_config(config: dict, rows: int) -> dict:
    """The smallest query tile (of 8, 16, 32, 64) that holds the folded rows."""
    block_m = next((m for m in (8, 16, 32, 64) if rows <= m), 64)
    return rw.fit_config(config, block_m=block_m)


@by_value(maxsize=64)
def _kernel_region(region: AttentionRegion) -> AttentionRegion:
    """Real indices from the kernel's (META: S, C, G, Lq, q_offset, Lkv); the sink is left out.
    Memoized per region (rebuilding its expressions took about 0.4 ms a step)."""
    S, C, G, Lq, q_offset, Lkv = (rw.meta_at(i) for i in range(6))
    b, h, r, kv = ex.var("b"), ex.var("h"), ex.var("q_idx"), ex.var("kv_idx")
    # NOTE: padding rows (r >= G * Lq) are clamped to the last real row: loads indexed by h stay in bounds.
    r = ex.binary("minimum", r, rw.op("sub", ex.binary("mul", G, Lq), 1))
    real_kv = rw.op("add", kv, ex.binary("mul", C, rw.op("mod", b, S)))
    mapping = {
        "b": rw.op("floordiv", b, S),
        "h": rw.op("add", ex.binary("mul", h, G), rw.op("floordiv", r, Lq)),
        "q_idx": rw.op("add", rw.op("mod", r, Lq), q_offset),
        "kv_idx": real_kv,
    }
    norm = region.normalizer
    if isinstance(norm, nodes.SoftmaxNorm) and norm.sink is not None:
        norm = dataclasses.replace(norm, sink=None)
    return rw.reindex(region, mapping, extra_mask=rw.op("lt", real_kv, Lkv), normalizer=norm)


def run_split_kv(region: AttentionRegion, q: Tensor, k: Tensor, v: Tensor, tensors: dict[str, Tensor],
                 config: dict, splits: int, *, scale: float, q_offset: int) -> tuple[Tensor, Tensor | None]:
    """(o, lse or None) of one region by ``splits`` key chunks merged as SEMANTICS.md says."""
    B, Hq, Lq, D = q.shape
    Hkv, Lkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    G, R = Hq // Hkv, (Hq // Hkv) * Lq
    config = split_config(config, R)
    block_m, block_n = config["block_m"], config["block_n"]
    per_split = -(-Lkv // splits)
    C = -(-per_split // block_n) * block_n
    S = -(-Lkv // C)
    tiles_per_chunk = C // block_n

    qf = q.float().reshape(B, 1, Hkv, R, D).expand(B, S, Hkv, R, D).reshape(B * S, Hkv, R, D)

    classes = rw.row_classes(region, B, Hq, Lq, Lkv, block_n, q_offset, tensors).clone()
    if Lkv % block_n:  # the kernel masks keys past the chunk, not past the cache: the mask must
        last = classes[..., Lkv // block_n]
        classes[..., Lkv // block_n] = torch.where(last == FULL, PARTIAL, last)
    folded = torch.zeros(B, Hkv, R, S * tiles_per_chunk, dtype=torch.int8)
    folded[..., : classes.shape[-1]] = classes.reshape(B, Hkv, R, -1)
    folded = folded.view(B, Hkv, R, S, tiles_per_chunk).permute(0, 3, 1, 2, 4).reshape(B * S, Hkv, R, -1)
    tables = rw.tile_tables(folded, block_m)

    side = {**tensors, rw.META.name: rw.meta(S, C, G, Lq, q_offset, Lkv)}
    o, lse = rw.launch_region(_kernel_region(region), qf, k, v, side, tables, config, scale=scale, q_offset=0,
                              total_lkv=Lkv, kv_chunk=C)
    o = o.view(B, S, Hq, Lq, Dv)
    lse = lse.view(B, S, Hq, Lq)
    norm = region.normalizer
    if not isinstance(norm, nodes.SoftmaxNorm):
        return o.sum(1).to(q.dtype), None
    sink = None if norm.sink is None else tensors[norm.sink.name].float().view(1, Hq, 1)
    out, merged = merge_partials(o, lse, sink)
    return out.to(q.dtype), merged


def merge_partials(o: Tensor, lse: Tensor, sink: Tensor | None, dim: int = 1) -> tuple[Tensor, Tensor]:
    """Merge partials over ``dim``: ``o [..., Dv]`` and ``lse`` (``o`` without its last axis), e.g.
    ``[B, S, H, Lq]``; ``sink`` broadcasts against ``lse`` without ``dim`` and enters once."""
    top = lse.amax(dim=dim)
    if sink is not None:
        top = torch.maximum(top, sink)
    safe = torch.where(top > -math.inf, top, 0.0)
    weight = torch.exp(lse - safe.unsqueeze(dim))  # exp(-inf) = 0: empty partials weigh nothing
    total = weight.sum(dim=dim)
    if sink is not None:
        total = total + torch.exp(sink - safe)
    alive = total > 0
    denom = torch.where(alive, total, 1.0)
    summed = (weight.unsqueeze(-1) * o).sum(dim=dim)
    out = torch.where(alive.unsqueeze(-1), summed / denom.unsqueeze(-1), 0.0)
    merged = torch.where(alive, safe + torch.log(denom), -math.inf)
    return out, merged
