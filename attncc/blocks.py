"""``attncc.block_map``: the proven tile classes of a variant's mask, for inspection.

The map comes from the sparsify pass (``attncc.passes.sparsify``): 0 EMPTY, 1 PARTIAL,
2 FULL per (q tile, kv tile), per batch / head only when the mask reads ``b`` / ``h``.
"""

from __future__ import annotations

from typing import Any

import torch

from attncc.ir.expr import Expr
from attncc.passes.sparsify import MaskSparsity, analyze_region


def _sparsity(var: Any, region: int) -> MaskSparsity:
    plan = getattr(var, "plan", None)
    if plan is None:
        raise TypeError(f"block_map: var must be an attncc variant (from @attncc.variant), got {type(var).__name__}")
    if not 0 <= region < len(plan.regions):
        raise ValueError(f"block_map: region must be in [0, {len(plan.regions)}), got {region}")
    found = plan.regions[region]
    return found.sparsity if found.sparsity is not None else analyze_region(found)


def _axis_size(mask: Expr, axis: str, tensors: dict[str, torch.Tensor]) -> int | None:
    """The size of a captured tensor's dimension indexed by ``axis`` (``lengths[b]`` gives B)."""
    for node in mask.walk():
        if node.op != "load":
            continue
        for dim, index in enumerate(node.src[1:]):
            if index.op == "var" and index.arg == axis and node.src[0].arg.name in tensors:
                return int(tensors[node.src[0].arg.name].shape[dim])
    return None


def block_map(
    var: Any,
    Lq: int,
    Lkv: int,
    tile: tuple[int, int] = (128, 128),
    q_offset: int = 0,
    *,
    B: int | None = None,
    H: int | None = None,
    region: int = 0,
) -> torch.Tensor:
    """int8 ``[B', H', nq, nkv]`` tile classes of ``var``'s mask (0 empty, 1 partial, 2 full).

    ``B'`` (``H'``) is 1 when the mask reads neither ``b`` (``h``); otherwise it is ``B`` (``H``),
    taken from the captured tensor the mask indexes with ``b`` (``h``) unless given. The
    captured tensors are the ones the variant closed over. ``q_offset`` shifts query rows.
    """
    sp = _sparsity(var, region)
    tensors = dict(getattr(var, "tensors", {}) or {})
    sizes = {}
    for axis, given, reads in (("b", B, sp.reads_b), ("h", H, sp.reads_h)):
        size = given if given is not None else 1
        if given is None and reads:
            size = _axis_size(sp.mask, axis, tensors)
            if size is None:
                name = axis.upper()
                raise ValueError(f"block_map: the mask reads {axis} directly; pass {name}= (the number of "
                                 f"{'batches' if axis == 'b' else 'query heads'})")
        sizes[axis] = size
    return sp.block_map(sizes["b"], sizes["h"], Lq, Lkv, tile, q_offset, tensors)


__all__ = ["block_map"]
