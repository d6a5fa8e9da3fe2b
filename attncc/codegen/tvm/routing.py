"""TopKBlocks (MoBA) on the TVM kernel: only tiles that meet the selected key blocks are visited.

The gate runs first (``attncc.passes.lower_routing.block_index_table``, in float64 so that the
selection is the reference's). Its per-row selection becomes tile classes at the kernel's
tiles: a tile none of whose rows selected any of its key blocks is EMPTY (never listed), a
tile every row of which selected all its key blocks keeps the mask's class, and a mixed tile
is PARTIAL with the per-row selection entering the mask as a load from a bitmap
``sel[b, h, row, kv_idx // block]`` (a flat captured tensor). ``block_n`` is chosen to divide
the routing block so that most tiles lie in one key block.

Per-token routing with a normalizer whose partials merge goes to ``routing_tokens.py`` instead:
the union of 64 rows' selections is most of the tiles, so there the queries are grouped by the
block they selected. This tile path serves ``per="query_block"`` (rows of a query block share
their selection) and the normalizers that cannot merge partials.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attncc.codegen.tvm import routing_tokens
from attncc.codegen.tvm import rows as rw
from attncc.codegen.tvm.autograd import routed_backward
from attncc.codegen.tvm.space import PARAMS
from attncc.ir import expr as ex
from attncc.passes.lower_routing import block_index_table
from attncc.passes.plan import AttentionRegion
from attncc.passes.sparsify import EMPTY, FULL, PARTIAL, BlockTables, tables_from_classes

Tensor = torch.Tensor
SELECTION = f"{ex.INTERNAL_PREFIX}block_selection"


@dataclass(frozen=True, eq=False)
class BlockRouting:
    """What one call visits: tile classes ``[B, Hq, nq, nkv]``, the tables made of them, and the
    per-row selection ``[B, Hq, rows, nb]`` when some visited tile mixes selected and not."""

    classes: Tensor
    tables: BlockTables
    selection: Tensor | None
    first_row: int  # q_idx // block of row 0 (per="query_block"), else q_offset


def routing_config(config: dict, block: int, per: str) -> dict:
    """Tiles that divide the routing block: whole tiles fall in or out of one key block."""
    block_n = max((n for n in PARAMS["block_n"] if block % n == 0), default=None)
    block_m = None
    if per == "query_block" and block % config["block_m"]:
        block_m = max((m for m in PARAMS["block_m"] if block % m == 0), default=None)
    return rw.fit_config(config, block_m=block_m, block_n=block_n)


def route_blocks(region: AttentionRegion, q: Tensor, k: Tensor, tensors: dict[str, Tensor], q_offset: int,
                 block_m: int, block_n: int) -> BlockRouting:
    gate = region.gate
    B, Hq, Lq, _ = q.shape
    Lkv = k.shape[2]
    table = block_index_table(q, k, block=gate.block, k_top=gate.k, per=gate.per, causal=gate.causal,
                              q_offset=q_offset, dtype=torch.float64)
    n_blocks = -(-Lkv // gate.block)
    rows = table.shape[2]
    selection = torch.zeros(B, Hq, rows, n_blocks + 1, dtype=torch.bool)
    selection.scatter_(-1, torch.where(table < 0, n_blocks, table).long(), True)
    selection = selection[..., :n_blocks]
    first_row = q_offset
    by_token = selection
    if gate.per != "token":
        first_row = q_offset // gate.block
        by_token = selection[:, :, (torch.arange(Lq) + q_offset) // gate.block - first_row]
    nq, nkv = -(-Lq // block_m), -(-Lkv // block_n)
    padded_any = torch.zeros(B, Hq, nq * block_m, n_blocks, dtype=torch.bool)
    padded_all = torch.ones(B, Hq, nq * block_m, n_blocks, dtype=torch.bool)
    padded_any[:, :, :Lq] = by_token
    padded_all[:, :, :Lq] = by_token
    any_rows = padded_any.view(B, Hq, nq, block_m, n_blocks).any(dim=3)
    all_rows = padded_all.view(B, Hq, nq, block_m, n_blocks).all(dim=3)
    # key blocks each kv tile touches (real keys only)
    lo = torch.arange(nkv) * block_n // gate.block
    hi = (torch.clamp((torch.arange(nkv) + 1) * block_n, max=Lkv) - 1) // gate.block
    span = int((hi - lo).max()) + 1
    touched = torch.minimum(lo.view(-1, 1) + torch.arange(span), hi.view(-1, 1))  # [nkv, span]
    any_tile = any_rows[..., touched].any(dim=-1)
    all_tile = all_rows[..., touched].all(dim=-1)
    mask_classes = _mask_classes(region, B, Hq, Lq, Lkv, (block_m, block_n), q_offset, tensors)
    mixed = torch.minimum(mask_classes, torch.tensor(PARTIAL, dtype=torch.int8))
    classes = torch.where(any_tile, torch.where(all_tile, mask_classes, mixed), EMPTY).to(torch.int8)
    needs_selection = bool(((mask_classes > EMPTY) & any_tile & ~all_tile).any())
    return BlockRouting(classes, tables_from_classes(classes), selection if needs_selection else None, first_row)


def _mask_classes(region: AttentionRegion, B: int, Hq: int, Lq: int, Lkv: int, tile: tuple[int, int],
                  q_offset: int, tensors: dict[str, Tensor]) -> Tensor:
    sp = region.sparsity
    if sp is not None:
        classes = sp.block_map(B, Hq, Lq, Lkv, tile, q_offset, tensors)
    else:
        everything = FULL if region.mask is None and region.score is None else PARTIAL
        classes = torch.full((1, 1, -(-Lq // tile[0]), -(-Lkv // tile[1])), everything, dtype=torch.int8)
    return classes.expand(B, Hq, *classes.shape[2:])


def selection_region(region: AttentionRegion, routing: BlockRouting, Lq: int, Lkv: int, block_m: int,
                     block_n: int, q_offset: int) -> tuple[AttentionRegion, dict[str, Tensor]]:
    """The region with ``sel[b, h, row(q_idx), kv_idx // block]`` and-ed into its mask, and the
    side tensors it reads. Padding rows and keys of the kernel's last tiles index in bounds."""
    gate = region.gate
    sel = routing.selection
    B, Hq, _, n_blocks = sel.shape
    nq, nkv = -(-Lq // block_m), -(-Lkv // block_n)
    if gate.per == "token":
        row_count = nq * block_m
        row = rw.op("sub", ex.var("q_idx"), rw.meta_at(3))
    else:
        row_count = (q_offset + nq * block_m - 1) // gate.block - routing.first_row + 1
        row = rw.op("sub", rw.op("floordiv", ex.var("q_idx"), gate.block), rw.meta_at(3))
    block_count = max(n_blocks, -(-nkv * block_n // gate.block))
    padded = torch.zeros(B, Hq, row_count, block_count, dtype=torch.bool)
    padded[:, :, : sel.shape[2], :n_blocks] = sel
    spec = rw.flat_spec(SELECTION, padded.numel(), "bool")
    index = rw.flat_index(
        (ex.var("b"), ex.var("h"), row, rw.op("floordiv", ex.var("kv_idx"), gate.block)),
        (rw.meta_at(0), rw.meta_at(1), rw.meta_at(2), rw.meta_at(4)),
    )
    selected = ex.load(ex.input_ref(spec), (index,))
    side = {SELECTION: rw.flat_tensor(spec, padded), rw.META.name: rw.meta(B, Hq, row_count, routing.first_row,
                                                                            block_count)}
    return rw.reindex(region, {}, extra_mask=selected), side


def run_topk_blocks(region: AttentionRegion, q: Tensor, k: Tensor, v: Tensor, tensors: dict[str, Tensor],
                    config: dict, *, scale: float, q_offset: int) -> tuple[Tensor, Tensor]:
    """(o, lse) of a TopKBlocks region: only selected key blocks are visited."""
    config = routing_config(config, region.gate.block, region.gate.per)
    if routing_tokens.applies(region, config["block_n"]):
        return routing_tokens.run_topk_blocks_by_token(region, q, k, v, tensors, config, scale=scale,
                                                       q_offset=q_offset)
    kernel_region, live, tables = tile_routing(region, q, k, tensors, config, q_offset)
    return rw.launch_region(kernel_region, q, k, v, live, tables, config, scale=scale, q_offset=q_offset,
                            total_lkv=k.shape[2])


def tile_routing(region: AttentionRegion, q: Tensor, k: Tensor, tensors: dict[str, Tensor], config: dict,
                 q_offset: int) -> tuple[AttentionRegion, dict[str, Tensor], BlockTables]:
    """The tile path's plain region (the selection in its mask when a tile mixes selected rows and
    not), the tensors it reads and its tables, at ``config``'s tiles (``routing_config``)."""
    block_m, block_n = config["block_m"], config["block_n"]
    routing = route_blocks(region, q, k, tensors, q_offset, block_m, block_n)
    if routing.selection is None:
        return rw.reindex(region, {}), tensors, routing.tables
    kernel_region, side = selection_region(region, routing, q.shape[2], k.shape[2], block_m, block_n, q_offset)
    return kernel_region, {**tensors, **side}, routing.tables


def run_topk_blocks_with_grad(region: AttentionRegion, q: Tensor, k: Tensor, v: Tensor, tensors: dict[str, Tensor],
                              config: dict, *, scale: float, q_offset: int) -> tuple[Tensor, Tensor] | str:
    """(o, lse) of a TopKBlocks region whose gradients come from the generated backward kernels,
    or why they cannot (the caller falls back to the reference).

    The selection is a discrete choice with no gradient (the reference's mask of selected
    blocks is a constant of the call): gradients are attention's under that mask. Forward and
    backward visit the same tiles: the tile path's, here for ``per="token"`` too (the grouped
    path of ``routing_tokens.py`` has no backward), at tiles the backward kernels accept."""
    config = routing_config(config, region.gate.block, region.gate.per)
    kernel_region, live, tables = tile_routing(region, q.detach(), k.detach(), tensors, config, q_offset)

    def forward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return rw.launch_region(kernel_region, q, k, v, live, tables, config, scale=scale, q_offset=q_offset,
                                total_lkv=k.shape[2])

    # NOTE: the reference recomputes the routed region itself: where no selection mask is needed, only
    # the tiles say which blocks the kernel region attends
    return routed_backward(kernel_region, forward, q, k, v, live, tables, config, scale=scale, q_offset=q_offset,
                           reference=(region, tensors))
