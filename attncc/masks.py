"""Ready-made mask functions, composable with ``&``, ``|`` and ``~``.

Every helper returns a :class:`Mask`: a FlexAttention ``mask_mod`` ``(b, h, q_idx, kv_idx) ->
bool`` with a readable name. A Mask is an ordinary callable, so the same object works with
``attncc.variant(mask=...)`` (traced symbolically, once) and with torch's own
``create_block_mask`` / ``flex_attention`` (evaluated under ``vmap``). That is why the bodies
below use only arithmetic, comparisons, ``& | ~``, ``//``, ``%``, ``torch.where``,
``torch.minimum``/``clamp`` and indexing of captured tensors: the one vocabulary both the
tracer and vmap understand.

Conventions (``q_idx`` is the absolute query position, ``q_offset`` included):

- ``causal``: ``kv_idx <= q_idx``.
- ``sliding_window(w)``: causal, the query sees its last ``w`` keys itself included,
  ``q_idx - w < kv_idx <= q_idx`` (Mistral's window size). attention-gym's
  ``generate_sliding_window(W)`` (``q_idx - kv_idx <= W``) is ``sliding_window(W + 1)``.
- ``prefix_lm(n)``: the first ``n`` keys (``kv_idx < n``) are visible to every query, causal
  elsewhere (T5/PaLI prefix LM). attention-gym's ``kv_idx <= n`` is ``prefix_lm(n + 1)``.
- ``document(ids)``: same document, ``ids[q_idx] == ids[kv_idx]`` (``ids`` of shape ``[L]``,
  or ``[B, L]`` indexed by batch); not causal by itself: use ``document(ids) & causal``.
- ``dilated_window(w, d)``: causal, ``w`` keys ``q_idx, q_idx - d, ..., q_idx - (w-1) d``
  (Longformer's dilated sliding window).
- ``strided(l)``, ``fixed(l, c)``: Sparse Transformers (Child et al. 2019), the union of the
  paper's two factorized heads, causal. Strided: ``i - j < l`` or ``(i - j) % l == 0``. Fixed:
  same block ``j // l == i // l`` or ``j`` among the last ``c`` positions of its block,
  ``j % l >= l - c``.
- ``neighborhood(k, d, causal, grid)``: NATTEN / Generalized Neighborhood Attention
  (Hassani et al. 2023, 2025), see its docstring.
- ``sinks(n)``: StreamingLLM (Xiao et al. 2024) attention sinks, the first ``n`` keys,
  ``kv_idx < n`` and (by default) ``kv_idx <= q_idx``; use ``sinks(4) | sliding_window(1024)``.
- ``chunked(c)``: block-local attention, ``q_idx // c == kv_idx // c``; ``chunked(c) & causal``
  is Llama 4's chunked attention.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

MaskFn = Callable[[Any, Any, Any, Any], Any]


class Mask:
    """A named ``mask_mod(b, h, q_idx, kv_idx) -> bool``; ``&``, ``|``, ``~`` build new Masks.

    Plain functions are accepted on either side of ``&``/``|`` (``fn & causal`` works through
    ``__rand__``). ``Mask`` also works as a decorator: ``@Mask`` names a mask after its function.
    """

    def __init__(self, fn: MaskFn, name: str | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"Mask(fn=...) expects a callable (b, h, q_idx, kv_idx) -> bool, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", None) or "mask"
        # NOTE: __name__/__qualname__ label variants and trace errors; keep them identifiers.
        self.__name__ = self.__qualname__ = _identifier(self.name)

    def __call__(self, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return self.fn(b, h, q_idx, kv_idx)

    def __and__(self, other: MaskFn) -> Mask:
        return _combine(self, _as_mask(other, "&"), "&")

    def __rand__(self, other: MaskFn) -> Mask:
        return _combine(_as_mask(other, "&"), self, "&")

    def __or__(self, other: MaskFn) -> Mask:
        return _combine(self, _as_mask(other, "|"), "|")

    def __ror__(self, other: MaskFn) -> Mask:
        return _combine(_as_mask(other, "|"), self, "|")

    def __invert__(self) -> Mask:
        inner = self

        def inverted(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return ~inner(b, h, q_idx, kv_idx)

        return Mask(inverted, f"~{_parenthesize(self.name)}")

    def __repr__(self) -> str:
        return f"Mask({self.name})"

    def __str__(self) -> str:
        return self.name


def _identifier(name: str) -> str:
    """``"sinks(4) | sliding_window(64)"`` -> ``"sinks_or_sliding_window"``: arguments dropped."""
    previous = None
    while previous != name:
        previous, name = name, re.sub(r"\([^()]*\)", "", name)
    words = name.replace("~", " not ").replace("&", " and ").replace("|", " or ")
    ident = re.sub(r"\W+", "_", words).strip("_")
    return ident if ident and not ident[0].isdigit() else f"mask_{ident}"


def _parenthesize(name: str) -> str:
    return f"({name})" if " " in name else name


def _as_mask(value: Any, op: str) -> Mask:
    if isinstance(value, Mask):
        return value
    if callable(value):
        return Mask(value)
    raise TypeError(f"cannot combine a Mask with {type(value).__name__} using '{op}'; expected a mask function")


def _combine(left: Mask, right: Mask, op: str) -> Mask:
    if op == "&":

        def both(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return left(b, h, q_idx, kv_idx) & right(b, h, q_idx, kv_idx)

        fn = both
    else:

        def either(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return left(b, h, q_idx, kv_idx) | right(b, h, q_idx, kv_idx)

        fn = either
    return Mask(fn, f"{_parenthesize(left.name)} {op} {_parenthesize(right.name)}")


# ---- argument checks ----------------------------------------------------------------------


def _check_int(value: Any, name: str, where: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        kind = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{where}: {name} must be {kind}, got {value}")
    return value


def _per_dim(value: Any, name: str, ndim: int, where: str) -> tuple[Any, ...]:
    if isinstance(value, list | tuple):
        if len(value) != ndim:
            raise ValueError(f"{where}: {name} has {len(value)} entries but grid has {ndim} dimensions")
        return tuple(value)
    return (value,) * ndim


# ---- the helpers --------------------------------------------------------------------------


def _causal(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    return q_idx >= kv_idx


causal = Mask(_causal, "causal")
"""Autoregressive mask: ``kv_idx <= q_idx``."""


def sliding_window(w: int) -> Mask:
    """Causal window of ``w`` keys, the query included: ``q_idx - w < kv_idx <= q_idx``."""
    _check_int(w, "w", "sliding_window")

    def sliding_window_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return (q_idx >= kv_idx) & (q_idx - kv_idx < w)

    return Mask(sliding_window_mask, f"sliding_window({w})")


def prefix_lm(n: int) -> Mask:
    """Bidirectional over the first ``n`` keys (``kv_idx < n``), causal elsewhere."""
    _check_int(n, "n", "prefix_lm", minimum=0)

    def prefix_lm_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return (kv_idx < n) | (q_idx >= kv_idx)

    return Mask(prefix_lm_mask, f"prefix_lm({n})")


def document(ids: torch.Tensor) -> Mask:
    """Same document only: ``ids[q_idx] == ids[kv_idx]`` (``ids[b, .]`` when ``ids`` is ``[B, L]``).

    ``ids`` is an int32/int64 tensor of document ids per position, captured by reference (its
    values are inputs of the variant, so changing them in place needs no recompile). Not causal
    on its own: packed causal training uses ``document(ids) & causal``.
    """
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"document: ids must be a torch.Tensor of document ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"document: ids must be an int32 or int64 tensor, got {ids.dtype}")
    if ids.dim() not in (1, 2):
        raise ValueError(f"document: ids must have shape [L] or [B, L], got {tuple(ids.shape)}")

    if ids.dim() == 1:

        def document_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return ids[q_idx] == ids[kv_idx]

    else:

        def document_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return ids[b, q_idx] == ids[b, kv_idx]

    return Mask(document_mask, f"document(ids{list(ids.shape)})")


def dilated_window(w: int, dilation: int) -> Mask:
    """Causal dilated window: the ``w`` keys ``q_idx - t * dilation`` for ``t = 0 .. w-1``."""
    _check_int(w, "w", "dilated_window")
    _check_int(dilation, "dilation", "dilated_window")
    span = w * dilation

    def dilated_window_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        distance = q_idx - kv_idx
        return (q_idx >= kv_idx) & (distance < span) & (distance % dilation == 0)

    return Mask(dilated_window_mask, f"dilated_window({w}, dilation={dilation})")


def strided(stride: int) -> Mask:
    """Sparse Transformers' strided pattern (Child et al. 2019), both heads' union, causal.

    Head 1 sees the previous ``stride`` positions (``i - j < stride``), head 2 every
    ``stride``-th one (``(i - j) % stride == 0``); the paper's ``A(1)_i = {max(0, i-l)..i}``
    adds ``j = i - l``, which head 2 already covers, so the union is the same.
    """
    _check_int(stride, "stride", "strided")

    def strided_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        distance = q_idx - kv_idx
        return (q_idx >= kv_idx) & ((distance < stride) | (distance % stride == 0))

    return Mask(strided_mask, f"strided({stride})")


def fixed(block: int, c: int = 1) -> Mask:
    """Sparse Transformers' fixed pattern (Child et al. 2019), both heads' union, causal.

    Head 1 sees its own block (``j // block == i // block``), head 2 the last ``c`` positions
    of every block, the "summary" cells ``j % block >= block - c``.
    """
    _check_int(block, "block", "fixed")
    _check_int(c, "c", "fixed")
    if c > block:
        raise ValueError(f"fixed: c must be at most block ({block}), got {c}")
    first_summary = block - c

    def fixed_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        same_block = q_idx // block == kv_idx // block
        summary = kv_idx % block >= first_summary
        return (q_idx >= kv_idx) & (same_block | summary)

    return Mask(fixed_mask, f"fixed({block}, c={c})")


def sinks(n: int, causal: bool = True) -> Mask:
    """StreamingLLM's attention sinks (Xiao et al. 2024): the first ``n`` keys, ``kv_idx < n``.

    With ``causal=True`` (default) a query still never sees the future, ``kv_idx <= q_idx``, so
    ``sinks(n) | sliding_window(w)`` stays causal. ``causal=False`` is the bare ``kv_idx < n``.
    """
    _check_int(n, "n", "sinks")
    if not isinstance(causal, bool):
        raise TypeError(f"sinks: causal must be a bool, got {type(causal).__name__}")

    if causal:

        def sinks_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return (q_idx >= kv_idx) & (kv_idx < n)

    else:

        def sinks_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return kv_idx < n

    return Mask(sinks_mask, f"sinks({n})" if causal else f"sinks({n}, causal=False)")


def chunked(c: int) -> Mask:
    """Block-local attention: query and key in the same chunk, ``q_idx // c == kv_idx // c``."""
    _check_int(c, "c", "chunked")

    def chunked_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return q_idx // c == kv_idx // c

    return Mask(chunked_mask, f"chunked({c})")


# ---- neighborhood attention ---------------------------------------------------------------


def _window_1d(qi: Any, ki: Any, n: int, k: int, d: int, is_causal: bool) -> Any:
    """NATTEN's rule along one dimension of size ``n`` (coordinates ``qi``, ``ki``).

    Dilation splits the axis into ``d`` interleaved groups (``index % d``); inside a group the
    window is ``k`` consecutive group members. Non-causal windows are centred (``k // 2`` on
    the left) and shifted inward at the borders, so every query sees exactly ``k`` keys per
    dimension; causal windows end at the query and are cut at the start.
    """
    same_group = (qi % d == ki % d) if d > 1 else None
    qg, kg = (qi // d, ki // d) if d > 1 else (qi, ki)
    if is_causal:
        inside = (kg <= qg) & (qg - kg < k)
    else:
        if d > 1:
            group_len = (n - qi % d + d - 1) // d
            start = torch.minimum(qg - k // 2, group_len - k).clamp(min=0)
        else:
            start = torch.clamp(qg - k // 2, 0, n - k)
        inside = (kg >= start) & (kg - start < k)
    return inside if same_group is None else same_group & inside


def neighborhood(
    kernel_size: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    causal: bool | Sequence[bool] = False,
    grid: Sequence[int] | None = None,
) -> Mask:
    """Neighborhood attention over a 1-, 2- or 3-D token grid (NATTEN; Hassani et al. 2023, 2025).

    Tokens are the grid's cells flattened row-major (the last dimension fastest), so the
    sequence length must be ``prod(grid)``. Along each dimension ``i`` (``kernel_size``,
    ``dilation`` and ``causal`` may be one value or one per dimension):

    - keys and query must share ``index % dilation`` (dilated groups);
    - non-causal: the window is ``kernel_size`` group members starting at
      ``clamp(g - kernel_size // 2, 0, group_len - kernel_size)`` where ``g = index // dilation``
      and ``group_len`` is the group's size, i.e. centred and shifted inward at the borders, so
      every query sees exactly ``kernel_size`` neighbours per dimension (even sizes put one more
      on the left);
    - causal: the ``kernel_size`` group members ending at the query, fewer near the start.

    A key is visible when it is in the window along every dimension. As NATTEN requires,
    ``kernel_size * dilation <= grid[i]``.
    """
    where = "neighborhood"
    if grid is None:
        raise TypeError("neighborhood: grid is required, the token grid's shape such as (L,), (H, W) or (D, H, W)")
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid,)
    if not isinstance(grid, list | tuple) or not 1 <= len(grid) <= 3:
        raise ValueError(f"neighborhood: grid must be a tuple of 1 to 3 positive ints, got {grid!r}")
    sizes = tuple(_check_int(n, f"grid[{i}]", where) for i, n in enumerate(grid))
    ndim = len(sizes)
    kernels = tuple(_check_int(k, "kernel_size", where) for k in _per_dim(kernel_size, "kernel_size", ndim, where))
    dilations = tuple(_check_int(d, "dilation", where) for d in _per_dim(dilation, "dilation", ndim, where))
    causals = _per_dim(causal, "causal", ndim, where)
    if not all(isinstance(c, bool) for c in causals):
        raise TypeError(f"neighborhood: causal must be a bool or one bool per dimension, got {causal!r}")
    for i, (n, k, d) in enumerate(zip(sizes, kernels, dilations)):
        if k * d > n:
            raise ValueError(
                f"neighborhood: kernel_size * dilation ({k} * {d}) exceeds grid[{i}] = {n}; NATTEN requires it fit"
            )
    strides = tuple(math.prod(sizes[i + 1 :]) for i in range(ndim))

    def coordinate(index: Any, dim: int) -> Any:
        along = index // strides[dim] if strides[dim] > 1 else index
        return along % sizes[dim] if dim > 0 else along

    def neighborhood_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        result = None
        for dim in range(ndim):
            qi, ki = coordinate(q_idx, dim), coordinate(kv_idx, dim)
            inside = _window_1d(qi, ki, sizes[dim], kernels[dim], dilations[dim], causals[dim])
            result = inside if result is None else result & inside
        return result

    options = [f"kernel_size={_compact(kernels)}", f"grid={sizes}"]
    if any(d > 1 for d in dilations):
        options.append(f"dilation={_compact(dilations)}")
    if any(causals):
        options.append(f"causal={_compact(causals)}")
    return Mask(neighborhood_mask, f"neighborhood({', '.join(options)})")


def _compact(values: tuple[Any, ...]) -> Any:
    return values[0] if len(set(values)) == 1 else values


__all__ = [
    "Mask", "causal", "chunked", "dilated_window", "document", "fixed", "neighborhood", "prefix_lm",
    "sinks", "sliding_window", "strided",
]
