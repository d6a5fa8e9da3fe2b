"""Split-KV decoding on the TVM kernel: key chunks folded into the batch, one call, then a merge.

A decoding step (``Lq <= 16`` queries over a cache of ``CPU_MIN_KEYS`` or more) takes this path
even unsplit, for its row-major kernel (``decode_kernel.py``), its tables built once per bucket
of steps and its in-place reads of the cache; the keys are split only when the ``B * Hkv`` tasks
are too few to fill the threads evenly (``cpu_splits``). Here (SEMANTICS.md, softmax sinks;
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
- one chunk: its kernel adds the sink, read by each row's real head (``AttentionRegion.sink_head``);
- partials: softmax without its sink returns ``(o_s, lse_s)``; the merge weighs each by
  ``exp(lse_s - lse)``, ``lse`` their log-sum-exp with the sink's logit added once. Sigmoid and
  unnormalised pointwise maps sum. A normalised pointwise map would need the kernel's row sums,
  which it does not return, so those regions keep the plain kernel.
"""

from __future__ import annotations

import dataclasses

import torch

from attncc.codegen.tvm import decode_kernel
from attncc.codegen.tvm import rows as rw
from attncc.codegen.tvm.memo import by_value
from attncc.ir import expr as ex
from attncc.ir import nodes
from attncc.passes.plan import AttentionRegion, KernelPlan
from attncc.passes.sparsify import FULL, PARTIAL, BlockTables

Tensor = torch.Tensor


def num_splits(plan: KernelPlan, region: AttentionRegion, q: Tensor, k: Tensor) -> int:
    """How many key chunks this call is split into; 0 when the plan's rule or the normalizer says
    the split path does not apply (the plain kernel runs)."""
    rule = plan.decode_split
    B, _, Lq, _ = q.shape
    Lkv = k.shape[2]
    if rule is None or plan.strategy != "tiled" or not 0 < Lq <= rule.max_lq or Lkv < CPU_MIN_KEYS:
        return 0
    if region.gate is not None or region.head_select is not None or region.routing is not None:
        return 0
    norm = region.normalizer
    mergeable = isinstance(norm, nodes.SoftmaxNorm | nodes.SigmoidNorm) or (
        isinstance(norm, nodes.PointwiseNorm) and not norm.normalize)
    if not mergeable:
        return 0
    return cpu_splits(B * k.shape[1], Lkv // CPU_MIN_CHUNK, torch.get_num_threads())


# NOTE: the plan's rule starts at 1024 keys (a GPU's); on a CPU this path (its row-major kernel,
# its tables per bucket of steps) pays from a few hundred: 2 threads, GQA 32/8 heads of 128, 768
# keys 0.29 ms against 0.40 on the plain kernel, 256 keys 0.18 against 0.20; MHA 8 heads of 64 at
# 128 keys 0.13 against 0.11.
CPU_MIN_KEYS = 256
# NOTE: keys per chunk at least: a chunk's task must outweigh what a split adds (the merge's torch
# ops, another task's query load and finish: about 0.1 ms a step with 2 threads). Measured, 2
# threads, one kv head of 128: 2048 keys in 2 chunks 0.37 ms against 0.29 whole; 8192 keys in 4
# chunks 0.78 against 1.0.
CPU_MIN_CHUNK = 2048
BALANCED = 0.9


def cpu_splits(tasks: int, most: int, threads: int) -> int:
    """Chunks per sequence for ``tasks`` (batch times kv heads) on ``threads`` CPU threads.

    Why not the plan's rule (``DecodeSplit.num_splits``, sized for a GPU's hundreds of programs):
    a CPU thread runs tasks one after another, so chunks beyond what the threads need only add
    merge work and query loads. One chunk when the tasks already fill the threads evenly
    (``BALANCED``), else the fewest (at most ``most``) that do, else one.
    """
    def balance(s: int) -> float:
        n = tasks * s
        return n / (threads * -(-n // threads))

    return next((s for s in range(1, most + 1) if balance(s) >= BALANCED), 1)


def split_config(config: dict, rows: int) -> dict:
    """The smallest query tile (of 8, 16, 32, 64) that holds the folded rows."""
    block_m = next((m for m in (8, 16, 32, 64) if rows <= m), 64)
    return rw.fit_config(config, block_m=block_m)


@by_value(maxsize=64)
def _kernel_region(region: AttentionRegion, chunked: bool) -> AttentionRegion:
    """Real indices from the kernel's (META: S, C, G, Lq, q_offset, Lkv); the sink is left out of
    ``chunked`` keys' partials (the merge adds it once), and read by each row's real head in one
    chunk's kernel. Memoized per region (rebuilding its expressions took about 0.4 ms a step)."""
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
    if chunked and isinstance(norm, nodes.SoftmaxNorm) and norm.sink is not None:
        norm = dataclasses.replace(norm, sink=None)
    return rw.reindex(region, mapping, extra_mask=rw.op("lt", real_kv, Lkv), normalizer=norm)


def run_split_kv(region: AttentionRegion, q: Tensor, k: Tensor, v: Tensor, tensors: dict[str, Tensor],
                 config: dict, splits: int, *, scale: float, q_offset: int) -> tuple[Tensor, Tensor | None]:
    """(o, lse or None) of one region by ``splits`` key chunks merged as SEMANTICS.md says."""
    B, Hq, Lq, D = q.shape
    Hkv, Lkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    G, R = Hq // Hkv, (Hq // Hkv) * Lq
    if decode_kernel.supports(region, R, D, Dv):
        config = decode_kernel.config(R, config["block_n"])
    else:
        config = split_config(config, R)
    block_m, block_n = config["block_m"], config["block_n"]
    per_split = -(-Lkv // splits)
    C = -(-per_split // block_n) * block_n
    S = -(-Lkv // C)
    tiles_per_chunk = C // block_n
    kernel_region = _kernel_region(region, S > 1)

    qf = q.float().reshape(B, Hkv, R, D)
    if S > 1:
        qf = qf.unsqueeze(1).expand(B, S, Hkv, R, D).reshape(B * S, Hkv, R, D)
    tables = step_tables(region, (B, Hq, Hkv, Lq, Lkv), q_offset, (block_m, block_n), (S, tiles_per_chunk), tensors)

    side = {**tensors, rw.META.name: rw.meta(S, C, G, Lq, q_offset, Lkv)}
    static = region.sparsity is None or region.sparsity.cacheable  # step_tables: one set per bucket
    o, lse = rw.launch_region(kernel_region, qf, k, v, side, tables, config, scale=scale, q_offset=0,
                              total_lkv=Lkv, kv_chunk=C, keep=static)
    norm = region.normalizer
    if S == 1:  # the kernel added the sink
        o = o.view(B, Hq, Lq, Dv)
        o = o if o.dtype == q.dtype else o.to(q.dtype)
        return o, lse.view(B, Hq, Lq) if isinstance(norm, nodes.SoftmaxNorm) else None
    o = o.view(B, S, Hq, Lq, Dv)
    lse = lse.view(B, S, Hq, Lq)
    if not isinstance(norm, nodes.SoftmaxNorm):
        return o.sum(1).to(q.dtype), None
    sink = None if norm.sink is None else tensors[norm.sink.name].float().view(1, Hq, 1)
    out, merged = merge_partials(o, lse, sink)
    return out.to(q.dtype), merged


# NOTE: query positions whose decoding steps share one set of tables (a step's tables are memoized
# per bucket of this many positions: building them took about 1.5 ms, more than the kernel).
STEP_BUCKET = 64


def step_tables(region: AttentionRegion, sizes: tuple[int, int, int, int, int], q_offset: int,
                tile: tuple[int, int], chunks: tuple[int, int], tensors: dict[str, Tensor]) -> BlockTables:
    """The split kernel's tables for queries ``q_offset .. q_offset + Lq - 1`` over ``Lkv`` keys
    in ``chunks = (S, tiles per chunk)``.

    Why buckets: a decoding step moves ``q_offset`` and ``Lkv`` by one, so tables memoized on the
    exact step never hit. A mask that reads no captured tensor is classified instead for every
    query position of the step's bucket at once (``STEP_BUCKET`` positions, keys up to the last
    whole tile): a tile FULL or EMPTY for all of them is so for this step, the rest are PARTIAL and
    the kernel evaluates the mask there (with ``kv < Lkv``). One set of tables then serves the
    bucket's steps, and so do the task order and layouts memoized per tables object.
    """
    B, Hq, Hkv, Lq, Lkv = sizes
    sp = region.sparsity
    if sp is not None and not sp.cacheable:
        classes = rw.row_classes(region, B, Hq, Lq, Lkv, tile[1], q_offset, tensors)
        return _fold_tables(classes, Hkv, Lkv % tile[1] != 0, tile, chunks)
    # NOTE: Lkv matters only through the number of key tiles and whether the last one is ragged
    nkv, ragged = -(-Lkv // tile[1]), Lkv % tile[1] != 0
    return _bucket_tables(region, B, Hq, Hkv, Lq, nkv, ragged, q_offset - q_offset % STEP_BUCKET, tile, chunks)


@by_value(maxsize=64)
def _bucket_tables(region: AttentionRegion, B: int, Hq: int, Hkv: int, Lq: int, nkv: int, ragged: bool,
                   base: int, tile: tuple[int, int], chunks: tuple[int, int]) -> BlockTables:
    """``step_tables`` of a static mask for every step whose queries start in ``base ..
    base + STEP_BUCKET - 1``."""
    block_n = tile[1]
    span = Lq + STEP_BUCKET - 1  # every query row of every step in the bucket, as one query tile
    sp = region.sparsity
    if sp is not None:
        union = sp.block_map(B, Hq, span, nkv * block_n, (span, block_n), base, {})
    else:
        union = rw.row_classes(region, 1, 1, 1, nkv * block_n, block_n, 0, {})
    classes = union.expand(B, Hq, Lq, nkv)
    return _fold_tables(classes, Hkv, ragged, tile, chunks)


def _fold_tables(classes: Tensor, Hkv: int, ragged: bool, tile: tuple[int, int], chunks: tuple[int, int],
                 ) -> BlockTables:
    """Tables of the split kernel from row classes ``[B, Hq, Lq, nkv]``: chunks into the batch,
    a group's heads into the rows, then reduced per query tile."""
    B, Hq, Lq, _ = classes.shape
    block_m = tile[0]
    S, tiles_per_chunk = chunks
    R = (Hq // Hkv) * Lq
    classes = classes.clone()
    if ragged:  # the kernel masks keys past the chunk, not past the cache: the mask must
        classes[..., -1] = torch.where(classes[..., -1] == FULL, PARTIAL, classes[..., -1])
    folded = torch.zeros(B, Hkv, R, S * tiles_per_chunk, dtype=torch.int8)
    folded[..., : classes.shape[-1]] = classes.reshape(B, Hkv, R, -1)
    folded = folded.view(B, Hkv, R, S, tiles_per_chunk).permute(0, 3, 1, 2, 4).reshape(B * S, Hkv, R, -1)
    return rw.tile_tables(folded, block_m)


def merge_partials(o: Tensor, lse: Tensor, sink: Tensor | None, dim: int = 1) -> tuple[Tensor, Tensor]:
    """Merge partials over ``dim``: ``o [..., Dv]`` and ``lse`` (``o`` without its last axis), e.g.
    ``[B, S, H, Lq]``; ``sink`` broadcasts against ``lse`` without ``dim`` and enters once.

    A partial's weight is ``exp(lse_s - lse)`` with ``lse`` the merged one; a row with no live
    partial (and no sink) has ``lse = -inf`` and weights ``exp(-inf) = 0``. Few torch ops: a
    decoding step runs this on a few hundred floats, where each op costs its fixed ~5 us."""
    merged = torch.logsumexp(lse, dim=dim)
    if sink is not None:
        merged = torch.logaddexp(merged, sink)
    weight = torch.exp(lse - merged.nan_to_num(neginf=0.0).unsqueeze(dim))
    return (weight.unsqueeze(-1) * o).sum(dim=dim), merged
