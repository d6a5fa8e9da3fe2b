"""lower_linear: the pass picks the schedule; the chunked/global runtime matches the dense formula."""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.codegen.reference.attention import attention
from attncc.passes.lower_linear import linear_attention, lower_linear
from attncc.testing import assert_close_to_reference


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def strict(b, h, q_idx, kv_idx):
    return q_idx > kv_idx


def window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 4)


def qkv(Lq: int, Lkv: int, Hq: int = 4, Hkv: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, Hq, Lq, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, Hkv, Lkv, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, Hkv, Lkv, 5, generator=gen, dtype=torch.float64)
    return q, k, v


def dense(var: attncc.Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
    """The reference backend's dense formula (materialises ``Lq x Lkv``) for the variant's region."""
    tensors = {n: t.double() for n, t in var.tensors.items()}
    return attention(var.plan.regions[0], q, k, v, tensors, scale=None, q_offset=q_offset)[0]


def run_lowered(var: attncc.Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int,
                q_offset: int = 0) -> torch.Tensor:
    region = var.plan.regions[0]
    norm = region.normalizer
    kind = None
    if region.linear.strategy == "linear_chunked":
        kind = "strict" if region.linear.causal_strict else "inclusive"
    decay = var.tensors[norm.decay.name].double() if norm.decay is not None else None
    return linear_attention(q, k, v, feature=norm.feature_map, normalize=norm.normalize, decay=decay, causal=kind,
                            chunk=chunk, q_offset=q_offset, tensors=var.tensors)


# ---- the pass ------------------------------------------------------------------------


def test_causal_linear_becomes_chunked() -> None:
    """A causal Linear region gets the chunked recurrence and the plan its strategy."""
    var = attncc.variant(mask=causal, normalizer=attncc.Linear())
    assert var.plan.strategy == "linear_chunked"
    assert var.plan.regions[0].linear.strategy == "linear_chunked"
    assert not var.plan.regions[0].linear.causal_strict


def test_strict_causal_is_recorded() -> None:
    var = attncc.variant(mask=strict, normalizer=attncc.Linear())
    assert var.plan.regions[0].linear.causal_strict


def test_unmasked_linear_becomes_global() -> None:
    var = attncc.variant(normalizer=attncc.Linear("relu"))
    assert var.plan.strategy == "linear_global"


def test_other_masks_stay_quadratic() -> None:
    """A window mask is not the causal prefix the recurrence assumes: keep the masked form."""
    var = attncc.variant(mask=window, normalizer=attncc.Linear())
    assert var.plan.strategy == "tiled" and var.plan.regions[0].linear is None
    assert any("non-causal mask" in note for note in var.plan.notes)


def test_softmax_untouched() -> None:
    var = attncc.variant(mask=causal)
    assert not lower_linear(var.ir).modified


# ---- the runtime algorithm against the dense formula ----------------------------------


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("use_decay", [False, True])
def test_chunked_matches_dense(chunk: int, normalize: bool, use_decay: bool) -> None:
    """Chunk sizes that do not divide L (37), with and without decay and normalisation, GQA 4/2."""
    decay = torch.tensor([0.9, 0.5, 1.0, 0.97], dtype=torch.float64) if use_decay else None
    var = attncc.variant(mask=causal, normalizer=attncc.Linear("elu1", normalize=normalize, decay=decay))
    q, k, v = qkv(37, 37)
    assert_close_to_reference(run_lowered(var, q, k, v, chunk), dense(var, q, k, v), None, 37)


@pytest.mark.parametrize("feature", ["relu", "identity", lambda x: x * x])
def test_chunked_feature_maps(feature: object) -> None:
    """relu can zero a whole row's denominator (o = 0 then); identity and traced maps work too."""
    var = attncc.variant(mask=strict, normalizer=attncc.Linear(feature, normalize=feature == "relu"))
    q, k, v = qkv(21, 21, seed=3)
    assert_close_to_reference(run_lowered(var, q, k, v, 4), dense(var, q, k, v), None, 21)


@pytest.mark.parametrize(("Lq", "Lkv", "q_offset"), [(5, 29, 24), (1, 29, 28), (7, 29, 10), (6, 20, 20)])
def test_chunked_with_query_offset(Lq: int, Lkv: int, q_offset: int) -> None:
    """Decoding against a cache (``q_offset = Lkv - Lq``), mid-sequence queries, and queries past the keys."""
    decay = torch.tensor([0.8, 0.95, 0.6, 1.0], dtype=torch.float64)
    var = attncc.variant(mask=causal, normalizer=attncc.Linear(decay=decay))
    q, k, v = qkv(Lq, Lkv, seed=5)
    got = run_lowered(var, q, k, v, 8, q_offset=q_offset)
    assert_close_to_reference(got, dense(var, q, k, v, q_offset=q_offset), None, Lkv)


@pytest.mark.parametrize("normalize", [True, False])
def test_global_matches_dense(normalize: bool) -> None:
    var = attncc.variant(normalizer=attncc.Linear("elu1", normalize=normalize))
    q, k, v = qkv(13, 31)
    assert_close_to_reference(run_lowered(var, q, k, v, 64), dense(var, q, k, v), None, 31)


def test_long_decay_underflow_is_harmless() -> None:
    """A strong decay over 300 positions underflows the far terms to 0, as the dense formula does."""
    decay = torch.tensor([0.01, 0.5, 0.9, 1.0], dtype=torch.float64)
    var = attncc.variant(mask=causal, normalizer=attncc.Linear(decay=decay, normalize=False))
    q, k, v = qkv(300, 300, seed=7)
    assert_close_to_reference(run_lowered(var, q, k, v, 32), dense(var, q, k, v), None, 300)


def test_bad_arguments() -> None:
    q, k, v = qkv(4, 4)
    with pytest.raises(ValueError, match="chunk"):
        linear_attention(q, k, v, causal="inclusive", chunk=0)
    with pytest.raises(ValueError, match="causal"):
        linear_attention(q, k, v, decay=torch.ones(4))
