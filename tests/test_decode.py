"""decode: the split-KV rule on the plan, and the split-KV runtime with its LSE merge vs the reference."""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.codegen.reference.attention import attention
from attncc.passes.decode import decode, split_kv_attention
from attncc.passes.plan import DecodeSplit
from attncc.testing import assert_close_to_reference

HQ, HKV = 4, 2


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 9)


def qkv(Lq: int, Lkv: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, HQ, Lq, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, HKV, Lkv, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, HKV, Lkv, 6, generator=gen, dtype=torch.float64)
    return q, k, v


def check(var: attncc.Variant, Lq: int, Lkv: int, num_splits: int, q_offset: int, lse: bool = True) -> None:
    """Split-KV on the compiled plan against the reference on the same plan (outputs and lse)."""
    q, k, v = qkv(Lq, Lkv)
    tensors = {n: (t.double() if t.is_floating_point() else t) for n, t in var.tensors.items()}
    region = var.plan.regions[0]
    ref_o, ref_lse = attention(region, q, k, v, tensors, scale=None, q_offset=q_offset)
    got_o, got_lse = split_kv_attention(region, q, k, v, tensors, q_offset=q_offset, num_splits=num_splits)
    assert_close_to_reference(got_o, ref_o, None, Lkv)
    if lse:
        assert_close_to_reference(got_lse.double(), ref_lse.double(), None, Lkv, what="lse")


# ---- the pass ------------------------------------------------------------------------


def test_softmax_gets_decode_split() -> None:
    plan = attncc.variant(mask=causal).plan
    assert isinstance(plan.decode_split, DecodeSplit)
    assert plan.decode_split.applies(1, 4096) and plan.decode_split.applies(16, 4096)
    assert not plan.decode_split.applies(17, 4096) and not plan.decode_split.applies(4, 64)


@pytest.mark.parametrize("normalizer", [attncc.Linear(), "stick_breaking"])
def test_unsplittable_normalizers_get_none(normalizer: object) -> None:
    """Linear runs its own schedule; stick-breaking's product over later keys is left tiled."""
    var = attncc.variant(mask=causal, normalizer=normalizer)
    assert var.plan.decode_split is None
    assert not decode(var.ir).modified


def test_topk_blocks_not_split() -> None:
    var = attncc.variant(mask=causal, routing=attncc.TopKBlocks(block=8, k=2))
    assert var.plan.decode_split is None


def test_num_splits_rule() -> None:
    """Enough splits to fill ``target_programs`` rows, never chunks shorter than ``min_chunk``."""
    rule = DecodeSplit(min_chunk=256, target_programs=256)
    assert rule.num_splits(1, 8, 32768) == 32  # 8 rows want 32 splits; 128 chunks would be allowed
    assert rule.num_splits(1, 8, 2048) == 8  # limited by chunk length
    assert rule.num_splits(64, 32, 32768) == 1  # plenty of rows already
    assert rule.num_splits(1, 1, 100) == 1


# ---- the runtime against the reference ------------------------------------------------


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
@pytest.mark.parametrize(("Lq", "Lkv"), [(1, 50), (4, 53), (16, 40)])
def test_softmax_causal_decode(num_splits: int, Lq: int, Lkv: int) -> None:
    """Decoding against a cache: ``q_offset = Lkv - Lq``, splits that do not divide ``Lkv``."""
    check(attncc.variant(mask=causal), Lq, Lkv, num_splits, Lkv - Lq)


@pytest.mark.parametrize("num_splits", [2, 5])
def test_empty_splits_and_rows(num_splits: int) -> None:
    """A window leaves most splits empty for every row; rows at q_offset 0 see one key."""
    check(attncc.variant(mask=window), 6, 41, num_splits, 35)
    check(attncc.variant(mask=window), 6, 41, num_splits, 0)


def test_fully_masked_rows() -> None:
    """A mask that keeps nothing for some rows: o = 0 and lse = -inf there, never NaN."""

    def none_before_3(b, h, q_idx, kv_idx):
        return (q_idx >= 3) & (kv_idx <= q_idx)

    check(attncc.variant(mask=none_before_3), 6, 30, 3, 0)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_sink_added_once_at_merge(num_splits: int) -> None:
    """``lse = log(exp(sink) + sum exp(s))``: one sink however many splits."""
    sink = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    check(attncc.variant(mask=causal, normalizer=attncc.Softmax(sink=sink)), 3, 37, num_splits, 34)

    def nothing(b, h, q_idx, kv_idx):
        return kv_idx > q_idx + 100

    check(attncc.variant(mask=nothing, normalizer=attncc.Softmax(sink=sink)), 3, 37, num_splits, 0)


def test_row_shift_restored_in_lse() -> None:
    """Simplify dropped the row term ``0.05 * q_idx + bias[h]``; the merge adds it back to the lse."""
    bias = torch.tensor([0.5, -0.25, 0.125, 1.0], dtype=torch.float64)

    def shifted(score, b, h, q_idx, kv_idx):
        return score + 0.05 * q_idx + bias[h]

    var = attncc.variant(shifted, mask=causal)
    assert var.plan.regions[0].row_shift is not None
    check(var, 4, 45, 3, 41)


@pytest.mark.parametrize("normalizer", ["sigmoid", "relu", attncc.Pointwise("softplus", normalize=False)])
def test_other_splittable_normalizers(normalizer: object) -> None:
    """Sigmoid and pointwise partials merge by plain sums (numerators, and denominators)."""
    check(attncc.variant(mask=causal, normalizer=normalizer), 5, 33, 4, 28, lse=False)


def test_topk_heads_weights_applied_after_merge() -> None:
    gen = torch.Generator().manual_seed(3)
    router = torch.randn(2, 5, HQ, generator=gen, dtype=torch.float64)
    var = attncc.variant(mask=causal, routing=attncc.TopKHeads(k=2, router=router))
    check(var, 5, 33, 3, 28, lse=False)


def test_rejects_linear() -> None:
    var = attncc.variant(mask=causal, normalizer=attncc.Linear())
    q, k, v = qkv(2, 8)
    with pytest.raises(ValueError, match="split-KV"):
        split_kv_attention(var.plan.regions[0], q, k, v, {}, num_splits=2)


def test_specialize_for_a_decoding_shape() -> None:
    """At run time a 1-query call over a 32k cache becomes a split-KV plan; a prefill does not."""
    from attncc.passes.decode import specialize

    plan = attncc.variant(mask=causal).plan
    decoding = specialize(plan, 1, 8, 1, 32768)
    assert decoding.strategy == "split_kv" and "32 key splits" in decoding.notes[-1]
    assert specialize(plan, 1, 8, 2048, 32768) is plan
    linear = attncc.variant(mask=causal, normalizer=attncc.Linear()).plan
    assert specialize(linear, 1, 8, 1, 32768) is linear
