"""Run the unchanged forward kernel on re-indexed rows and keys (routing and split-KV share it).

The kernel walks ``(b, h, query tile)`` tasks over the kv tiles its block tables list, and
renders the region's score, mask and row shift with the index variables ``b, h, q_idx,
kv_idx`` of the tensors it is given. Routing (compacted queries) and split-KV decoding (keys
folded into the batch) hand it tensors whose indices are not the real ones, so the region's
expressions are rewritten to compute the real indices from the kernel's (``reindex``), with
run-time sizes read from a small captured ``int64`` tensor (``META``) rather than baked in as
constants: the generated source, hence the compiled module, stays the same from call to call.

Tables for such kernels come from the mask's classes per real query row (``row_classes``,
tiles of one row), gathered into the kernel's row order and reduced per query tile
(``tile_tables``): a tile is EMPTY when every row's is, FULL when every row's is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from attncc.autotune.keys import ShapeKey
from attncc.codegen.tvm.memo import by_value
from attncc.codegen.tvm.space import PARAMS, SPACE
from attncc.ir import expr as ex
from attncc.ir.expr import INTERNAL_PREFIX, Expr, TensorSpec
from attncc.passes.plan import AttentionRegion
from attncc.passes.sparsify import EMPTY, FULL, PARTIAL, BlockTables, tables_from_classes

Tensor = torch.Tensor

META_SLOTS = 8
META = TensorSpec(f"{INTERNAL_PREFIX}meta", (META_SLOTS,), "int64")
# NOTE: flat side tables are allocated in power-of-two sizes (at least this many elements) so
# that their declared length, which is part of the generated source, rarely changes.
MIN_FLAT = 1 << 12


def meta(*values: int) -> Tensor:
    """The ``META`` tensor holding ``values`` (the rest zero). Through numpy: ``torch.tensor`` of
    a tuple costs about 5 us, a tenth of a decoding step's time outside its kernel."""
    return torch.from_numpy(np.array((*values, *(0,) * (META_SLOTS - len(values))), dtype=np.int64))


def meta_at(slot: int) -> Expr:
    return ex.load(ex.input_ref(META), (ex.const(slot),))


def flat_spec(name: str, numel: int, dtype: str) -> TensorSpec:
    """A 1-D side table of at least ``numel`` elements, its length rounded up to a power of two."""
    return TensorSpec(name, (max(MIN_FLAT, 1 << max(0, numel - 1).bit_length()),), dtype)


def flat_tensor(spec: TensorSpec, values: Tensor) -> Tensor:
    """``values`` flattened and zero-padded to ``spec``'s length."""
    dtype = torch.bool if spec.dtype == "bool" else getattr(torch, spec.dtype)
    out = torch.zeros(spec.shape[0], dtype=dtype)
    flat = values.reshape(-1)
    out[: flat.numel()] = flat.to(dtype)
    return out


def flat_index(indices: tuple[Expr, ...], sizes: tuple[Expr, ...]) -> Expr:
    """Row-major offset of ``indices`` in an array of ``sizes`` (the first size is not needed)."""
    offset = indices[0]
    for index, size in zip(indices[1:], sizes[1:], strict=True):
        offset = ex.binary("add", ex.binary("mul", offset, size), index)
    return offset


def op(name: str, a: Expr, b: Expr | int) -> Expr:
    return ex.binary(name, a, ex.const(b) if isinstance(b, int) else b)


def reindex(region: AttentionRegion, mapping: dict[str, Expr], extra_mask: Expr | None = None,
            normalizer: object | None = None) -> AttentionRegion:
    """``region`` with index variables replaced as ``mapping`` says (simultaneously), ``extra_mask``
    and-ed into the mask, and routing facts dropped: the result is a plain region for the kernel."""
    subs = {ex.var(name): value for name, value in mapping.items()}

    def sub(e: Expr | None) -> Expr | None:
        return None if e is None else ex.substitute(e, subs)

    mask = sub(region.mask)
    if extra_mask is not None:
        mask = extra_mask if mask is None else ex.binary("and", mask, extra_mask)
    norm = normalizer or region.normalizer
    sink_head = None
    if getattr(norm, "sink", None) is not None:
        sink_head = sub(region.sink_head or ex.var("h"))
        sink_head = None if sink_head == ex.var("h") else sink_head
    return dataclasses.replace(
        region, score=sub(region.score), mask=mask, row_shift=sub(region.row_shift), sparsity=None,
        routing=None, gate=None, head_select=None, normalizer=norm, sink_head=sink_head,
    )


def row_classes(region: AttentionRegion, B: int, Hq: int, Lq: int, Lkv: int, block_n: int, q_offset: int,
                tensors: dict[str, Tensor]) -> Tensor:
    """int8 ``[B, Hq, Lq, nkv]``: the mask's class of every (query row, kv tile) pair."""
    sp = region.sparsity
    if sp is not None:
        classes = sp.block_map(B, Hq, Lq, Lkv, (1, block_n), q_offset, tensors)
    else:
        everything = FULL if region.mask is None and region.score is None else PARTIAL
        classes = torch.full((1, 1, Lq, -(-Lkv // block_n)), everything, dtype=torch.int8)
    return classes.expand(B, Hq, *classes.shape[2:])


def tile_classes(rows: Tensor, block_m: int) -> Tensor:
    """``[N, H, R, nkv]`` row classes (-1: a padding row, ignored) -> ``[N, H, ceil(R / BM), nkv]``."""
    N, H, R, nkv = rows.shape
    nq = -(-R // block_m)
    padded = torch.full((N, H, nq * block_m, nkv), -1, dtype=torch.int8)
    padded[:, :, :R] = rows
    tiles = padded.view(N, H, nq, block_m, nkv)
    visited = (tiles > EMPTY).any(dim=3)
    full = ((tiles == FULL) | (tiles < 0)).all(dim=3)
    return torch.where(visited, torch.where(full, FULL, PARTIAL), EMPTY).to(torch.int8)


def tile_tables(rows: Tensor, block_m: int) -> BlockTables:
    return tables_from_classes(tile_classes(rows, block_m))


def fit_config(config: dict, *, block_m: int | None = None, block_n: int | None = None) -> dict:
    """``config`` with the given tile sizes and a register block and vector width that the search
    space accepts with them (its ``keep``; the config's own values are preferred)."""
    return dict(_fit_config(tuple(config.items()), block_m, block_n))


@by_value(maxsize=64)
def _fit_config(items: tuple[tuple[str, Any], ...], block_m: int | None, block_n: int | None,
                ) -> tuple[tuple[str, Any], ...]:
    """``fit_config`` memoized (a decoding step asks on every call)."""
    out = dict(items)
    if block_m is not None:
        out["block_m"] = block_m
    if block_n is not None:
        out["block_n"] = block_n
    # NOTE: a one-dimensional head makes the working-set bound pass: only the divisibility rules
    # of ``keep`` (which the kernel template relies on) decide here.
    tiny = ShapeKey.of(1, 1, out["block_m"], 1)
    for rows in dict.fromkeys((out["rows"], *PARAMS["rows"])):
        for vector in dict.fromkeys((out["vector"], *PARAMS["vector"])):
            candidate = {**out, "rows": rows, "vector": vector}
            if SPACE.keep(candidate, tiny):
                return tuple(candidate.items())
    raise ValueError(f"no register block fits tiles {out['block_m']} x {out['block_n']} in the TVM space")


def launch_region(region: AttentionRegion, q: Tensor, k: Tensor, v: Tensor, tensors: dict[str, Tensor],
                  tables: BlockTables, config: dict, *, scale: float, q_offset: int,
                  total_lkv: int, kv_chunk: int = 0, keep: bool = False) -> tuple[Tensor, Tensor]:
    """One kernel call; ``total_lkv`` is the real key length (the sigmoid's default bias uses it);
    ``kv_chunk``: keys come in chunks of this many (``KernelShape.kv_chunks``); ``keep``: the
    tables are memoized, keep the prepared call too (``launcher.launch``)."""
    from attncc.codegen.tvm.forward import launch_tiles

    return launch_tiles(region, config, tables, q, k, v, tensors, scale=scale, q_offset=q_offset,
                        total_lkv=total_lkv, kv_chunk=kv_chunk, keep=keep)


QUERY_INDEX = f"{INTERNAL_PREFIX}query_index"


def gathered_rows_region(region: AttentionRegion, real_q_idx: Tensor, normalizer: object | None = None,
                         ) -> tuple[AttentionRegion, dict[str, Tensor]]:
    """For a kernel whose query rows were gathered from the real ones (run with ``q_offset = 0``):
    ``q_idx`` becomes ``real_q_idx[b, h, row]`` (``[B, Hq, R]``, R covering the kernel's padded
    rows), read from a flat side table; returns the region and the side tensors it reads."""
    B, Hq, R = real_q_idx.shape
    spec = flat_spec(QUERY_INDEX, real_q_idx.numel(), "int32")
    index = flat_index((ex.var("b"), ex.var("h"), ex.var("q_idx")), (meta_at(0), meta_at(1), meta_at(2)))
    kernel_region = reindex(region, {"q_idx": ex.load(ex.input_ref(spec), (index,))}, normalizer=normalizer)
    return kernel_region, {QUERY_INDEX: flat_tensor(spec, real_q_idx), META.name: meta(B, Hq, R)}
