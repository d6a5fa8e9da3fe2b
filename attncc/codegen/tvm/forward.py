"""One region's forward on the generated kernel: the config, the tile geometry, the launch.

Why a module of its own: what to run with is decided here from the plan's proven facts, once,
for every caller (plain calls, autograd, routing and decoding paths): a tuned config when the
tuning cache has one, else the space's default, refined by two rules a default cannot know
from the shape bucket alone:

- GQA packing (``packing.py``): a few query rows per head share a tile with their group;
- sparsity pays in full: a banded mask wastes about ``BM`` keys per row of each q tile at each
  diagonal edge, rounded up to whole ``BN`` tiles. Where the mask is all half-planes (causal,
  sliding windows) the kernel skips those register blocks itself; otherwise a default tile is
  halved when the block tables show that the smaller one visits clearly less work.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from types import ModuleType
from typing import Any

import torch

from attncc.autotune.keys import ShapeKey
from attncc.codegen.tvm import bf16_pairs, launcher, vector_exp
from attncc.codegen.tvm.kernels import KernelShape
from attncc.codegen.tvm.packing import packed_config, packed_group, packed_tables
from attncc.codegen.tvm.space import SPACE, fits
from attncc.ir import nodes
from attncc.passes.halfplanes import only_halfplanes
from attncc.passes.plan import AttentionRegion, KernelPlan
from attncc.passes.sparsify import BlockTables, block_tables_for, tensors_key

SMALLER_TILE_GAIN = 0.9  # halve a default tile when it visits at most this share of the work


def select_config(plan: KernelPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[dict, str]:
    """(config, source): the tuned config when ``attncc.autotune`` has one, else the default."""
    B, Hq, Lq, D = q.shape
    shape = _shape_key(B, Hq, Lq, D, k.shape[1], k.shape[2], v.shape[3], q.dtype)
    try:
        return _lookup().select_config("tvm", SPACE, plan.fingerprint, q.dtype, shape)
    except Exception:
        return SPACE.default_for(shape), "default"


@functools.cache
def _lookup() -> ModuleType:
    """``attncc.autotune.lookup``, imported on first use (an import statement costs about a
    microsecond on every call; a failed import raises and is tried again)."""
    import attncc.autotune.lookup

    return attncc.autotune.lookup


@functools.lru_cache(maxsize=256)
def _shape_key(B: int, Hq: int, Lq: int, D: int, Hkv: int, Lkv: int, Dv: int, dtype: torch.dtype) -> ShapeKey:
    """The ``ShapeKey`` bucket of a call, memoized: building and validating one costs more than
    the memoized lookup that reads it, on every call."""
    return ShapeKey.of(B, Hq, Lq, D, Hkv=Hkv, Lkv=Lkv, Dv=Dv, dtype=dtype)


def visited_work(tables: BlockTables, block_m: int, block_n: int) -> int:
    """Score entries a kernel computes with these tables (listed tiles times tile area)."""
    return int((tables.partial_count.sum() + tables.full_count.sum()) * block_m * block_n)


def _geometry(
    region: AttentionRegion, config: dict, q: torch.Tensor, k: torch.Tensor, tensors: dict[str, torch.Tensor],
    q_offset: int, tuned: bool,
) -> tuple[dict, int, BlockTables]:
    """(config, packed group, block tables) for this call."""
    B, Hq, Lq, _ = q.shape
    Hkv, Lkv = k.shape[1], k.shape[2]
    group = packed_group(Hq, Hkv, Lq, 64)
    if group > 1:
        config = packed_config(config, group, Lq)
        tile = (config["block_m"], config["block_n"])
        return config, group, _packed_tables(region, B, Hq, Hkv, Lq, Lkv, tile, q_offset, tensors)
    tile = (config["block_m"], config["block_n"])
    tables = block_tables_for(region, B, Hq, Lq, Lkv, tile, q_offset, tensors)
    if tuned or region.mask is None or Lq < 4 * tile[0] or only_halfplanes(region.mask):
        return config, 1, tables
    half = {**config, "block_m": tile[0] // 2, "block_n": tile[1] // 2}
    if not fits(half) or not _halving_may_pay(tables, *tile):
        return config, 1, tables
    smaller = block_tables_for(region, B, Hq, Lq, Lkv, (half["block_m"], half["block_n"]), q_offset, tensors)
    if _visits_less(smaller, tables, *tile):
        return half, 1, smaller
    return config, 1, tables


# NOTE: the two memos below key on tables objects (BlockTables hash by identity; an entry holds its
# tables, so an id is never reused while it lives). sparsify returns the same object per geometry,
# and per captured tensors' versions, so a decision is made once per geometry, not per call.
@functools.lru_cache(maxsize=16)
def _halving_may_pay(tables: BlockTables, block_m: int, block_n: int) -> bool:
    """Halving saves work only inside PARTIAL tiles (a FULL tile splits into FULL tiles): False when
    they are at most ``1 - SMALLER_TILE_GAIN`` of the work visited."""
    partial = int(tables.partial_count.sum()) * block_m * block_n
    return partial > (1 - SMALLER_TILE_GAIN) * visited_work(tables, block_m, block_n)


@functools.lru_cache(maxsize=16)
def _visits_less(smaller: BlockTables, tables: BlockTables, block_m: int, block_n: int) -> bool:
    """Half-size tiles (``smaller``) visit at most ``SMALLER_TILE_GAIN`` of the work of ``tables``."""
    return visited_work(smaller, block_m // 2, block_n // 2) <= SMALLER_TILE_GAIN * visited_work(
        tables, block_m, block_n)


def _packed_tables(
    region: AttentionRegion, B: int, Hq: int, Hkv: int, Lq: int, Lkv: int, tile: tuple[int, int], q_offset: int,
    tensors: dict[str, torch.Tensor],
) -> BlockTables:
    """``packed_tables``, memoized per geometry unless the mask reads captured tensors (their
    contents can change between calls)."""
    sparsity = region.sparsity
    if sparsity is not None and not sparsity.cacheable:
        return packed_tables(region, B, Hq, Hkv, Lq, Lkv, tile, q_offset, tensors)
    try:
        return _static_packed_tables(region, B, Hq, Hkv, Lq, Lkv, tile, q_offset)
    except TypeError:  # NOTE: a payload that does not hash: build every time, as render_forward does
        return packed_tables(region, B, Hq, Hkv, Lq, Lkv, tile, q_offset, tensors)


@functools.lru_cache(maxsize=64)
def _static_packed_tables(
    region: AttentionRegion, B: int, Hq: int, Hkv: int, Lq: int, Lkv: int, tile: tuple[int, int], q_offset: int,
) -> BlockTables:
    return packed_tables(region, B, Hq, Hkv, Lq, Lkv, tile, q_offset, {})


def run_forward(
    plan: KernelPlan, region: AttentionRegion, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    tensors: dict[str, torch.Tensor], scale: float, q_offset: int, config: dict | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o in q's dtype, lse float32) of ``region`` on the forward kernel: the ``launcher.Launch`` of
    this call signature when an earlier call prepared it (``call_key``), else a new one."""
    key = call_key(plan, region, q, k, v, tensors, scale, q_offset, config)
    try:
        launch = launcher.kept_launch(key, tensors) if key is not None else None
    except TypeError:  # a payload that does not hash
        key = launch = None
    if launch is None:
        launch = _prepare_forward(plan, region, q, k, v, tensors, scale, q_offset, config)
        if key is not None:
            launcher.keep_launch(key, launch, tensors)
    return launch(q, k, v, tensors)


def call_key(
    plan: KernelPlan, region: AttentionRegion, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    tensors: dict[str, torch.Tensor], scale: float, q_offset: int, config: dict | None,
) -> tuple | None:
    """Everything a forward ``Launch`` is decided from: the region, the shapes and dtypes, the
    scalars, the thread count, the config or what selecting one reads (``lookup.selection_state``),
    and, when the block tables read captured tensors, their identities and versions
    (``sparsify.tensors_key``, as the tables' own memo). None where a call cannot be keyed: an
    inference tensor (it has no version); a payload that does not hash raises TypeError at the
    lookup."""
    tuned = tuple(config.items()) if config is not None else _lookup().selection_state()
    sparsity = region.sparsity
    captured = () if not tensors or (sparsity is not None and sparsity.cacheable) else tensors_key(tensors)
    if captured is None:
        return None
    return (region, plan.fingerprint, q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, scale, q_offset, tuned,
            torch.get_num_threads(), captured)


def _prepare_forward(
    plan: KernelPlan, region: AttentionRegion, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    tensors: dict[str, torch.Tensor], scale: float, q_offset: int, config: dict | None,
) -> launcher.Launch:
    tuned = config is not None
    if config is None:
        config, source = select_config(plan, q, k, v)
        tuned = not source.startswith("default")
    config, group, tables = _geometry(region, config, q, k, tensors, q_offset, tuned)
    shape, scale, bias = kernel_arguments(region, config, q, v, scale=scale, total_lkv=k.shape[2], group=group)
    return launcher.prepare(region, shape, q, k, tables, scale=scale, q_offset=q_offset, bias=bias)


def launch_tiles(
    region: AttentionRegion, config: dict, tables: BlockTables, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    tensors: dict[str, torch.Tensor], *, scale: float, q_offset: int, total_lkv: int, group: int = 1,
    kv_chunk: int = 0, keep: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One kernel call with a chosen config and tables (``kernel_arguments``). ``kv_chunk``: the
    keys come in chunks of this many (``KernelShape.kv_chunks``, decode.py); ``keep``: the tables
    are memoized, keep the prepared call too (``launcher.launch``)."""
    shape, scale, bias = kernel_arguments(region, config, q, v, scale=scale, total_lkv=total_lkv, group=group,
                                          kv_chunk=kv_chunk)
    return launcher.launch(region, shape, q, k, v, tensors, tables, scale=scale, q_offset=q_offset, bias=bias,
                           kv_chunk=kv_chunk, keep=keep)


def kernel_arguments(
    region: AttentionRegion, config: dict, q: torch.Tensor, v: torch.Tensor, *, scale: float, total_lkv: int,
    group: int = 1, kv_chunk: int = 0,
) -> tuple[KernelShape, float, float]:
    """(kernel shape, scale, bias) of a call at ``config`` (only the tensors' shapes and dtypes are
    read; ``v``'s dtype is K's too, ``validate.check_qkv``): the region's folded score scale and the
    sigmoid's default bias (from ``total_lkv``, the real key length) are applied here, for every
    path."""
    up_front = converts_kv_up_front(v.dtype, config, kv_chunk > 0, q.shape[2] * group)
    shape = _kernel_shape(q.shape[3], v.shape[3], q.dtype, group, tuple(config.items()), kv_chunk > 0, up_front,
                          v.dtype)
    if region.score_scale is not None:
        scale = scale * region.score_scale
    return shape, scale, sigmoid_bias(region.normalizer, total_lkv)


@functools.lru_cache(maxsize=256)
def _kernel_shape(D: int, Dv: int, dtype: torch.dtype, group: int, config: tuple[tuple[str, Any], ...],
                  kv_chunks: bool = False, kv_up_front: bool = False, kv_dtype: torch.dtype | None = None,
                  ) -> KernelShape:
    """The ``KernelShape`` of a call, memoized: one object per shape also makes the rendered-source
    memo's lookup an identity check, and the host questions (pair dots, transposition) are asked
    once per shape. ``kv_up_front``: K and V would arrive as float32 copies; a call that
    multiplies by pairs converts nothing. ``kv_dtype``: K and V's dtype when it is not q's
    (``_kv_type``)."""
    shape = KernelShape(D=D, Dv=Dv, dtype=str(dtype).removeprefix("torch."), group=group, kv_chunks=kv_chunks,
                        transpose_lanes=launcher.transpose_lanes(), **dict(config))
    pairs = uses_pair_dots(dtype, shape)
    return dataclasses.replace(shape, kv_dtype=_kv_type(dtype, kv_dtype, kv_up_front and not pairs), pair_dots=pairs,
                               vector_exp=uses_vector_exp(shape))


def _kv_type(dtype: torch.dtype, kv_dtype: torch.dtype | None, up_front: bool) -> str:
    """``KernelShape.kv_dtype``: "float32" for copies converted up front; K and V's own dtype
    where it differs from q's, else "". The paths that multiply a float32 copy of a few query
    rows (a decoding step, TopKHeads, per-token MoBA) read a float16 / bfloat16 K and V as they
    are, converted in the kernel (a tile at a time, or in registers), unless there are query
    tiles enough to convert up front (``converts_kv_up_front``): converting a decoding step's
    whole cache to float32 first made bfloat16 steps 1.7x slower than float32 ones."""
    if up_front:
        return "float32"
    return "" if kv_dtype in (None, dtype) else str(kv_dtype).removeprefix("torch.")


def uses_vector_exp(shape: KernelShape) -> bool:
    """Whether softmax and stick-breaking exponentials go through ``vector_exp``: on a host with
    AVX-512F and DQ, for knobs that allow it (``KernelShape.fits_vector_exp``)."""
    return vector_exp.on_host() and shape.fits_vector_exp


def uses_pair_dots(dtype: torch.dtype, shape: KernelShape) -> bool:
    """Whether a bfloat16 call multiplies by pairs (``bf16_pairs``): on a host with AVX-512 BF16,
    for knobs that allow it (``KernelShape.fits_pair_dots``)."""
    return dtype == torch.bfloat16 and bf16_pairs.on_host() and shape.fits_pair_dots


# NOTE: query tiles from which float16 / bfloat16 K and V are converted up front (below), the
# measured crossover: causal, 8 heads of 64, 2 threads, bfloat16 against float32 (median of 30-60
# paired rounds): L=1024 (16 query tiles) staged 1.03x, up front 0.98x; L=2048 (32) staged 0.98x,
# up front 1.01x; L=4096 both 1.01x
UP_FRONT_QUERY_TILES = 24


def converts_kv_up_front(dtype: torch.dtype, config: dict, kv_chunks: bool, rows: int) -> bool:
    """Whether float16 / bfloat16 K and V are converted to float32 once per call rather than a
    tile at a time in the kernel. Staged, a kv tile is converted once per query tile that visits
    it (causal L=2048: 16 times on average); up front, once, for the price of a copy (0.2-0.4 ms
    at L=2048, 8 heads of 64) and of reading float32 keys (twice the bytes in cache). So only
    for many query tiles (``UP_FRONT_QUERY_TILES``), never for a decoding step's chunks. The two
    ways are two modules of a float16 / bfloat16 variant (each compiled once, then from disk); a
    bfloat16 call that multiplies by pairs (``uses_pair_dots``) converts nothing."""
    return (dtype in (torch.float16, torch.bfloat16) and not kv_chunks
            and config.get("layout", "key_major") == "key_major" and rows >= UP_FRONT_QUERY_TILES * config["block_m"])


def sigmoid_bias(norm: Any, Lkv: int) -> float:
    if not isinstance(norm, nodes.SigmoidNorm):
        return 0.0
    return -math.log(Lkv) if norm.bias is None else float(norm.bias)
