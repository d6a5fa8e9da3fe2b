"""The query heads of a GQA group packed into the rows of one tile, for decoding.

Why: with a few query rows per head (decoding, ``Lq <= 16``) most rows of a ``BM``-row tile
do not exist, yet cost the same work, and every query head of a group reads the same K/V
tiles again. Packing the group's ``G`` heads into the rows (row ``r`` is query ``r // G`` of
head ``hk * G + r % G``) fills the tile and reads each K/V tile once per group, as
FlashDecoding does. The kernel side is ``KernelShape.group``; this module decides when and
builds the block tables of the packed rows: the union over the group's heads of their
tiles (FULL only where FULL for every head, EMPTY only where EMPTY for every head).
"""

from __future__ import annotations

import torch

from attncc.passes.plan import AttentionRegion
from attncc.passes.sparsify import EMPTY, FULL, PARTIAL, BlockTables, tables_from_map

MAX_ROWS_PER_HEAD = 16


def packed_group(Hq: int, Hkv: int, Lq: int, block_m: int) -> int:
    """``G = Hq // Hkv`` when packing pays (a few query rows, whole heads per tile), else 1."""
    group = Hq // Hkv
    if group <= 1 or Lq > MAX_ROWS_PER_HEAD or block_m % group:
        return 1
    return group


def packed_config(config: dict, group: int, Lq: int) -> dict:
    """``config`` with the smallest tile of 8 to 64 rows that holds the packed rows (``group * Lq``,
    or as many whole queries as fit), and a register block that fits it."""
    from attncc.codegen.tvm.rows import fit_config

    block_m = next((m for m in (8, 16, 32, 64) if m >= group * Lq and m % group == 0), 64)
    return fit_config(config, block_m=block_m)


def packed_tables(
    region: AttentionRegion, B: int, Hq: int, Hkv: int, Lq: int, Lkv: int, tile: tuple[int, int],
    q_offset: int, tensors: dict[str, torch.Tensor],
) -> BlockTables:
    """Block tables ``[B', Hkv or 1, nq]`` over packed rows: ``tile[0] // G`` queries per tile."""
    group = Hq // Hkv
    block_m, block_n = tile
    rows = block_m // group
    sparsity = region.sparsity
    if sparsity is None:
        everything = FULL if region.mask is None and region.score is None else PARTIAL
        block_map = torch.full((1, 1, -(-Lq // rows), -(-Lkv // block_n)), everything, dtype=torch.int8)
    else:
        block_map = sparsity.block_map(B, Hq, Lq, Lkv, (rows, block_n), q_offset, tensors)
    if block_map.shape[1] > 1:
        Bp, _, nq, nk = block_map.shape
        heads = block_map.view(Bp, Hkv, group, nq, nk)
        every_full = (heads == FULL).all(2)
        every_empty = (heads == EMPTY).all(2)
        block_map = torch.where(every_full, FULL, torch.where(every_empty, EMPTY, PARTIAL)).to(torch.int8)
    return tables_from_map(block_map)
