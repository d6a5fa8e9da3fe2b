"""What a generated kernel's expressions do on one call's ranges, checked before it runs.

Why: a kernel loads ``slopes[h]``, ``docs[kv_idx]`` or ``table[h, q_idx - kv_idx + c]`` straight
from memory. An index past a tensor's end (two slopes for four heads, document ids shorter than
the keys) read neighbouring memory: silent garbage, different in every process. The reference
backend raises ``IndexError`` there, as torch indexing does; so does this check, before launch.
Indices in ``[-n, 0)`` count from the end, as in torch: kernels wrap them (``may_be_negative``
says which index expressions need the wrap, from their form alone). Likewise an integer ``//``
or ``%`` whose divisor can be 0 raises ``ZeroDivisionError`` as torch does: in a kernel it traps
(SIGFPE), which kills the process.

How: each index's and divisor's range over the call's index variables (``b < B``, ``h < Hq``,
``q_offset <= q_idx < q_offset + Lq``, ``kv_idx < Lkv``) by the interval analysis of
``attncc.passes.intervals``, exact for the affine indices these tables take (a divisor whose
range merely contains 0, like ``2 * kv_idx - 5``, is refused too); an index read from another
captured tensor ranges over that tensor's values. Memoized per bucket of query offsets and key
lengths, so that the steps of a decode check once per bucket: the bucket's ranges contain the
call's, so a bucket that passes proves the call; one that fails is decided on the call's exact
ranges.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from attncc.ir.expr import MAX_POSITIONS, Expr, TensorSpec
from attncc.passes import intervals as iv
from attncc.passes.plan import AttentionRegion

BUCKET = 64  # query positions and keys per memoized check (a decode moves both by one a step)
_CHECKED: dict[tuple, tuple[str, tuple[torch.Tensor, ...]]] = {}  # key -> (verdict, the tensors checked)
_CHECKED_KEPT = 256


def region_exprs(region: AttentionRegion) -> tuple[Expr, ...]:
    """The expressions a region's kernels evaluate that may load captured tensors, in the order the
    TVM kernels take their tensors (``kernels.captured_specs``; a linear region's feature map has
    its own kernel, ``linear.linear_specs``)."""
    norm = region.normalizer
    found = [region.score, region.mask, region.row_shift, region.sink_head, getattr(norm, "phi", None)]
    feature = getattr(norm, "feature_map", None)
    found.append(feature if isinstance(feature, Expr) else None)
    return tuple(e for e in found if e is not None)


def head_tables(region: AttentionRegion) -> tuple[TensorSpec, ...]:
    """Per-head tensors the kernels read at ``h`` outside any expression (sinks, decays)."""
    norm = region.normalizer
    return tuple(t for t in (getattr(norm, "sink", None), getattr(norm, "decay", None)) if t is not None)


def check_call(region: AttentionRegion, B: int, Hq: int, Lq: int, Lkv: int, q_offset: int,
                tensors: dict[str, torch.Tensor]) -> None:
    """Raise ``IndexError`` (naming the tensor, its shape and the load) when this call would read
    a captured tensor out of bounds, ``ZeroDivisionError`` when it could divide an integer by 0;
    see the module docstring."""
    if min(B, Hq, Lq, Lkv) <= 0:
        return
    exprs, nested, per_head = _reads_of(region)
    for spec in per_head:
        size = tensors[spec.name].numel()
        if size < Hq:
            raise IndexError(f"captured tensor {spec.name!r} holds {size} per-head values but q has {Hq} heads")
    if max(q_offset + Lq, Lkv) > MAX_POSITIONS:
        raise PositionsBeyondKernels(f"positions up to {max(q_offset + Lq, Lkv)}: the TVM kernels compute index "
                                     f"arithmetic exactly up to {MAX_POSITIONS} positions")
    if not exprs:
        return
    shapes = tuple((name, tuple(t.shape)) for name, t in sorted(tensors.items()))
    try:
        contents = tuple((n, id(t), t._version) for n, t in sorted(tensors.items())) if nested else ()
    except RuntimeError:  # an inference tensor has no version counter: every call checks anew
        contents = (object(),)
    base, top = q_offset - q_offset % BUCKET, -(-Lkv // BUCKET) * BUCKET
    bucket = (region, B, Hq, base, base + BUCKET + Lq, top, shapes, contents)
    if _verdict(bucket) is _PASSED:
        return
    if _verdict(bucket) is None:
        passed = _first_violation(exprs, (B, Hq, base, base + BUCKET + Lq, top), tensors) is None
        _remember(bucket, _PASSED if passed else _FAILED, tensors)
        if passed:
            return
    exact = (region, B, Hq, q_offset, q_offset + Lq, Lkv, shapes, contents)
    if _verdict(exact) is _PASSED:
        return
    violation = _first_violation(exprs, (B, Hq, q_offset, q_offset + Lq, Lkv), tensors)
    if violation is not None:
        raise violation
    _remember(exact, _PASSED, tensors)


# NOTE: an entry holds the captured tensors it was checked with, so that their ids, in its key,
# stay unique while it lives (a freed tensor's id is reused, its version starting at 0 again)
_PASSED, _FAILED = "passed", "failed"  # a bucket that failed goes straight to the exact check


def _verdict(key: tuple) -> str | None:
    found = _CHECKED.get(key)
    return None if found is None else found[0]


def _remember(key: tuple, verdict: str, tensors: dict[str, torch.Tensor]) -> None:
    if len(_CHECKED) >= _CHECKED_KEPT:
        _CHECKED.pop(next(iter(_CHECKED)))
    _CHECKED[key] = (verdict, tuple(tensors.values()))


@functools.lru_cache(maxsize=256)
def _reads_of(region: AttentionRegion) -> tuple[tuple[Expr, ...], bool, tuple[TensorSpec, ...]]:
    """(the region's expressions that load captured tensors or divide integers, whether some index
    or divisor is itself computed from a load: ``table[docs[kv_idx]]``, whose range depends on a
    tensor's contents, which the memo must then key on, ``head_tables``). Memoized: walking the
    expressions cost microseconds of every call."""
    exprs = tuple(e for e in region_exprs(region) if any(_checked(n) for n in e.walk()))
    ranged = [i for e in exprs for n in e.walk() if n.op == "load" for i in n.src[1:]]
    ranged += [n.src[1] for e in exprs for n in e.walk() if divides(n)]
    nested = any(s.op == "load" for i in ranged for s in i.walk())
    return exprs, nested, head_tables(region)


def _first_violation(exprs: tuple[Expr, ...], box: tuple[int, int, int, int, int],
                     tensors: dict[str, torch.Tensor]) -> Exception | None:
    """The error for the first load that can index outside ``[-n, n)``, or division that can
    divide by 0, on the box ``(B, Hq, q_lo, q_hi, Lkv)`` (half-open ranges), or None."""
    B, Hq, q_lo, q_hi, Lkv = box
    ranges = {"b": (0, B - 1), "h": (0, Hq - 1), "q_idx": (q_lo, q_hi - 1), "kv_idx": (0, Lkv - 1)}
    env = iv.TileEnv({v: (torch.tensor(float(lo)), torch.tensor(float(hi))) for v, (lo, hi) in ranges.items()},
                     load=lambda node, _indices: _values_of(node, tensors))
    for expr in exprs:
        for node in (n for n in expr.walk() if divides(n)):
            lo, hi = _bounds(iv.abstract_eval(node.src[1], env))
            if lo <= 0 <= hi and _takes_zero(node.src[1], ranges, tensors):
                return KernelZeroDivisionError(f"{node}: its divisor {node.src[1]} is 0 on this call (it ranges "
                                               f"over [{lo:g}, {hi:g}])")
        for load in (n for n in expr.walk() if n.op == "load"):
            spec, shape = load.src[0].arg, tuple(tensors[load.src[0].arg.name].shape)
            for d, index in enumerate(load.src[1:]):
                lo, hi = _bounds(iv.abstract_eval(index, env))
                n = shape[d] if d < len(shape) else 1
                if (lo < -n or hi >= n) and not _within(index, -n, n - 1, ranges, tensors):
                    return IndexError(f"captured tensor {spec.name!r} of shape {shape} read out of bounds by {load}: "
                                      f"index {d} ranges over [{lo:g}, {hi:g}] on this call, valid is [{-n}, {n - 1}]")
    return None


class PositionsBeyondKernels(NotImplementedError):
    """A call's positions pass what the kernels index exactly: the automatic backend choice runs
    the reference instead (``Program.run``); a requested backend raises it."""


class KernelZeroDivisionError(ZeroDivisionError, RuntimeError):
    """An integer division by 0; also a RuntimeError, as torch raises for integer tensors."""


EXACT_GRID = 1 << 22  # index combinations a divisor is evaluated on exactly when its range holds 0


def _takes_zero(divisor: Expr, ranges: dict[str, tuple[int, int]], tensors: dict[str, torch.Tensor]) -> bool:
    """Whether ``divisor`` is 0 somewhere on the call's ranges: evaluated exactly when its grid is
    small (``2 * kv_idx - 5`` never is), else assumed (its interval holds 0)."""
    values = _exact_values(divisor, ranges, tensors)
    return values is None or bool((values == 0).any())


def _within(index: Expr, lo: int, hi: int, ranges: dict[str, tuple[int, int]],
            tensors: dict[str, torch.Tensor]) -> bool:
    """Whether ``index`` stays in ``[lo, hi]`` on the call's ranges, evaluated exactly when its grid
    is small (intervals lose the correlation in ``q_idx - (q_idx // 5) * 5``, always in [0, 4]),
    else not known to."""
    values = _exact_values(index, ranges, tensors)
    return values is not None and bool(((values >= lo) & (values <= hi)).all())


def _exact_values(expr: Expr, ranges: dict[str, tuple[int, int]], tensors: dict[str, torch.Tensor],
                  ) -> torch.Tensor | None:
    """``expr`` on the grid of the index variables it reads, or None when that grid is large."""
    from attncc.ir.evaluate import evaluate

    names = sorted(expr.free_vars() & set(ranges))
    sizes = [ranges[n][1] - ranges[n][0] + 1 for n in names]
    if math.prod(sizes) > EXACT_GRID:
        return None
    grid = {}
    for axis, (name, size) in enumerate(zip(names, sizes)):
        shape = [1] * len(names)
        shape[axis] = size
        grid[name] = (torch.arange(size) + ranges[name][0]).view(shape)
    return evaluate(expr, grid, tensors)


def divides(node: Expr) -> bool:
    """An integer ``//`` or ``%`` whose divisor is not a nonzero constant (its kernel guards it)."""
    return (node.op in ("floordiv", "mod") and node.dtype == "int"
            and not (node.src[1].op == "const" and node.src[1].arg != 0))


def _checked(node: Expr) -> bool:
    return node.op == "load" or divides(node)


def _values_of(load: Expr, tensors: dict[str, torch.Tensor]) -> Any:
    """The abstract value of a load used inside an index: the range of the tensor's values."""
    t = tensors[load.src[0].arg.name].detach()
    if load.dtype == "bool" or t.dtype == torch.bool or t.numel() == 0:
        return iv.UNKNOWN if load.dtype == "bool" else iv.UNBOUNDED
    return iv.range_val(float(t.min()), float(t.max()))


def _bounds(value: Any) -> tuple[float, float]:
    value = iv.as_int(value)
    lo, hi = value.lo_value(), value.hi_value()
    lo = float(lo.min()) if isinstance(lo, torch.Tensor) else float(lo)
    hi = float(hi.max()) if isinstance(hi, torch.Tensor) else float(hi)
    return lo, hi


@functools.lru_cache(maxsize=1024)
def may_be_negative(index: Expr) -> bool:
    """Whether an index expression can be negative for some non-negative index variables (then
    a kernel wraps it as torch does); a load inside it may hold anything."""
    # NOTE: a kernel's sizes and positions are int32; an infinite bound would make every sum
    # unbounded (``intervals.within_int64``)
    largest = torch.tensor(float(2**31 - 1), dtype=torch.float64)
    env = iv.TileEnv({v: (torch.tensor(0.0, dtype=torch.float64), largest) for v in iv.AXES})
    lo, _ = _bounds(iv.abstract_eval(index, env))
    return lo < 0


__all__ = [
    "KernelZeroDivisionError", "PositionsBeyondKernels", "check_call", "divides", "may_be_negative", "region_exprs",
]
