"""Sparsify: prove which (q tile, kv tile) pairs are EMPTY, PARTIAL or FULL from the mask.

An analysis pass: it attaches to every attention node a frozen ``MaskSparsity`` (the fact
``sparsity``, read into ``AttentionRegion.sparsity`` by lowering). The object holds what can
be proven without sizes, and answers with sizes at run time:

- ``block_map(B, H, Lq, Lkv, tile, q_offset, tensors)``: int8 ``[B', H', nq, nkv]``,
  0 EMPTY (never visited), 1 PARTIAL (mask evaluated per element), 2 FULL (no mask). It is an
  abstract interpretation of the mask ``Expr`` over the tiles' index ranges
  (``attncc.passes.intervals``) with per-tile ``[min, max]`` summaries of captured tensors
  (``attncc.passes.summaries``): work and memory O(number of tiles) plus O(L) for summaries.
- ``kv_range(...)``: per q tile the half-open range of kv tiles that may be non-empty and the
  sub-range proven FULL, O(number of q tiles), from the structural bounds the mask puts on
  ``kv_idx`` (causal, windows, prefix, chunks, neighborhoods). Kernels of structured masks
  iterate that range and need no block table.
- ``block_tables(...)``: the map as per-q-tile lists of partial and full kv tiles.

Classification is conservative: EMPTY only when every pair is masked, FULL only when every
pair is kept. ``B'`` (``H'``) is ``B`` (``H``) when the mask reads ``b`` (``h``), else 1.

A score of ``-inf`` counts as masked (SEMANTICS.md). The score's top-level
``where(c, x, -inf)`` conditions join the mask (``c`` must hold), so such tiles can be EMPTY;
the rest of the score can produce ``-inf`` when it holds a non-finite constant, ``log``/``log2``
(of 0), a division or power by a non-constant, or a load of a float tensor: then no tile is
FULL, except that float tensors are checked at run time (FULL survives when none holds
``-inf`` or NaN). Overflow of ``exp`` to ``+inf`` is undefined behaviour and not considered.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from attncc.ir import expr as ex
from attncc.ir.expr import Expr
from attncc.ir.graph import AttentionGraph
from attncc.passes.causality import conjuncts
from attncc.passes.intervals import (
    TileEnv,
    abstract_eval,
    as_bool,
    as_int,
    classify,
    floor_div,
    restrict_kv,
    seed_kv_only,
)
from attncc.passes.manager import PassResult, attach
from attncc.passes.summaries import Geometry, equality_band, summarize_load

Tensor = torch.Tensor
EMPTY, PARTIAL, FULL = 0, 1, 2
_FLIP = {"lt": "ge", "le": "gt", "gt": "le", "ge": "lt", "eq": "ne", "ne": "eq"}
_MIRROR = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}


# ---- structural kv bounds --------------------------------------------------------------


@dataclass(frozen=True)
class KvBounds:
    """Per query, the keys a mask allows, as expressions over ``q_idx`` (and ``b``, ``h``).

    ``hull = (lo, hi)`` contains every allowed ``kv_idx`` (inclusive; ``None`` unbounded).
    ``inner`` is an interval of keys that are all allowed, or ``None`` when none is proven.
    """

    hull: tuple[Expr | None, Expr | None] = (None, None)
    inner: tuple[Expr | None, Expr | None] | None = None

    @property
    def bounded(self) -> bool:
        return self.hull != (None, None)

    @property
    def exact(self) -> bool:
        """The allowed set is exactly the interval ``hull`` (then ``inner == hull``)."""
        return self.inner == self.hull


UNBOUNDED_KV = KvBounds()
ALL_KV = KvBounds((None, None), (None, None))
NO_KV = KvBounds((ex.const(1), ex.const(0)), None)


def _max(a: Expr | None, b: Expr | None, unbounded_wins: bool) -> Expr | None:
    if a is None or b is None:
        return None if unbounded_wins else (b if a is None else a)
    return a if a == b else ex.binary("maximum", a, b)


def _min(a: Expr | None, b: Expr | None, unbounded_wins: bool) -> Expr | None:
    if a is None or b is None:
        return None if unbounded_wins else (b if a is None else a)
    return a if a == b else ex.binary("minimum", a, b)


def _intersect(a: tuple | None, b: tuple | None) -> tuple | None:
    if a is None or b is None:
        return None
    return (_max(a[0], b[0], False), _min(a[1], b[1], False))


def bounds_and(a: KvBounds, b: KvBounds) -> KvBounds:
    return KvBounds(_intersect(a.hull, b.hull), _intersect(a.inner, b.inner))


def bounds_or(a: KvBounds, b: KvBounds) -> KvBounds:
    """Union: the hull of both hulls; the inner interval is a union only when the two share an end."""
    hull = (_min(a.hull[0], b.hull[0], True), _max(a.hull[1], b.hull[1], True))
    if a.inner is None or b.inner is None:
        inner = a.inner if b.inner is None else b.inner
    elif a.inner[0] == b.inner[0]:
        inner = (a.inner[0], _max(a.inner[1], b.inner[1], True))
    elif a.inner[1] == b.inner[1]:
        inner = (_min(a.inner[0], b.inner[0], True), a.inner[1])
    else:
        inner = a.inner
    return KvBounds(hull, inner)


def _add(a: Expr, b: Expr) -> Expr:
    if a.op == "const" and b.op == "const" and a.dtype == b.dtype == "int":
        return ex.const(a.arg + b.arg)
    if b.op == "const" and b.arg == 0:
        return a
    if a.op == "const" and a.arg == 0:
        return b
    return ex.binary("add", a, b)


def _neg(a: Expr) -> Expr:
    if a.op == "const":
        return ex.const(-a.arg)
    if a.op == "sub":
        return _sub(a.src[1], a.src[0])
    return a.src[0] if a.op == "neg" else ex.unary("neg", a)


def _sub(a: Expr, b: Expr) -> Expr:
    if a.op == "const" and b.op == "const" and a.dtype == b.dtype == "int":
        return ex.const(a.arg - b.arg)
    if b.op == "const" and b.arg == 0:
        return a
    if a.op == "const" and a.arg == 0:
        return _neg(b)
    return ex.binary("sub", a, b)


def _linear_in_kv(e: Expr) -> tuple[int, tuple[str, int] | None, Expr] | None:
    """``e = coef * T + rest`` with ``T`` one of ``kv_idx`` or ``kv_idx // c``; ``rest`` free of kv."""
    if "kv_idx" not in e.free_vars():
        return 0, None, e
    if e.dtype != "int":
        return None
    if e.op == "var":
        return 1, ("kv", 1), ex.const(0)
    if e.op in ("floordiv", "rshift") and e.src[0].op == "var" and e.src[1].op == "const":
        c = e.src[1].arg if e.op == "floordiv" else 2 ** e.src[1].arg
        return (1, ("div", int(c)), ex.const(0)) if isinstance(c, int) and c > 0 else None
    if e.op == "neg":
        inner = _linear_in_kv(e.src[0])
        return None if inner is None else (-inner[0], inner[1], _neg(inner[2]))
    if e.op in ("add", "sub"):
        left, right = _linear_in_kv(e.src[0]), _linear_in_kv(e.src[1])
        if left is None or right is None or (left[1] and right[1] and left[1] != right[1]):
            return None
        sign = 1 if e.op == "add" else -1
        rest = _add(left[2], right[2]) if e.op == "add" else _sub(left[2], right[2])
        return left[0] + sign * right[0], left[1] or right[1], rest
    if e.op == "mul":
        for x, c in ((e.src[0], e.src[1]), (e.src[1], e.src[0])):
            if c.op == "const" and c.dtype == "int":
                inner = _linear_in_kv(x)
                return None if inner is None else (inner[0] * c.arg, inner[1], ex.binary("mul", inner[2], c))
    return None


def _atom_bounds(op: str, left: Expr, right: Expr) -> KvBounds:
    """``left op right`` solved for ``kv_idx`` when it is ``+-T + rest`` (see ``_linear_in_kv``)."""
    a, b = _linear_in_kv(left), _linear_in_kv(right)
    if a is None or b is None or (a[1] and b[1] and a[1] != b[1]):
        return UNBOUNDED_KV
    coef, term = a[0] - b[0], a[1] or b[1]
    if term is None or coef not in (1, -1) or op == "ne":
        return UNBOUNDED_KV
    g = _sub(b[2], a[2])  # coef * T op g
    if coef == -1:
        op, g = _MIRROR[op], _neg(g)
    if g.dtype != "int":
        return UNBOUNDED_KV
    one = ex.const(1)
    lo = {"gt": _add(g, one), "ge": g, "eq": g}.get(op)
    hi = {"lt": _sub(g, one), "le": g, "eq": g}.get(op)
    if term[0] == "div":  # kv // c >= lo  <=>  kv >= c * lo;  kv // c <= hi  <=>  kv <= c * hi + c - 1
        c = ex.const(term[1])
        lo = None if lo is None else ex.binary("mul", lo, c)
        hi = None if hi is None else _add(ex.binary("mul", hi, c), ex.const(term[1] - 1))
    return KvBounds((lo, hi), (lo, hi))


def kv_bounds(e: Expr, negate: bool = False) -> KvBounds:
    """Structural bounds of a boolean mask on ``kv_idx``; ``~`` is pushed inward (De Morgan)."""
    if e.dtype != "bool":
        return UNBOUNDED_KV
    if e.op == "const":
        return ALL_KV if bool(e.arg) != negate else NO_KV
    if e.op in ("not", "invert"):
        return kv_bounds(e.src[0], not negate)
    if e.op in ("and", "or"):
        left, right = kv_bounds(e.src[0], negate), kv_bounds(e.src[1], negate)
        conjunction = (e.op == "and") != negate
        return bounds_and(left, right) if conjunction else bounds_or(left, right)
    if e.op in _FLIP and e.src[0].dtype != "bool" and e.src[1].dtype != "bool":
        return _atom_bounds(_FLIP[e.op] if negate else e.op, e.src[0], e.src[1])
    return UNBOUNDED_KV


# ---- what the score contributes -----------------------------------------------------------


def _is_neg_inf(e: Expr) -> bool:
    return e.op == "const" and e.dtype == "float" and e.arg == -math.inf


def score_mask_split(score: Expr | None) -> tuple[Expr | None, Expr | None]:
    """Peel top-level ``where(c, x, -inf)`` / ``where(c, -inf, x)``: ``(condition to keep, rest)``."""
    cond: Expr | None = None
    while score is not None and score.op == "where" and "score" not in score.src[0].free_vars():
        c, x, y = score.src
        if _is_neg_inf(y):
            keep, score = c, x
        elif _is_neg_inf(x):
            keep, score = ex.unary("not", c), y
        else:
            break
        cond = keep if cond is None else ex.binary("and", cond, keep)
    return cond, score


def score_neg_inf_sources(score: Expr | None) -> tuple[bool, tuple[str, ...]]:
    """``(may produce -inf whatever the inputs, float tensors to check at run time)``."""
    if score is None:
        return False, ()
    static, tensors = False, []
    for node in score.walk():
        if node.op == "const" and node.dtype == "float" and not math.isfinite(node.arg):
            static = True
        elif node.op in ("log", "log2"):
            static = True
        elif node.op in ("truediv", "pow") and node.src[1].op != "const":
            static = True
        elif node.op == "load" and node.dtype == "float":
            tensors.append(node.src[0].arg.name)
    return static, tuple(dict.fromkeys(tensors))


# ---- the analysis result -------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BlockTables:
    """Per q tile, the kv tiles to visit: PARTIAL ones (mask evaluated) and FULL ones (no mask).

    int32 ``partial_count [B',H',nq]``, ``partial_index [B',H',nq,max_p]``, ``full_count``,
    ``full_index [B',H',nq,max_f]``; indices ascending, padded with 0 (``max_* >= 1``).
    ``b_broadcast`` / ``h_broadcast``: ``B'`` / ``H'`` is 1 and applies to every batch / head.
    """

    partial_count: Tensor
    partial_index: Tensor
    full_count: Tensor
    full_index: Tensor
    b_broadcast: bool
    h_broadcast: bool


@dataclass(frozen=True, eq=False)
class KvRange:
    """Per q tile, kv tiles ``[lo, hi)`` may be non-empty (none outside); ``[full_lo, full_hi)`` are FULL.

    int32 ``[B', H', nq]``; ``full_lo == full_hi`` when no FULL sub-range is proven.
    """

    lo: Tensor
    hi: Tensor
    full_lo: Tensor
    full_hi: Tensor


@dataclass(frozen=True)
class MaskSparsity:
    """What ``sparsify`` proved about one attention's mask (hashable; sizes come at run time)."""

    mask: Expr | None  # the mask, joined with the score's -inf conditions; None keeps every key
    bounds: KvBounds  # structural bounds on kv_idx per query
    score_masks: bool = False  # the score may produce -inf anywhere: no tile is FULL
    score_tensors: tuple[str, ...] = ()  # float tensors the score loads: FULL needs them free of -inf

    def __str__(self) -> str:
        def show(e: Expr | None, default: str) -> str:
            return default if e is None else str(e)

        parts = [f"mask={show(self.mask, 'none')}"]
        if self.bounds.bounded:
            lo, hi = self.bounds.hull
            parts.append(f"kv_idx in [{show(lo, '0')}, {show(hi, 'Lkv-1')}]{' exactly' if self.structured else ''}")
        if self.score_masks:
            parts.append("score may be -inf: no FULL tiles")
        elif self.score_tensors:
            parts.append(f"FULL needs no -inf in {', '.join(self.score_tensors)}")
        return f"MaskSparsity({'; '.join(parts)})"

    @property
    def reads_b(self) -> bool:
        return self.mask is not None and "b" in _free_vars(self.mask)

    @property
    def reads_h(self) -> bool:
        return self.mask is not None and "h" in _free_vars(self.mask)

    @property
    def structured(self) -> bool:
        """The mask is exactly an interval of keys per query: ``kv_range`` is all a kernel needs."""
        return self.bounds.bounded and self.bounds.exact

    def map_shape(self, B: int, H: int) -> tuple[int, int]:
        return (B if self.reads_b else 1, H if self.reads_h else 1)

    def block_map(
        self, B: int, H: int, Lq: int, Lkv: int, tile: tuple[int, int] = (128, 128), q_offset: int = 0,
        tensors: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """int8 ``[B', H', nq, nkv]``: 0 EMPTY, 1 PARTIAL, 2 FULL (see the module docstring)."""
        classes, band = self._classes(B, H, Lq, Lkv, tile, q_offset, tensors)
        return classes.clone() if band is None else _scatter_band(classes, band, -(-Lkv // tile[1]))

    def _classes(
        self, B: int, H: int, Lq: int, Lkv: int, tile: Any, q_offset: int, tensors: dict[str, Tensor] | None
    ) -> tuple[Tensor, Tensor | None]:
        geo = _geometry(self, B, H, Lq, Lkv, tile, q_offset)
        if not self.cacheable:
            return _classes(self, geo, tensors or {})
        return _cached_classes(self, geo)  # NOTE: cached results are shared: callers never write to them

    @property
    def cacheable(self) -> bool:
        """Tile classes follow from the geometry alone: no mask (every key kept), or one that reads
        no captured tensor."""
        return not ((self.mask is not None and _reads_tensors(self.mask)) or self.score_tensors)

    def block_tables(
        self, B: int, H: int, Lq: int, Lkv: int, tile: tuple[int, int] = (128, 128), q_offset: int = 0,
        tensors: dict[str, Tensor] | None = None,
    ) -> BlockTables:
        if not self.cacheable:
            return _tables_of_tensors(self, _geometry(self, B, H, Lq, Lkv, tile, q_offset), tensors or {})
        tile = tuple(tile) if isinstance(tile, list) else tile
        return _static_tables(self, B, H, Lq, Lkv, tile, q_offset)  # NOTE: shared: callers never write to them

    def kv_range(
        self, B: int, H: int, Lq: int, Lkv: int, tile: tuple[int, int] = (128, 128), q_offset: int = 0,
        tensors: dict[str, Tensor] | None = None,
    ) -> KvRange:
        """O(number of q tiles): the kv tile range per q tile and its proven FULL sub-range."""
        geo = _geometry(self, B, H, Lq, Lkv, tile, q_offset)
        return _kv_range(self, geo, tensors or {})


def analyze(mask: Expr | None, score: Expr | None = None) -> MaskSparsity:
    """The ``MaskSparsity`` of a mask and a score function (either may be None)."""
    keep, rest = score_mask_split(score)
    if keep is not None:
        mask = keep if mask is None else ex.binary("and", mask, keep)
    static, tensors = score_neg_inf_sources(rest)
    bounds = kv_bounds(mask) if mask is not None else ALL_KV
    return MaskSparsity(mask, bounds, static, tensors)


def analyze_region(region: Any) -> MaskSparsity:
    return analyze(region.mask, region.score)


# ---- evaluation ----------------------------------------------------------------------------


def _check_sizes(B: int, H: int, Lq: int, Lkv: int, tile: Any, q_offset: int) -> tuple[int, int]:
    for name, value, minimum in (("B", B, 1), ("H", H, 1), ("Lq", Lq, 1), ("Lkv", Lkv, 1), ("q_offset", q_offset, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if not (isinstance(tile, tuple | list) and len(tile) == 2 and all(isinstance(t, int) and t > 0 for t in tile)):
        raise ValueError(f"tile must be a pair of positive ints (bq, bk), got {tile!r}")
    return int(tile[0]), int(tile[1])


def _geometry(sp: MaskSparsity, B: int, H: int, Lq: int, Lkv: int, tile: Any, q_offset: int) -> Geometry:
    bq, bk = _check_sizes(B, H, Lq, Lkv, tile, q_offset)
    Bp, Hp = sp.map_shape(B, H)
    return Geometry(Lq, Lkv, bq, bk, q_offset, Bp, Hp)


@functools.lru_cache(maxsize=64)
def _tile_bounds(start: int, length: int, tile: int) -> tuple[Tensor, Tensor]:
    """First and last index of every tile (cached: callers never write to them)."""
    lo = torch.arange(0, length, tile, dtype=torch.int64)
    return lo + start, torch.clamp(lo + tile, max=length) - 1 + start


@functools.lru_cache(maxsize=64)
def _ranges(geo: Geometry) -> dict[str, tuple[Tensor, Tensor]]:
    """float64 ranges of the index variables in map layout (cached: callers never write to them)."""
    q_lo, q_hi = _tile_bounds(geo.q_offset, geo.Lq, geo.bq)
    kv_lo, kv_hi = _tile_bounds(0, geo.Lkv, geo.bk)
    b = torch.arange(geo.Bp, dtype=torch.float64).reshape(-1, 1, 1, 1)
    h = torch.arange(geo.Hp, dtype=torch.float64).reshape(1, -1, 1, 1)
    return {
        "q_idx": (q_lo.reshape(1, 1, -1, 1).double(), q_hi.reshape(1, 1, -1, 1).double()),
        "kv_idx": (kv_lo.reshape(1, 1, 1, -1).double(), kv_hi.reshape(1, 1, 1, -1).double()),
        "b": (b, b), "h": (h, h),
    }


def _env(
    geo: Geometry, tensors: dict[str, Tensor], kv_band: Tensor | None = None, cache: dict | None = None
) -> TileEnv:
    """Index ranges per tile (float64, map layout) and load summaries (shared through ``cache``)."""
    ranges = _ranges(geo)
    band = None if kv_band is None else kv_band.clamp(max=geo.nkv - 1)
    if band is not None:
        kv_lo, kv_hi = (t[0, 0, 0][band].reshape(1, 1, *band.shape) for t in ranges["kv_idx"])
        ranges = {**ranges, "kv_idx": (kv_lo, kv_hi)}
    summaries = {} if cache is None else cache

    def load(node: Expr, indices: list[Any]) -> Any:
        if node not in summaries:  # NOTE: summaries depend on the indices' forms, not on the band
            summaries[node] = summarize_load(node, indices, tensors, geo)
        return summaries[node] if band is None else restrict_kv(summaries[node], band)

    return TileEnv(ranges, load)


def _score_allows_full(sp: MaskSparsity, tensors: dict[str, Tensor]) -> bool:
    if sp.score_masks:
        return False
    for name in sp.score_tensors:
        t = tensors.get(name)
        if t is None or bool(torch.isneginf(t).any()) or bool(torch.isnan(t).any()):
            return False
    return True


def _band(sp: MaskSparsity, geo: Geometry, tensors: dict[str, Tensor], cache: dict) -> Tensor | None:
    """kv tile ids ``[nq, w]`` that may be non-empty (``kv_range``'s hull over every batch and
    head), when that band is at most half the kv tiles; ids past the last kv tile are padding.
    None: evaluate every kv tile."""
    if sp.mask is None:
        return None
    kr = _kv_range(sp, geo, tensors, with_full=False, cache=cache)
    lo, hi = kr.lo.amin(dim=(0, 1)).long(), kr.hi.amax(dim=(0, 1)).long()
    width = int((hi - lo).max().clamp(min=1))
    if width * 2 > geo.nkv:
        return None
    return lo[:, None] + torch.arange(width)


def _classes(sp: MaskSparsity, geo: Geometry, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    """Tile classes ``[B', H', nq, nkv]``, or ``[B', H', nq, w]`` over the kv tiles ``band [nq, w]``."""
    if sp.mask is None:
        classes, band = torch.full((geo.Bp, geo.Hp, geo.nq, geo.nkv), FULL, dtype=torch.int8), None
    else:
        cache: dict = {}
        band = _band(sp, geo, tensors, cache)
        env = _env(geo, tensors, band, cache)
        if band is not None:
            seed_kv_only(sp.mask, _env(geo, tensors, None, cache), env, band.clamp(max=geo.nkv - 1))
        value = as_bool(abstract_eval(sp.mask, env))
        width = geo.nkv if band is None else band.shape[1]
        classes = classify(value, (geo.Bp, geo.Hp, geo.nq, width))
        if band is not None:
            classes.masked_fill_(band >= geo.nkv, EMPTY)
        _refine(sp.mask, geo, classes, band)
    if not _score_allows_full(sp, tensors):
        classes.clamp_(max=PARTIAL)
    return classes, band


# NOTE: refinement evaluates at most this many sub-boxes; beyond it PARTIAL tiles stay PARTIAL (sound).
REFINE_BUDGET = 1 << 21
REFINE_PIECES = 16


@functools.lru_cache(maxsize=256)
def _free_vars(e: Expr) -> frozenset[str]:
    return e.free_vars()


@functools.lru_cache(maxsize=256)
def _reads_tensors(e: Expr) -> bool:
    return bool(e.inputs())


@functools.lru_cache(maxsize=256)
def _divisors(mask: Expr, name: str) -> tuple[int, ...]:
    """Constants ``c > 1`` of ``name // c``, ``name % c`` and ``name >> s`` (``c = 2^s``) in the mask."""
    found = set()
    for node in mask.walk():
        if node.op in ("floordiv", "mod", "rshift") and node.src[0].op == "var" and node.src[0].arg == name:
            c = node.src[1].arg if node.src[1].op == "const" else None
            if isinstance(c, int) and not isinstance(c, bool):
                c = 2**c if node.op == "rshift" and 0 <= c < 62 else c
                if c > 1:
                    found.add(c)
    return tuple(sorted(found))


def _pieces(lo: Tensor, hi: Tensor, plan: tuple[int, int] | None) -> tuple[Tensor, Tensor]:
    """Split every ``[lo, hi]`` at multiples of ``c`` into ``count`` pieces (repeating the last);
    without a plan, each range is its own single piece."""
    if plan is None:
        return lo[..., None], hi[..., None]
    c, count = plan
    k = torch.arange(count)
    base = torch.div(lo, c, rounding_mode="floor")[..., None]
    start = torch.maximum(lo[..., None], (base + k) * c)
    stop = torch.minimum(hi[..., None], (base + k + 1) * c - 1)
    start = torch.minimum(start, hi[..., None])
    return start, torch.maximum(stop, start)


def _split_plan(mask: Expr, name: str, tile: int) -> tuple[int, int] | None:
    for c in _divisors(mask, name):
        count = -(-tile // c) + 1
        if count <= REFINE_PIECES:
            return c, count
    return None


def _crosses(lo: Tensor, hi: Tensor, plan: tuple[int, int] | None) -> Tensor:
    """Which tiles ``[lo, hi]`` contain a multiple of the plan's divisor other than at their start."""
    if plan is None:
        return torch.zeros_like(lo, dtype=torch.bool)
    c = plan[0]
    return torch.div(lo, c, rounding_mode="floor") != torch.div(hi, c, rounding_mode="floor")


def _refine(mask: Expr, geo: Geometry, classes: Tensor, band: Tensor | None) -> None:
    """Re-decide PARTIAL tiles of a mask that splits indices with ``//`` and ``%`` (neighborhoods).

    ``q_idx // W`` and ``q_idx % W`` are not independent over a tile that spans rows, so such a
    tile is cut at multiples of ``W`` into sub-boxes where they are; the tile is FULL (EMPTY)
    when every sub-box is. Only for masks without captured tensors, within ``REFINE_BUDGET``.
    """
    if _reads_tensors(mask):
        return
    q_plan, kv_plan = _split_plan(mask, "q_idx", geo.bq), _split_plan(mask, "kv_idx", geo.bk)
    if q_plan is None and kv_plan is None:
        return
    q_lo, q_hi = _tile_bounds(geo.q_offset, geo.Lq, geo.bq)
    kv_lo, kv_hi = _tile_bounds(0, geo.Lkv, geo.bk)
    q_cross, kv_cross = _crosses(q_lo, q_hi, q_plan), _crosses(kv_lo, kv_hi, kv_plan)
    if not (bool(q_cross.any()) or bool(kv_cross.any())):
        return  # tiles aligned with every divisor: the coarse classes are already exact
    kv_ids = band.clamp(max=geo.nkv - 1) if band is not None else torch.arange(geo.nkv).expand(geo.nq, -1)
    crossing = q_cross[:, None] | kv_cross[kv_ids]
    where = ((classes == PARTIAL) & crossing).nonzero()
    q_n = q_plan[1] if q_plan else 1
    kv_n = kv_plan[1] if kv_plan else 1
    P = where.shape[0]
    if P == 0 or P * q_n * kv_n > REFINE_BUDGET:
        return
    b, h, i, jj = where.unbind(1)
    j = kv_ids[i, jj]
    qs, qe = _pieces(q_lo[i], q_hi[i], q_plan)
    ks, ke = _pieces(kv_lo[j], kv_hi[j], kv_plan)
    ranges = {
        "q_idx": (qs.reshape(P, 1, q_n, 1), qe.reshape(P, 1, q_n, 1)),
        "kv_idx": (ks.reshape(P, 1, 1, kv_n), ke.reshape(P, 1, 1, kv_n)),
        "b": (b.reshape(P, 1, 1, 1), b.reshape(P, 1, 1, 1)),
        "h": (h.reshape(P, 1, 1, 1), h.reshape(P, 1, 1, 1)),
    }
    sub = classify(as_bool(abstract_eval(mask, TileEnv(ranges))), (P, 1, q_n, kv_n)).reshape(P, -1)
    decided = torch.where((sub == FULL).all(1), FULL, torch.where((sub == EMPTY).all(1), EMPTY, PARTIAL))
    classes[b, h, i, jj] = decided.to(torch.int8)


def _scatter_band(classes: Tensor, band: Tensor, nkv: int) -> Tensor:
    """Place band classes in a map of EMPTY tiles; band columns past the last kv tile are dropped."""
    out = torch.zeros((*classes.shape[:-1], nkv + 1), dtype=torch.int8)
    index = torch.where(band < nkv, band, nkv).expand(*classes.shape[:2], *band.shape)
    out.scatter_(3, index, classes)
    return out[..., :nkv]


@functools.lru_cache(maxsize=64)
def _cached_classes(sp: MaskSparsity, geo: Geometry) -> tuple[Tensor, Tensor | None]:
    return _classes(sp, geo, {})


def tensors_key(tensors: dict[str, Tensor]) -> tuple | None:
    """(name, id, version) of each captured tensor, by name: a memo keyed on it misses after an
    in-place write (it bumps ``_version``) or for another tensor (while the entry holds the
    tensors, their ids stay unique). None for an inference tensor: it has no version counter."""
    try:
        return tuple((name, id(tensors[name]), tensors[name]._version) for name in sorted(tensors))
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


_TENSOR_TABLES: dict[tuple, tuple[tuple[Tensor, ...], BlockTables]] = {}
_TENSOR_TABLES_SIZE = 16


def _tables_of_tensors(sp: MaskSparsity, geo: Geometry, tensors: dict[str, Tensor]) -> BlockTables:
    """Tables of a mask that reads captured tensors (document ids), reused while the very same
    tensors are unmodified: FlexAttention users build a ``BlockMask`` once for this reason.

    An entry holds its tensors, so their ids stay unique while it lives; an in-place write
    bumps a tensor's ``_version`` and misses. An inference tensor has no version: built every time.
    """
    names = sorted(tensors)
    versions = tensors_key(tensors)
    if versions is None:
        return tables_from_classes(*_classes(sp, geo, tensors))
    key = (sp, geo, versions)
    found = _TENSOR_TABLES.get(key)
    if found is not None and all(a is tensors[n] for a, n in zip(found[0], names, strict=True)):
        return found[1]
    tables = tables_from_classes(*_classes(sp, geo, tensors))
    if len(_TENSOR_TABLES) >= _TENSOR_TABLES_SIZE:
        _TENSOR_TABLES.pop(next(iter(_TENSOR_TABLES)))
    _TENSOR_TABLES[key] = (tuple(tensors[n] for n in names), tables)
    return tables


@functools.lru_cache(maxsize=64)
def _cached_tables(sp: MaskSparsity, geo: Geometry) -> BlockTables:
    """A static mask's tables, built once per geometry (a kernel call otherwise rebuilds them)."""
    return tables_from_classes(*_cached_classes(sp, geo))


@functools.lru_cache(maxsize=64, typed=True)
def _static_tables(sp: MaskSparsity, B: int, H: int, Lq: int, Lkv: int, tile: Any, q_offset: int) -> BlockTables:
    """``_cached_tables`` memoized on the call's own arguments: every kernel call asks, and
    checking the sizes and building the geometry cost more than the lookup. ``typed``: a bool or
    a float never hits an int's entry, so what ``_check_sizes`` refuses is still refused."""
    return _cached_tables(sp, _geometry(sp, B, H, Lq, Lkv, tile, q_offset))


def _bound_interval(e: Expr | None, env: TileEnv, shape: tuple[int, ...], fallback: float) -> tuple[Tensor, Tensor]:
    if e is None:
        t = torch.full(shape, fallback, dtype=torch.float64)
        return t, t
    value = as_int(abstract_eval(e, env))
    lo = torch.as_tensor(value.lo_value(), dtype=torch.float64).expand(shape)
    hi = torch.as_tensor(value.hi_value(), dtype=torch.float64).expand(shape)
    return lo, hi


def _kv_range(
    sp: MaskSparsity, geo: Geometry, tensors: dict[str, Tensor], with_full: bool = True, cache: dict | None = None
) -> KvRange:
    """The structural hull per q tile, narrowed by the run-time bands of ``t[q] == t[kv]``
    conjuncts (``summaries.equality_band``: sorted document ids), and the proven FULL sub-range."""
    shape = (geo.Bp, geo.Hp, geo.nq, 1)
    env = _env(geo, tensors, None, cache)
    last = float(geo.Lkv - 1)
    lo_min, _ = _bound_interval(sp.bounds.hull[0], env, shape, 0.0)
    _, hi_max = _bound_interval(sp.bounds.hull[1], env, shape, last)
    lo_t = floor_div(lo_min.clamp(min=0.0, max=last + 1), geo.bk)
    hi_t = floor_div(hi_max.clamp(min=-1.0, max=last), geo.bk) + 1
    nonempty = (hi_max >= lo_min) & (hi_max >= 0) & (lo_min <= last)
    for term in conjuncts(sp.mask) if sp.mask is not None else ():
        found = equality_band(term, env, geo, tensors)
        if found is not None:
            lo_t = torch.maximum(lo_t, found[0][..., None].double())
            hi_t = torch.minimum(hi_t, found[1][..., None].double())
            nonempty = nonempty & (hi_t > lo_t)
    lo_t = torch.where(nonempty, lo_t, 0.0)
    hi_t = torch.where(nonempty, hi_t, 0.0)
    full_lo, full_hi = lo_t, lo_t
    inner = sp.bounds.inner
    if with_full and inner is not None and sp.mask is not None and _score_allows_full(sp, tensors):
        _, a = _bound_interval(inner[0], env, shape, 0.0)
        b, _ = _bound_interval(inner[1], env, shape, last)
        first = -floor_div(-a.clamp(min=0.0, max=last + 1), geo.bk)
        stop = torch.where(b >= last, float(geo.nkv), floor_div((b + 1).clamp(min=0.0, max=last + 1), geo.bk))
        full_lo = torch.clamp(torch.maximum(first, lo_t), max=hi_t)
        full_hi = torch.clamp(torch.maximum(torch.minimum(stop, hi_t), full_lo), max=hi_t)
    elif with_full and sp.mask is None and _score_allows_full(sp, tensors):
        full_lo, full_hi = lo_t, hi_t

    def as_int32(t: Tensor) -> Tensor:
        return t.squeeze(-1).to(torch.int32)

    return KvRange(as_int32(lo_t), as_int32(hi_t), as_int32(full_lo), as_int32(full_hi))


# ---- block tables ------------------------------------------------------------------------------


def _compact(selected: Tensor, kv_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Counts and ascending kv tile ids of the selected entries per row, padded with 0 (width >= 1).

    The ids are contiguous: kernels take compact buffers, and tables are cached, so a copy here is
    made once instead of by every launch."""
    count = selected.sum(-1, dtype=torch.int32)
    width = max(1, int(count.max()) if count.numel() else 0)
    slot = torch.where(selected, selected.cumsum(-1, dtype=torch.int32) - 1, width).long()
    out = torch.zeros((*selected.shape[:-1], width + 1), dtype=torch.int32)
    out.scatter_(-1, slot, kv_ids.to(torch.int32).expand_as(selected))  # unselected land in the last slot
    return count, out[..., :width].contiguous()


def tables_from_classes(classes: Tensor, band: Tensor | None = None) -> BlockTables:
    """Block tables from tile classes over all kv tiles (``band`` None) or over ``band [nq, w]``."""
    kv_ids = torch.arange(classes.shape[-1]) if band is None else band
    partial_count, partial_index = _compact(classes == PARTIAL, kv_ids)
    full_count, full_index = _compact(classes == FULL, kv_ids)
    return BlockTables(
        partial_count, partial_index, full_count, full_index,
        b_broadcast=classes.shape[0] == 1, h_broadcast=classes.shape[1] == 1,
    )


def tables_from_map(block_map: Tensor) -> BlockTables:
    """Block tables from an int8 block map ``[B', H', nq, nkv]``."""
    return tables_from_classes(block_map)


def block_tables_for(
    region: Any, B: int, H: int, Lq: int, Lkv: int, tile: tuple[int, int] = (128, 128), q_offset: int = 0,
    tensors: dict[str, Tensor] | None = None,
) -> BlockTables:
    """Block tables of ``region``; without a ``sparsity`` fact every tile is PARTIAL (dense), or
    FULL when the region has neither mask nor score function."""
    sp = getattr(region, "sparsity", None)
    if sp is not None:
        return sp.block_tables(B, H, Lq, Lkv, tile, q_offset, tensors)
    bq, bk = _check_sizes(B, H, Lq, Lkv, tile, q_offset)
    everything = FULL if region.mask is None and region.score is None else PARTIAL
    block_map = torch.full((1, 1, -(-Lq // bq), -(-Lkv // bk)), everything, dtype=torch.int8)
    return tables_from_map(block_map)


# ---- the pass ----------------------------------------------------------------------------------


def sparsify(graph: AttentionGraph) -> PassResult:
    """Attach ``sparsity = MaskSparsity`` to every attention node (an analysis: payloads unchanged)."""
    out = graph
    for node in graph.attention_nodes():
        operands = graph.operands(node)
        mask = graph.payload(operands["mask"]).expr if "mask" in operands else None
        score = graph.payload(operands["score"]).expr if "score" in operands else None
        out = attach(out, node, sparsity=analyze(mask, score))
    return PassResult(out, modified=bool(graph.attention_nodes()))


__all__ = [
    "EMPTY", "FULL", "PARTIAL", "BlockTables", "KvBounds", "KvRange", "MaskSparsity", "analyze", "analyze_region",
    "block_tables_for", "kv_bounds", "sparsify", "tables_from_map",
]

