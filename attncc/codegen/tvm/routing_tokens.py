"""TopKBlocks per token on the TVM kernel: queries grouped by the key block they selected.

With ``per="token"`` the rows of one query tile select different key blocks, so a tile
classification (``routing.py``) must visit the union of their selections: with 64 rows that is
most of the causal triangle, and the sparsity does not pay. Here the work is exactly the
selected (query, key block) pairs, as MoBA computes it (Lu et al. 2025, a varlen attention per
block and a merge):

- per ``(b, h)`` the selected pairs are sorted by key block ``J``; each block's queries form a
  group of the kernel's rows, padded to whole query tiles, so every tile serves one block and its
  block table lists only the kv tiles of that block (``q_idx`` is read from a side table of
  real indices, ``rows.gathered_rows_region``; the mask's classes are the real rows');
- each pair yields a partial ``(o, lse)``; a query's ``k`` partials are merged by log-sum-exp,
  adding a softmax sink once (``merge_rows``). Sigmoid and unnormalised pointwise
  maps sum their partials; other normalizers use ``routing.py``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from attncc.codegen.tvm import rows as rw
from attncc.ir import nodes
from attncc.passes.lower_routing import block_index_table
from attncc.passes.plan import AttentionRegion
from attncc.passes.sparsify import EMPTY, tables_from_classes

Tensor = torch.Tensor


def applies(region: AttentionRegion, block_n: int) -> bool:
    """Per-token routing whose partials merge, with kv tiles inside one key block."""
    norm = region.normalizer
    mergeable = isinstance(norm, nodes.SoftmaxNorm | nodes.SigmoidNorm) or (
        isinstance(norm, nodes.PointwiseNorm) and not norm.normalize)
    return region.gate.per == "token" and mergeable and region.gate.block % block_n == 0


def group_block_m(pairs: int, n_blocks: int) -> int:
    """The largest query tile whose padding (at most one tile per block) stays under a quarter."""
    return next((m for m in (64, 32) if n_blocks * m * 4 <= pairs), 16)


def group_rows(table: Tensor, n_blocks: int, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """From ``table [B, Hq, Lq, k]``: per packed row its token and block, ``[B, Hq, R]`` each
    (token -1 on padding rows), and per tile its block ``[B, Hq, R / block_m]`` (-1: padding only)."""
    B, Hq, Lq, k_top = table.shape
    picks = table.long().masked_fill(table < 0, n_blocks).transpose(2, 3)  # [B, Hq, k, Lq]
    member = torch.zeros(B, Hq, n_blocks + 1, Lq, dtype=torch.bool)
    member.scatter_(2, picks, torch.ones(B, Hq, k_top, Lq, dtype=torch.bool))
    member = member[:, :, :n_blocks]
    counts = member.sum(-1)
    b, h, block, i = torch.nonzero(member, as_tuple=True)  # ordered by (b, h, block, token): no sort
    padded = -(-counts // block_m) * block_m
    starts = torch.cumsum(padded, -1) - padded  # first row of each block's group
    group_first = torch.cumsum(counts.flatten(), 0) - counts.flatten()  # first pair of each group
    flat_group = (b * Hq + h) * n_blocks + block
    rank = torch.arange(b.numel()) - group_first[flat_group]
    row = starts[b, h, block] + rank
    R = max(block_m, int(padded.sum(-1).max()))
    token = torch.full((B, Hq, R), -1, dtype=torch.int64)
    row_block = torch.full((B, Hq, R), -1, dtype=torch.int64)
    token[b, h, row], row_block[b, h, row] = i, block
    tile_block = torch.full((B, Hq, R // block_m), -1, dtype=torch.int64)
    tile_block[b, h, row // block_m] = block
    return token, row_block, tile_block


def run_topk_blocks_by_token(region: AttentionRegion, q: Tensor, k: Tensor, v: Tensor, tensors: dict[str, Tensor],
                             config: dict, *, scale: float, q_offset: int) -> tuple[Tensor, Tensor | None]:
    gate = region.gate
    B, Hq, Lq, D = q.shape
    Lkv, Dv = k.shape[2], v.shape[3]
    block_n = config["block_n"]
    n_blocks, per_block = -(-Lkv // gate.block), gate.block // block_n
    nkv = -(-Lkv // block_n)
    table = block_index_table(q, k, block=gate.block, k_top=gate.k, per="token", causal=gate.causal,
                              q_offset=q_offset, dtype=torch.float64)
    config = rw.fit_config(config, block_m=group_block_m(Lq * gate.k, n_blocks))
    block_m = config["block_m"]
    token, row_block, tile_block = group_rows(table, n_blocks, block_m)
    valid = token >= 0
    safe_token = token.clamp(min=0)

    # tables: each tile lists the kv tiles of its block, classed by the mask on its real rows
    classes = rw.row_classes(region, B, Hq, Lq, Lkv, block_n, q_offset, tensors)
    kv_tile = (row_block.clamp(min=0) * per_block).unsqueeze(-1) + torch.arange(per_block)  # [B, Hq, R, pb]
    at = safe_token.unsqueeze(-1) * nkv + kv_tile.clamp(max=nkv - 1)
    row_cls = torch.gather(classes.reshape(B, Hq, Lq * nkv), 2, at.flatten(2)).view(at.shape)
    row_cls = torch.where(kv_tile < nkv, row_cls, torch.tensor(EMPTY, dtype=torch.int8))
    row_cls = torch.where(valid.unsqueeze(-1), row_cls, torch.tensor(-1, dtype=torch.int8))
    tile_cls = rw.tile_classes(row_cls, block_m)
    band = (tile_block.clamp(min=0) * per_block).unsqueeze(-1) + torch.arange(per_block)
    tile_cls = torch.where(band < nkv, tile_cls, torch.tensor(EMPTY, dtype=torch.int8))
    tables = tables_from_classes(tile_cls, band.clamp(max=nkv - 1))

    heads_base = (torch.arange(B * Hq) * Lq).view(B, Hq, 1)
    qg = q.float().reshape(B * Hq * Lq, D).index_select(0, (heads_base + safe_token).flatten())
    qg = qg.view(*token.shape, D)
    norm = region.normalizer
    partial_norm = dataclasses.replace(norm, sink=None) if isinstance(norm, nodes.SoftmaxNorm) else norm
    kernel_region, side = rw.gathered_rows_region(region, (safe_token + q_offset).to(torch.int32), partial_norm)
    o, lse = rw.launch_region(kernel_region, qg, k, v, {**tensors, **side}, tables, config, scale=scale,
                              q_offset=0, total_lkv=Lkv)

    # merge each token's partials where they lie (no [Lq, k] buffers): padding rows go to a spare row
    target = token.masked_fill(~valid, Lq)
    if not isinstance(norm, nodes.SoftmaxNorm):
        out = torch.zeros(B, Hq, Lq + 1, Dv, dtype=torch.float32)
        out.scatter_add_(2, target.unsqueeze(-1).expand_as(o), o)
        return out[:, :, :Lq].to(q.dtype), None
    sink = None if norm.sink is None else tensors[norm.sink.name].float().view(1, Hq, 1)
    out, merged = merge_rows(o, lse, target, Lq, sink)
    return out.to(q.dtype), merged


def merge_rows(o: Tensor, lse: Tensor, target: Tensor, Lq: int, sink: Tensor | None) -> tuple[Tensor, Tensor]:
    """Log-sum-exp merge of partial rows ``o [B, H, R, Dv]`` / ``lse [B, H, R]`` into the rows
    ``target [B, H, R]`` (``Lq``: discarded) of ``[B, H, Lq]``, the sink added once (as
    ``decode.merge_partials``, with the partials scattered instead of stacked)."""
    B, H, _, Dv = o.shape
    top = torch.full((B, H, Lq + 1), -math.inf).scatter_reduce_(2, target, lse, "amax")[:, :, :Lq]
    if sink is not None:
        top = torch.maximum(top, sink)
    safe = torch.where(top > -math.inf, top, 0.0)
    weight = torch.exp(lse - torch.nn.functional.pad(safe, (0, 1)).gather(2, target))
    total = torch.zeros(B, H, Lq + 1).scatter_add_(2, target, weight)[:, :, :Lq]
    if sink is not None:
        total = total + torch.exp(sink - safe)
    rows = ((torch.arange(B * H) * (Lq + 1)).view(B, H, 1) + target).flatten()
    summed = torch.zeros(B * H * (Lq + 1), Dv).index_add_(0, rows, (o * weight.unsqueeze(-1)).view(-1, Dv))
    summed = summed.view(B, H, Lq + 1, Dv)[:, :, :Lq]
    alive = total > 0
    denom = torch.where(alive, total, 1.0)
    out = torch.where(alive.unsqueeze(-1), summed / denom.unsqueeze(-1), 0.0)
    return out, torch.where(alive, safe + torch.log(denom), -math.inf)
