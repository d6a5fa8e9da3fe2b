"""How a kernel call's work is laid out: which list a ragged tile goes in, which thread runs
which task.

Why a module of its own: these are run-time facts of one call (lengths, thread count) about
the block tables that sparsify proves, shared by the forward and backward launches; each is
memoized per tables object, since sparsify caches the tables per geometry.
"""

from __future__ import annotations

import heapq
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from attncc.passes.sparsify import BlockTables


def ragged_tile_partial(tables: BlockTables, Lkv: int, block_n: int) -> BlockTables:
    """``tables`` with a FULL last kv tile that runs past ``Lkv`` listed as PARTIAL instead.

    Why: the kernel's FULL tiles evaluate nothing per score, not even the ``kv < LKV`` bound;
    only the last tile of a ragged length needs it. It has the largest index, so appending it
    keeps the PARTIAL lists ascending (stick-breaking merges them from the back).
    """
    if Lkv % block_n == 0:
        return tables
    # NOTE: None stands for "unchanged": a memo value holding its own key would keep it alive
    moved = derived(tables, ("ragged", Lkv, block_n), lambda: _move_last_tile(tables, (Lkv - 1) // block_n))
    return moved or tables


_DERIVED: weakref.WeakKeyDictionary[BlockTables, dict[tuple, Any]] = weakref.WeakKeyDictionary()


def derived(tables: BlockTables, key: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per tables object and key: sparsify caches tables per geometry, so a
    derived layout (a few torch ops, up to a millisecond; the backward's per-kv-tile lists) is
    paid once per geometry too."""
    known = _DERIVED.setdefault(tables, {})
    if key not in known:
        known[key] = compute()
    return known[key]


def _move_last_tile(tables: BlockTables, last: int) -> BlockTables | None:
    fc, fi = tables.full_count.long(), tables.full_index
    lists_last = fi.gather(-1, (fc - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1) == last
    moved = lists_last & (fc > 0)
    if not bool(moved.any()):
        return None
    pc, pi = tables.partial_count, tables.partial_index
    width = int((pc + moved).max())
    if width > pi.shape[-1]:
        pi = torch.cat([pi, pi.new_zeros(*pi.shape[:-1], width - pi.shape[-1])], dim=-1)
    pi = pi.clone()
    rows = moved.nonzero(as_tuple=True)
    pi[(*rows, pc.long()[rows])] = last
    return replace(tables, partial_count=(pc + moved).to(torch.int32), partial_index=pi,
                   full_count=(fc - moved.long()).to(torch.int32))


def task_order(tables: BlockTables, B: int, heads: int, threads: int) -> torch.Tensor:
    """The forward kernel's task table for ``tables`` (``balanced_order``, memoized per tables)."""
    return derived(tables, ("order", B, heads, threads),
                    lambda: balanced_order(tables.partial_count + tables.full_count, B, heads, threads))


def kv_task_order(tables: BlockTables, kv_tiles: Callable[[], torch.Tensor], B: int, Hkv: int,
                  threads: int) -> torch.Tensor:
    """The backward dkdv kernel's task table, memoized per tables like ``task_order`` (dealing
    costs up to a millisecond): tasks ``(b, kv head, kv tile)`` weighted by ``kv_tiles()``,
    the query tiles each walks, ``[B' or 1, Hkv or 1, kv tiles]``."""
    return derived(tables, ("kv order", B, Hkv, threads), lambda: balanced_order(kv_tiles(), B, Hkv, threads))


BALANCE_SLACK = 1.02
TASK_OVERHEAD_TILES = 0.5  # a task's fixed cost (loading its rows, writing them) in tiles


def balanced_order(tiles: torch.Tensor, B: int, heads: int, threads: int) -> torch.Tensor:
    """A kernel's task table (``kernels.task_loop``): every task ``(b, head, tile)`` once, laid
    out so that the ``threads`` equal runs of slots that TVM's ``T.parallel`` hands out carry
    about equal work. ``tiles [B' or 1, heads or 1, n]``: the tiles each task visits.

    Why: TVM splits a parallel loop into contiguous runs, one per thread, with no stealing.
    In row-major order a causal mask on one head gives the second thread three times the
    first's tiles; a document mask can be worse. Tasks go largest first to the lightest run
    with room left (``-1`` pads to whole runs); each run keeps row-major order so that
    neighbouring tasks share K and V. Row-major order is kept when it is balanced within 2%,
    or when the dealt runs are no lighter.
    """
    n_tiles = tiles.shape[2]
    work = tiles.float().expand(B, heads, n_tiles).reshape(-1) + TASK_OVERHEAD_TILES
    n = work.numel()
    runs = max(1, min(threads, n))
    step = -(-n // runs)
    row_major = torch.arange(n, dtype=torch.int32)
    heaviest = _heaviest_run(work, step)
    if runs == 1 or heaviest <= BALANCE_SLACK * float(work.sum()) / runs:
        return row_major
    weights = work.tolist()
    members = _deal(weights, runs, step) if n <= DEAL_MAX_TASKS else _snake(work, runs, step)
    order = torch.tensor([t for run in members for t in sorted(run) + [-1] * (step - len(run))], dtype=torch.int32)
    dealt = max(sum(weights[t] for t in run) for run in members)
    return order if dealt < heaviest else row_major


DEAL_MAX_TASKS = 1 << 14  # beyond this many tasks, one vectorized boustrophedon pass


def _deal(work: list[float], runs: int, capacity: int) -> list[list[int]]:
    """Largest task first to the lightest run that has room (LPT with equal run lengths)."""
    members: list[list[int]] = [[] for _ in range(runs)]
    heap = [(0.0, r) for r in range(runs)]
    for task in sorted(range(len(work)), key=lambda t: -work[t]):
        load, r = heapq.heappop(heap)
        members[r].append(task)
        if len(members[r]) < capacity:
            heapq.heappush(heap, (load + work[task], r))
    return members


def _snake(work: torch.Tensor, runs: int, capacity: int) -> list[list[int]]:
    """Largest first, dealt 0..runs-1, runs-1..0, ...: equal run lengths in one vectorized pass."""
    by_work = torch.argsort(work, descending=True, stable=True)
    position = torch.arange(work.numel())
    lap, seat = position // runs, position % runs
    run = torch.where(lap % 2 == 0, seat, runs - 1 - seat)
    return [by_work[run == r].tolist() for r in range(runs)]


def _heaviest_run(work: torch.Tensor, step: int) -> float:
    pad = -work.numel() % step
    return float(torch.cat([work, work.new_zeros(pad)]).view(-1, step).sum(1).max())
