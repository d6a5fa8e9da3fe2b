"""GQA packing for decoding: the query heads of a group share one tile's rows (packing.py).

The packed kernel must agree with the reference for every row mapping detail: the head and
query of a row (masks and scores reading ``h``), sinks per head, the union of the group's
block tables, rows past the end, and offsets.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("tvm")

import attncc
from attncc import masks
from attncc.codegen.tvm import launcher
from attncc.codegen.tvm.kernels import KernelShape
from attncc.codegen.tvm.packing import packed_group, packed_tables
from attncc.passes.sparsify import tables_from_map
from attncc.testing import assert_close_to_reference, reference_outputs

SINK = torch.linspace(-1.0, 1.0, 8)
SLOPES = torch.linspace(0.05, 0.5, 8)
VARIANTS = {
    "causal": lambda: attncc.variant(mask=masks.causal),
    "alibi_window": lambda: attncc.variant(lambda s, b, h, q, kv: s - SLOPES[h] * (q - kv),
                                           mask=masks.causal & masks.sliding_window(40)),
    "mask_reads_head": lambda: attncc.variant(mask=lambda b, h, q, kv: (kv % (h + 2)) != 0),
    "sinks": lambda: attncc.variant(mask=masks.causal, normalizer=attncc.Softmax(sink=SINK)),
    "sigmoid": lambda: attncc.variant(mask=masks.causal, normalizer="sigmoid"),
    "stick_breaking": lambda: attncc.variant(mask=masks.causal, normalizer="stick_breaking"),
}


def test_packed_group_only_for_few_rows_and_whole_groups() -> None:
    assert packed_group(Hq=8, Hkv=1, Lq=1, block_m=64) == 8
    assert packed_group(Hq=8, Hkv=8, Lq=1, block_m=64) == 1  # no group to pack
    assert packed_group(Hq=8, Hkv=2, Lq=100, block_m=64) == 1  # prefill keeps one head per tile
    assert packed_group(Hq=6, Hkv=1, Lq=1, block_m=64) == 1  # a tile must hold whole groups


def test_group_union_of_tables() -> None:
    """FULL only where every head of the group is FULL, EMPTY only where every head is EMPTY."""
    var = attncc.variant(mask=lambda b, h, q, kv: (kv < 64) | (h == 0))
    region = var.plan.regions[0]
    tables = packed_tables(region, 1, 4, 2, 1, 256, (64, 64), 255, {})
    per_head = region.sparsity.block_map(1, 4, 1, 256, (32, 64), 255, {})
    assert per_head[0, 1, 0].tolist() == [2, 0, 0, 0]  # head 1: only the first kv tile
    expected = torch.tensor([[[[2, 1, 1, 1]], [[2, 0, 0, 0]]]], dtype=torch.int8)
    want = tables_from_map(expected)
    for name in ("partial_count", "partial_index", "full_count", "full_index"):
        assert torch.equal(getattr(tables, name), getattr(want, name)), name


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize(("Hkv", "Lq", "Lkv"), [(1, 1, 300), (2, 3, 200), (4, 16, 100), (2, 5, 5)])
def test_packed_rows_match_reference(name: str, Hkv: int, Lq: int, Lkv: int) -> None:
    var = VARIANTS[name]()
    B, Hq, D = 2, 8, 32
    gen = torch.Generator().manual_seed(Lq * 7 + Lkv)
    q = torch.randn(B, Hq, Lq, D, generator=gen)
    k = torch.randn(B, Hkv, Lkv, D, generator=gen)
    v = torch.randn(B, Hkv, Lkv, D, generator=gen)
    region = var.plan.regions[0]
    config = {"block_m": 64, "block_n": 32, "rows": 4, "vector": 16}
    group = packed_group(Hq, Hkv, Lq, config["block_m"])
    assert group == Hq // Hkv
    shape = KernelShape(D=D, Dv=D, dtype="float32", group=group, **config)
    q_offset = Lkv - Lq
    tables = packed_tables(region, B, Hq, Hkv, Lq, Lkv, (64, 32), q_offset, var.tensors)
    scale = (region.score_scale or 1.0) / math.sqrt(D)
    out, _ = launcher.launch(region, shape, q, k, v, var.tensors, tables, scale=scale, q_offset=q_offset,
                             bias=-math.log(Lkv))
    ref64, _ = reference_outputs(var, {"q": q, "k": k, "v": v}, q_offset=q_offset)
    assert_close_to_reference(out, ref64, None, Lkv, what=f"{name} packed G={group}")
