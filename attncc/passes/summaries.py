"""Run-time per-tile summaries of captured tensors, for masks that read them (O(L) work).

A load such as ``doc[q_idx]`` over q tile ``i`` takes the values of ``doc`` on the tile's
positions; its abstract value is the interval ``[min, max]`` of that slice. Computed for
all tiles at once with one ``narrow``/``unflatten``/``amin``/``amax``, it costs one pass
over the tensor. Equality of two such loads is then FULL when both tiles hold one and the
same id, EMPTY when the intervals are disjoint (``intervals.compare``), which is exactly
right for sorted document ids. PyTorch's own interval analysis gives up on these loads.

Each index of a load is summarized by what it is:

- a constant: that slice of the tensor;
- ``b + c`` or ``h + c``: one map row per batch / head (the ``B'``/``H'`` axes);
- ``q_idx + c`` or ``kv_idx + c``: the per-tile ``[min, max]`` over the tile's positions;
- anything else: the whole dimension's ``[min, max]`` (sound, less precise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attncc.ir.expr import Expr
from attncc.passes.intervals import UNBOUNDED, BoolVal, IntVal, TileEnv, abstract_eval, range_val

Tensor = torch.Tensor
_AXIS = {"b": 0, "h": 1, "q_idx": 2, "kv_idx": 3}


@dataclass(frozen=True)
class Geometry:
    """Where the tiles are: ``q_idx`` of row ``i`` is ``q_offset + i``."""

    Lq: int
    Lkv: int
    bq: int
    bk: int
    q_offset: int
    Bp: int
    Hp: int

    @property
    def nq(self) -> int:
        return -(-self.Lq // self.bq)

    @property
    def nkv(self) -> int:
        return -(-self.Lkv // self.bk)


def tile_minmax(x: Tensor, dim: int, start: int, length: int, tile: int) -> tuple[Tensor, Tensor]:
    """Per-tile min and max of ``x[start : start + length]`` along ``dim``, tiles of ``tile``."""
    seg = x.narrow(dim, start, length)
    count = -(-length // tile)
    pad = count * tile - length
    if pad:
        edge = seg.narrow(dim, length - 1, 1)
        shape = list(seg.shape)
        shape[dim] = pad
        seg = torch.cat([seg, edge.expand(shape)], dim)  # repeating the edge changes no min or max
    seg = seg.unflatten(dim, (count, tile))
    return seg.amin(dim + 1), seg.amax(dim + 1)


def _axis_offset(index: IntVal) -> tuple[str, int] | None:
    """``(axis, c)`` when the index is exactly ``axis + c`` for an index variable."""
    form = index.affine
    if form is None or len(form.coef) != 1 or form.coef[0][1] != 1 or form.const != int(form.const):
        return None
    return form.coef[0][0], int(form.const)


def summarize_load(node: Expr, indices: list[Any], tensors: dict[str, Tensor], geo: Geometry) -> Any:
    """The abstract value of ``node`` (a load) over every tile; see the module docstring."""
    spec = node.src[0].arg
    if node.shape != ():
        return UNBOUNDED  # a partial load (a row of a tensor) is only meaningful under another load
    if spec.name not in tensors:
        raise ValueError(f"tensors: the mask reads captured tensor {spec.name!r}, which was not passed")
    x = tensors[spec.name].detach()
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    lo, hi = x, x
    axes: list[int] = []  # the map axis of every dimension still present in lo/hi
    for value in indices:
        lo, hi, axis = _reduce_dim(lo, hi, len(axes), value, axes, geo, spec.name)
        if axis is not None:
            axes.append(axis)
    lo4, hi4 = _to_map_layout(lo, axes), _to_map_layout(hi, axes)
    if node.dtype == "bool":
        return BoolVal(lo4 != 0, hi4 == 0)
    return range_val(lo4.double(), hi4.double())


def _reduce_dim(
    lo: Tensor, hi: Tensor, dim: int, index: Any, axes: list[int], geo: Geometry, name: str
) -> tuple[Tensor, Tensor, int | None]:
    size = lo.shape[dim]
    affine = index.affine if isinstance(index, IntVal) else None
    if affine is not None and not affine.coef and affine.const == int(affine.const) and -size <= affine.const < size:
        c = int(affine.const)
        return lo.select(dim, c), hi.select(dim, c), None
    form = _axis_offset(index) if isinstance(index, IntVal) else None
    if form is not None and _AXIS[form[0]] not in axes:
        axis, c = form
        start, length, tile = {
            "b": (c, geo.Bp, 1), "h": (c, geo.Hp, 1),
            "q_idx": (geo.q_offset + c, geo.Lq, geo.bq), "kv_idx": (c, geo.Lkv, geo.bk),
        }[axis]
        if start >= 0 and start + length <= size and length > 0:
            new_lo, _ = tile_minmax(lo, dim, start, length, tile)
            _, new_hi = tile_minmax(hi, dim, start, length, tile)
            return new_lo, new_hi, _AXIS[axis]
        if start >= 0:
            raise ValueError(
                f"captured tensor {name!r} has {size} entries along dimension {dim} but the mask indexes it "
                f"with {axis}{'+' + str(c) if c else ''} up to {start + length - 1}"
            )
    return lo.amin(dim), hi.amax(dim), None


def _to_map_layout(x: Tensor, axes: list[int]) -> Tensor:
    """Arrange the kept dimensions on the map's ``[B', H', nq, nkv]`` axes."""
    order = sorted(range(len(axes)), key=lambda i: axes[i])
    x = x.permute(order) if len(order) > 1 else x
    shape = [1, 1, 1, 1]
    for i in order:
        shape[axes[i]] = x.shape[order.index(i)]
    return x.reshape(shape)


def _side(e: Expr) -> str | None:
    """``"q"`` for a load indexed by ``q_idx`` (not ``kv_idx``), ``"kv"`` for the converse."""
    if e.op != "load" or e.dtype == "bool":
        return None
    names = e.free_vars()
    if "q_idx" in names and "kv_idx" not in names:
        return "q"
    if "kv_idx" in names and "q_idx" not in names:
        return "kv"
    return None


def equality_band(
    term: Expr, env: TileEnv, geo: Geometry, tensors: dict[str, Tensor]
) -> tuple[Tensor, Tensor] | None:
    """Per q tile, the kv tiles ``[lo, hi)`` a conjunct ``t[q] == t'[kv]`` can keep (run time),
    as ``[B', H', nq]`` tensors.

    kv tile ``j`` can match q tile ``i`` only if their ``[min, max]`` intervals meet. When the
    kv tiles' mins and maxes are both non-decreasing (sorted document ids), those tiles form
    one range, found by binary search: O(nq log nkv) instead of touching every tile pair.
    None when the conjunct is not such an equality or the summaries are not sorted.
    """
    if term.op != "eq" or {_side(term.src[0]), _side(term.src[1])} != {"q", "kv"}:
        return None
    q_load, kv_load = term.src if _side(term.src[0]) == "q" else term.src[::-1]
    q_val, kv_val = abstract_eval(q_load, env), abstract_eval(kv_load, env)  # env.load caches summaries
    if not isinstance(q_val, IntVal) or not isinstance(kv_val, IntVal):
        return None
    shape = (geo.Bp, geo.Hp)
    q_lo = torch.as_tensor(q_val.lo_value()).expand(*shape, geo.nq, 1)[..., 0].contiguous()
    q_hi = torch.as_tensor(q_val.hi_value()).expand(*shape, geo.nq, 1)[..., 0].contiguous()
    kv_lo = torch.as_tensor(kv_val.lo_value()).expand(*shape, 1, geo.nkv)[..., 0, :].contiguous()
    kv_hi = torch.as_tensor(kv_val.hi_value()).expand(*shape, 1, geo.nkv)[..., 0, :].contiguous()
    if geo.nkv > 1 and not bool(((kv_lo[..., 1:] >= kv_lo[..., :-1]) & (kv_hi[..., 1:] >= kv_hi[..., :-1])).all()):
        return None
    first = torch.searchsorted(kv_hi, q_lo, side="left")  # first kv tile whose max reaches the q tile's min
    stop = torch.searchsorted(kv_lo, q_hi, side="right")  # past the last kv tile whose min is <= its max
    return first, stop
