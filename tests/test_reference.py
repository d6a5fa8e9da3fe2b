"""The reference backend against formulas written here, independently, in float64.

Every expected value below is computed from SEMANTICS.md's formulas with plain torch
(``einsum``, loops, ``scaled_dot_product_attention``), never with attncc's own helpers.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from test_trace import HYPOTHESIS, NAMESPACE, _term

import attncc
from attncc.codegen.reference.attention import run_plan, topk_blocks_selection, topk_heads_weights
from attncc.ir import nodes

f64 = torch.float64


def _qkv(B=2, Hq=4, Hkv=2, Lq=7, Lkv=9, D=8, Dv=6, dtype=f64):
    q = torch.randn(B, Hq, Lq, D, dtype=dtype)
    k = torch.randn(B, Hkv, Lkv, D, dtype=dtype)
    v = torch.randn(B, Hkv, Lkv, Dv, dtype=dtype)
    return q, k, v


def _grid(B: int, H: int, Lq: int, Lkv: int, q_offset: int = 0) -> tuple[torch.Tensor, ...]:
    return (torch.arange(B).view(-1, 1, 1, 1), torch.arange(H).view(1, -1, 1, 1),
            (torch.arange(Lq) + q_offset).view(1, 1, -1, 1), torch.arange(Lkv).view(1, 1, 1, -1))


def _heads(k: torch.Tensor, Hq: int) -> torch.Tensor:
    """kv head of each query head, by explicit index (GQA: h // (Hq // Hkv))."""
    return k[:, torch.arange(Hq) // (Hq // k.shape[1])]


def _raw_scores(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return scale * torch.einsum("bhid,bhjd->bhij", q.to(f64), _heads(k, q.shape[1]).to(f64))


def _mask(fn, q: torch.Tensor, k: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
    B, H, Lq, _ = q.shape
    shape = (B, H, Lq, k.shape[2])
    if fn is None:
        return torch.ones(shape, dtype=torch.bool)
    return torch.broadcast_to(fn(*_grid(B, H, Lq, k.shape[2], q_offset)), shape)


def _apply(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bhij,bhjd->bhid", p, _heads(v, p.shape[1]).to(f64))


def _run(var, q, k, v, **kwargs):
    return var(q, k, v, backend="reference", **kwargs)


def _row_normalize(w: torch.Tensor) -> torch.Tensor:
    """w / row sum, and 0 where the row sums to exactly 0 (SEMANTICS.md)."""
    total = w.sum(-1, keepdim=True)
    return torch.where(total != 0, w / total, 0.0)


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got.to(f64), expected.to(f64), rtol=1e-10, atol=1e-10)


causal = lambda b, h, q, k: q >= k
strict_causal = lambda b, h, q, k: q > k
window = lambda b, h, q, k: (q - k).abs() <= 2
DOCS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
document = lambda b, h, q, k: DOCS[q] == DOCS[k]
# rows 0 and 1 see nothing; row i >= 2 sees keys <= i - 2
empty_rows = lambda b, h, q, k: k <= q - 2


# ---- softmax -----------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [None, causal, window, document], ids=["full", "causal", "window", "document"])
@pytest.mark.parametrize("Hkv", [4, 2, 1])
def test_softmax_matches_sdpa(mask, Hkv: int) -> None:
    q, k, v = _qkv(Hkv=Hkv, Lq=9, Lkv=9)
    var = attncc.variant(mask=mask)
    expected = F.scaled_dot_product_attention(q, _heads(k, 4), _heads(v, 4), attn_mask=_mask(mask, q, k))
    _close(_run(var, q, k, v), expected)


def test_softmax_with_score_function_matches_sdpa_float_bias() -> None:
    q, k, v = _qkv()
    slopes = torch.rand(4, dtype=f64)
    var = attncc.variant(lambda s, b, h, qi, ki: s - slopes[h] * (qi - ki).abs(), mask=causal)
    _, _, i, j = _grid(2, 4, 7, 9)
    bias = torch.where(i >= j, -slopes.view(1, -1, 1, 1) * (i - j).abs(), -math.inf)
    expected = F.scaled_dot_product_attention(q, _heads(k, 4), _heads(v, 4), attn_mask=bias)
    _close(_run(var, q, k, v), expected)


def test_softmax_custom_scale_and_lse() -> None:
    q, k, v = _qkv()
    var = attncc.variant(mask=causal)
    o, lse = _run(var, q, k, v, scale=0.3, return_lse=True)
    s = _raw_scores(q, k, 0.3).masked_fill(~_mask(causal, q, k), -math.inf)
    _close(o, _apply(torch.softmax(s, -1), v))
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.to(f64), torch.logsumexp(s, -1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sink_value", [None, 0.0])
def test_softmax_with_sinks(sink_value: float | None) -> None:
    q, k, v = _qkv()
    sink = torch.randn(4, dtype=f64) if sink_value is None else torch.full((4,), sink_value, dtype=f64)
    var = attncc.variant(mask=empty_rows, normalizer=attncc.Softmax(sink=sink))
    o, lse = _run(var, q, k, v, return_lse=True)
    keep = _mask(empty_rows, q, k)
    e = torch.where(keep, torch.exp(_raw_scores(q, k)), 0.0)
    denominator = torch.exp(sink).view(1, -1, 1, 1) + e.sum(-1, keepdim=True)
    _close(o, _apply(e / denominator, v))
    torch.testing.assert_close(lse.to(f64), torch.log(denominator.squeeze(-1)), rtol=1e-6, atol=1e-6)
    # rows 0 and 1 are fully masked: o = 0 and lse = sink_h
    assert torch.equal(o[:, :, :2], torch.zeros_like(o[:, :, :2]))
    torch.testing.assert_close(lse[:, :, 0].to(f64), sink.expand(2, 4), rtol=1e-6, atol=1e-6)


# ---- sigmoid and pointwise -----------------------------------------------------------------


@pytest.mark.parametrize("bias", [None, 0.7])
@pytest.mark.parametrize("mask", [None, causal], ids=["full", "causal"])
def test_sigmoid(bias: float | None, mask) -> None:
    q, k, v = _qkv()
    norm = "sigmoid" if bias is None else attncc.Sigmoid(bias=bias)
    var = attncc.variant(mask=mask, normalizer=norm)
    b = -math.log(k.shape[2]) if bias is None else bias  # full key length, whatever the mask
    p = torch.where(_mask(mask, q, k), torch.sigmoid(_raw_scores(q, k) + b), 0.0)
    _close(_run(var, q, k, v), _apply(p, v))


@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid", "relu", "stick_breaking"])
def test_minus_inf_score_counts_as_masked(normalizer: str) -> None:
    q, k, v = _qkv()
    via_score = attncc.variant(lambda s, b, h, qi, ki: torch.where(qi >= ki, s, -float("inf")), normalizer=normalizer)
    via_mask = attncc.variant(mask=causal, normalizer=normalizer)
    _close(_run(via_score, q, k, v), _run(via_mask, q, k, v))


PHI = {"softplus": F.softplus, "relu": torch.relu, "relu2": lambda s: torch.relu(s) ** 2}


@pytest.mark.parametrize("name", sorted(PHI))
def test_named_pointwise_normalizers(name: str) -> None:
    q, k, v = _qkv()
    var = attncc.variant(mask=causal, normalizer=name)
    w = torch.where(_mask(causal, q, k), PHI[name](_raw_scores(q, k)), 0.0)
    _close(_run(var, q, k, v), _apply(_row_normalize(w), v))


@pytest.mark.parametrize("name", ["relu", "relu2"])
def test_pointwise_zero_row_sum_gives_zero(name: str) -> None:
    """All scores negative: relu weights sum to 0 on every row, so o = 0 (never NaN)."""
    q, k, v = _qkv()
    var = attncc.variant(lambda s, b, h, qi, ki: -s.abs() - 1.0, normalizer=name)
    o = _run(var, q, k, v)
    assert torch.equal(o, torch.zeros_like(o))


@pytest.mark.parametrize("normalize", [False, True])
def test_custom_pointwise(normalize: bool) -> None:
    q, k, v = _qkv()
    var = attncc.variant(mask=window, normalizer=attncc.Pointwise(lambda s: torch.exp(-s * s) + 0.5 * torch.tanh(s),
                                                                    normalize=normalize))
    s = _raw_scores(q, k)
    w = torch.where(_mask(window, q, k), torch.exp(-s * s) + 0.5 * torch.tanh(s), 0.0)
    if normalize:
        w = _row_normalize(w)
    _close(_run(var, q, k, v), _apply(w, v))


# ---- stick-breaking ----------------------------------------------------------------------------


def _stick_breaking_loops(s: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """p_ij = beta_ij * prod_{t kept, t > j} (1 - beta_it), beta = sigmoid(s): direct O(L^2) loops."""
    beta = torch.sigmoid(s)
    p = torch.zeros_like(s)
    B, H, Lq, Lkv = s.shape
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                for j in range(Lkv):
                    if not keep[b, h, i, j]:
                        continue
                    remaining = 1.0
                    for t in range(j + 1, Lkv):
                        if keep[b, h, i, t]:
                            remaining *= 1 - float(beta[b, h, i, t])
                    p[b, h, i, j] = float(beta[b, h, i, j]) * remaining
    return p


@pytest.mark.parametrize("mask", [causal, strict_causal, None], ids=["with_self", "without_self", "full"])
def test_stick_breaking_matches_product_formula(mask) -> None:
    q, k, v = _qkv(B=1, Hq=2, Hkv=1, Lq=6, Lkv=6)
    var = attncc.variant(mask=mask, normalizer="stick_breaking")
    keep = _mask(mask, q, k)
    _close(_run(var, q, k, v), _apply(_stick_breaking_loops(_raw_scores(q, k), keep), v))


# ---- linear ------------------------------------------------------------------------------------

FEATURE_MAPS = {"elu1": lambda x: F.elu(x) + 1, "relu": torch.relu, "identity": lambda x: x}


@pytest.mark.parametrize("feature_map", ["elu1", "relu", "identity", "callable"])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear(feature_map: str, normalize: bool) -> None:
    q, k, v = _qkv()
    phi = (lambda x: F.softplus(x) * 2) if feature_map == "callable" else FEATURE_MAPS[feature_map]
    spec = (lambda x: F.softplus(x) * 2) if feature_map == "callable" else feature_map
    var = attncc.variant(mask=causal, normalizer=attncc.Linear(spec, normalize=normalize))
    a = torch.einsum("bhid,bhjd->bhij", phi(q), phi(_heads(k, 4)))  # no scale for linear attention
    a = torch.where(_mask(causal, q, k), a, 0.0)
    if normalize:
        a = _row_normalize(a)
    _close(_run(var, q, k, v, scale=0.5), _apply(a, v))


def test_linear_with_decay_and_offset() -> None:
    q, k, v = _qkv(Lq=4, Lkv=9)
    decay = torch.tensor([1.0, 0.9, 0.5, 0.25], dtype=f64)
    var = attncc.variant(mask=causal, normalizer=attncc.Linear("elu1", decay=decay))
    _, _, i, j = _grid(2, 4, 4, 9, q_offset=5)
    a = torch.einsum("bhid,bhjd->bhij", F.elu(q) + 1, F.elu(_heads(k, 4)) + 1)
    a = torch.where(i >= j, a * decay.view(1, -1, 1, 1) ** (i - j).clamp(min=0), 0.0)
    _close(_run(var, q, k, v, q_offset=5), _apply(a / a.sum(-1, keepdim=True), v))


def test_linear_decay_requires_causal_mask() -> None:
    with pytest.raises(ValueError, match="causal"):
        attncc.variant(mask=window, normalizer=attncc.Linear(decay=torch.full((4,), 0.5)))


# ---- TopKBlocks (MoBA) -------------------------------------------------------------------------


def _topk_blocks_loops(q, k, block, top, per, causal_rules, q_offset=0):
    """Token-level selection [B, Hq, Lq, Lkv] by SEMANTICS.md, in loops."""
    B, Hq, Lq, _ = q.shape
    kk = _heads(k, Hq).to(f64)
    Lkv = k.shape[2]
    n_blocks = -(-Lkv // block)
    selected = torch.zeros(B, Hq, Lq, Lkv, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            means = [kk[b, h, J * block: min((J + 1) * block, Lkv)].mean(0) for J in range(n_blocks)]
            for i in range(Lq):
                qi = q_offset + i
                if per == "token":
                    query = q[b, h, i].to(f64)
                else:
                    members = [r for r in range(Lq) if (q_offset + r) // block == qi // block]
                    query = q[b, h, members].to(f64).mean(0)
                gates = [float(query @ m) for m in means]
                eligible = [J for J in range(n_blocks) if not causal_rules or J * block <= qi]
                if causal_rules:
                    own = qi // block
                    rest = sorted((J for J in eligible if J != own), key=lambda J: (-gates[J], J))
                    chosen = [own, *rest][:top]
                else:
                    chosen = sorted(eligible, key=lambda J: (-gates[J], J))[:top]
                for J in chosen:
                    selected[b, h, i, J * block: min((J + 1) * block, Lkv)] = True
    return selected


@pytest.mark.parametrize("per", ["token", "query_block"])
@pytest.mark.parametrize("causal_rules", [True, False])
def test_topk_blocks_selection_matches_loops(per: str, causal_rules: bool) -> None:
    q, k, _ = _qkv(Lq=11, Lkv=11)  # last block partial (block 3)
    route = nodes.TopKBlocksRoute(block=3, k=2, per=per, causal=causal_rules)
    got = topk_blocks_selection(route, causal_rules, q, k, 0)
    assert torch.equal(got, _topk_blocks_loops(q, k, 3, 2, per, causal_rules))


@pytest.mark.parametrize("per", ["token", "query_block"])
def test_topk_blocks_decoding_offset(per: str) -> None:
    q, k, _ = _qkv(Lq=3, Lkv=13)
    route = nodes.TopKBlocksRoute(block=4, k=2, per=per, causal=True)
    got = topk_blocks_selection(route, True, q, k, 10)
    assert torch.equal(got, _topk_blocks_loops(q, k, 4, 2, per, True, q_offset=10))


def test_topk_blocks_causal_rules() -> None:
    q, k, _ = _qkv(B=1, Hq=2, Hkv=2, Lq=12, Lkv=12)
    route = nodes.TopKBlocksRoute(block=4, k=2, per="token", causal=True)
    sel = topk_blocks_selection(route, True, q, k, 0)
    i = torch.arange(12).view(-1, 1)
    j = torch.arange(12).view(1, -1)
    assert sel[..., (j // 4 == i // 4).expand(12, 12)].all(), "own block always selected"
    assert not sel[..., (j // 4 > i // 4).expand(12, 12)].any(), "future blocks never selected"
    # rows 0..3 have one eligible block (fewer than k): exactly that one
    assert torch.equal(sel[..., :4, :], (j < 4).expand(1, 2, 4, 12))
    # own block counts towards k: rows 4..7 have two eligible blocks, k=2 -> both
    assert sel[..., 4:8, :8].all()


def test_topk_blocks_ties_go_to_lower_index_and_partial_block_is_averaged() -> None:
    B, H, L, D = 1, 1, 10, 4
    q = torch.ones(B, H, 1, D, dtype=f64)
    k = torch.zeros(B, H, L, D, dtype=f64)
    k[..., 0:3, :] = 1.0  # block 0 mean 1
    k[..., 3:6, :] = 1.0  # block 1 mean 1 (tie with block 0)
    k[..., 9, :] = 1.0  # partial block 3 = [9]: mean over its one real token is 1 (tie again)
    route = nodes.TopKBlocksRoute(block=3, k=2, per="token", causal=False)
    sel = topk_blocks_selection(route, False, q, k, 0)[0, 0, 0]
    assert sel[:6].all() and not sel[6:].any(), "ties resolve towards the lower block index"
    k[..., 9, :] = 2.0  # now block 3 (a single real token) has the largest mean
    sel = topk_blocks_selection(route, False, q, k, 0)[0, 0, 0]
    assert sel[9] and sel[:3].all() and not sel[3:9].any()


def test_topk_blocks_k_larger_than_block_count_is_an_error() -> None:
    q, k, v = _qkv(Lkv=9)
    var = attncc.variant(routing=attncc.TopKBlocks(block=4, k=4))  # ceil(9 / 4) = 3 blocks
    with pytest.raises(ValueError, match="k=4"):
        _run(var, q, k, v)


@pytest.mark.parametrize("per", ["token", "query_block"])
def test_topk_blocks_variant_output(per: str) -> None:
    q, k, v = _qkv(Lq=10, Lkv=10)
    var = attncc.variant(mask=causal, routing=attncc.TopKBlocks(block=3, k=2, per=per))
    keep = _mask(causal, q, k) & _topk_blocks_loops(q, k, 3, 2, per, True)
    s = _raw_scores(q, k).masked_fill(~keep, -math.inf)
    _close(_run(var, q, k, v), _apply(torch.softmax(s, -1), v))


# ---- TopKHeads (MoH) ---------------------------------------------------------------------------


def test_topk_heads_weights_rules() -> None:
    router = torch.tensor([[[0.5, 2.0, 2.0, -1.0], [1.0, 1.0, 1.0, 1.0]]], dtype=f64)  # [B=1, Lq=2, Hq=4]
    route = nodes.TopKHeadsRoute(k=2, router=None)  # type: ignore[arg-type]
    w = topk_heads_weights(route, router)[0, :, :, 0]  # [Hq, Lq]
    torch.testing.assert_close(w[:, 0], torch.tensor([0, 0.5, 0.5, 0], dtype=f64))
    torch.testing.assert_close(w[:, 1], torch.tensor([0.5, 0.5, 0, 0], dtype=f64))  # ties -> lower heads


def test_topk_heads_variant_output() -> None:
    q, k, v = _qkv(B=2, Hq=4, Lq=5)
    router = torch.randn(2, 5, 4, dtype=f64)
    var = attncc.variant(mask=causal, routing=attncc.TopKHeads(2, router))
    s = _raw_scores(q, k).masked_fill(~_mask(causal, q, k), -math.inf)
    o = _apply(torch.softmax(s, -1), v)
    expected = torch.zeros_like(o)
    for b in range(2):
        for i in range(5):
            logits = router[b, i]
            top = sorted(range(4), key=lambda h: (-float(logits[h]), h))[:2]
            weights = torch.softmax(logits[top], 0)
            for w, h in zip(weights, top, strict=True):
                expected[b, h, i] = w * o[b, h, i]
    _close(_run(var, q, k, v), expected)


# ---- shapes: GQA, odd lengths, cross attention, decoding --------------------------------------


@pytest.mark.parametrize("ratio", [1, 2, 4, 8])
def test_gqa_ratios(ratio: int) -> None:
    q, k, v = _qkv(Hq=8, Hkv=8 // ratio, Lq=5, Lkv=5)
    expected = torch.stack([F.scaled_dot_product_attention(q[:, h], k[:, h // ratio], v[:, h // ratio],
                                                           is_causal=True) for h in range(8)], dim=1)
    _close(_run(attncc.variant(mask=causal), q, k, v), expected)


@pytest.mark.parametrize("Lq,Lkv", [(1, 1), (3, 13), (13, 3), (17, 17)])
def test_odd_and_cross_lengths(Lq: int, Lkv: int) -> None:
    q, k, v = _qkv(Lq=Lq, Lkv=Lkv, D=5, Dv=3)
    expected = F.scaled_dot_product_attention(q, _heads(k, 4), _heads(v, 4))
    _close(_run(attncc.variant(), q, k, v), expected)


@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid", "relu", "stick_breaking"])
def test_decoding_equals_last_row_of_prefill(normalizer: str) -> None:
    q, k, v = _qkv(Lq=9, Lkv=9)
    var = attncc.variant(mask=causal, normalizer=normalizer)
    full = _run(var, q, k, v)
    last = _run(var, q[:, :, -1:], k, v, q_offset=8)
    _close(last, full[:, :, -1:])


# ---- fully masked rows, lse, dtypes ----------------------------------------------------------


@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid", "softplus", "relu", "relu2", "stick_breaking"])
def test_fully_masked_rows_are_zero(normalizer: str) -> None:
    q, k, v = _qkv()
    o = _run(attncc.variant(mask=empty_rows, normalizer=normalizer), q, k, v)
    assert not torch.isnan(o).any()
    assert torch.equal(o[:, :, :2], torch.zeros_like(o[:, :, :2]))


def test_linear_fully_masked_rows_are_zero() -> None:
    q, k, v = _qkv()
    o = _run(attncc.variant(mask=lambda b, h, qi, ki: ki < qi - 1, normalizer=attncc.Linear()), q, k, v)
    assert not torch.isnan(o).any() and torch.equal(o[:, :, :2], torch.zeros_like(o[:, :, :2]))


def test_fully_masked_lse_is_minus_inf() -> None:
    q, k, v = _qkv()
    o, lse = _run(attncc.variant(mask=empty_rows), q, k, v, return_lse=True)
    assert torch.equal(lse[:, :, :2], torch.full_like(lse[:, :, :2], -math.inf))
    assert torch.isfinite(lse[:, :, 2:]).all() and not torch.isnan(o).any()


@pytest.mark.parametrize("normalizer", ["sigmoid", "relu", "stick_breaking", attncc.Linear()], ids=str)
def test_return_lse_outside_softmax_family_is_an_error(normalizer) -> None:
    q, k, v = _qkv()
    var = attncc.variant(mask=causal, normalizer=normalizer)
    with pytest.raises(ValueError, match="return_lse"):
        _run(var, q, k, v, return_lse=True)


@pytest.mark.parametrize("dtype,floor", [(torch.float32, 2e-5), (torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
def test_low_precision_inputs(dtype: torch.dtype, floor: float) -> None:
    """Output keeps the input dtype; its error is within FlashAttention's rule, with SDPA run
    in the same dtype as the comparison (max(2 * e_sdpa, floor))."""
    q, k, v = _qkv(Lq=16, Lkv=16, D=16, Dv=16)
    ql, kl, vl = q.to(dtype), k.to(dtype), v.to(dtype)
    exact = F.scaled_dot_product_attention(ql.double(), _heads(kl, 4).double(), _heads(vl, 4).double(), is_causal=True)
    o = _run(attncc.variant(mask=causal), ql, kl, vl)
    assert o.dtype == dtype
    err = (o.double() - exact).abs().max().item()
    if dtype == torch.float32:
        assert err <= floor
        return
    sdpa = F.scaled_dot_product_attention(ql, _heads(kl, 4), _heads(vl, 4), is_causal=True)
    e_sdpa = (sdpa.double() - exact).abs().max().item()
    assert err <= max(2 * e_sdpa, floor)


def test_lse_is_float32_for_half_inputs() -> None:
    q, k, v = _qkv(dtype=torch.float16)
    o, lse = _run(attncc.variant(mask=causal), q, k, v, return_lse=True)
    assert o.dtype == torch.float16 and lse.dtype == torch.float32 and lse.shape == q.shape[:3]


# ---- autograd --------------------------------------------------------------------------------


def _tiny(requires_grad: bool = True):
    q, k, v = _qkv(B=1, Hq=2, Hkv=1, Lq=3, Lkv=4, D=3, Dv=2)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid", "softplus", "stick_breaking"])
def test_gradcheck_qkv(normalizer: str) -> None:
    var = attncc.variant(mask=lambda b, h, qi, ki: ki <= qi + 1, normalizer=normalizer)
    assert torch.autograd.gradcheck(lambda q, k, v: _run(var, q, k, v), _tiny())


def test_gradcheck_linear() -> None:
    var = attncc.variant(mask=causal, normalizer=attncc.Linear("elu1"))
    assert torch.autograd.gradcheck(lambda q, k, v: _run(var, q, k, v), _tiny())


def test_gradcheck_captured_bias_table_and_sinks() -> None:
    q, k, v = _tiny()
    table = torch.randn(2, 7, dtype=f64, requires_grad=True)
    sink = torch.randn(2, dtype=f64, requires_grad=True)
    var = attncc.variant(lambda s, b, h, qi, ki: s + table[h, qi - ki + 3], mask=causal,
                         normalizer=attncc.Softmax(sink=sink))
    names = {id(t): name for name, t in var.tensors.items()}
    table_name, sink_name = names[id(table)], names[id(sink)]

    def run(q, k, v, table, sink):
        ops = {"q": q, "k": k, "v": v}
        return run_plan(var.plan, ops, {table_name: table, sink_name: sink}, scale=None, q_offset=1,
                        return_lse=False)

    assert torch.autograd.gradcheck(run, (q, k, v, table, sink))


@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid", "relu", "stick_breaking"])
def test_no_nan_gradients_on_fully_masked_rows(normalizer: str) -> None:
    q, k, v = _qkv()
    for t in (q, k, v):
        t.requires_grad_(True)
    o, = (_run(attncc.variant(mask=empty_rows, normalizer=normalizer), q, k, v),)
    o.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, :2], torch.zeros_like(q.grad[:, :, :2]))


def test_no_nan_gradients_through_lse_of_masked_rows_with_sinks() -> None:
    q, k, v = _qkv()
    sink = torch.randn(4, dtype=f64, requires_grad=True)
    q.requires_grad_(True)
    o, lse = _run(attncc.variant(mask=empty_rows, normalizer=attncc.Softmax(sink=sink)), q, k, v, return_lse=True)
    (o.sum() + lse.sum()).backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(sink.grad).all()


# ---- empty sequences -------------------------------------------------------------------------


@pytest.mark.parametrize("Lq,Lkv", [(0, 5), (5, 0), (0, 0)])
def test_empty_sequences(Lq: int, Lkv: int) -> None:
    q, k, v = _qkv(Lq=Lq, Lkv=Lkv)
    o, lse = _run(attncc.variant(mask=causal), q, k, v, return_lse=True)
    assert o.shape == (2, 4, Lq, 6) and torch.equal(o, torch.zeros_like(o))
    assert lse.shape == (2, 4, Lq) and (lse == -math.inf).all()
    sink = torch.randn(4, dtype=f64)
    o, lse = _run(attncc.variant(normalizer=attncc.Softmax(sink=sink)), q, k, v, return_lse=True)
    assert torch.equal(o, torch.zeros_like(o))
    torch.testing.assert_close(lse, sink.float().view(1, 4, 1).expand(2, 4, Lq))


def test_a_combine_of_empty_attentions_is_its_expression_of_zeros() -> None:
    """With no keys each attention is 0, and ``1 / (2 + o) + offset`` is 0.75, not 0."""
    g = attncc.GraphBuilder("empty")
    q1, k1, v = g.inputs("q1", "k1", "v")
    offset = g.scalar("offset")
    program = g.build(1.0 / (2.0 + g.attention(q1, k1, v, mask=causal)) + offset)
    q, k, v_ = _qkv(Lkv=0)
    out = program(q1=q, k1=k, v=v_, offset=torch.tensor(0.25, dtype=f64))
    torch.testing.assert_close(out, torch.full_like(out, 0.75))


def test_an_empty_key_set_keeps_the_output_in_the_graph() -> None:
    """As torch's SDPA: with no keys, a loss over the zeros backpropagates zero gradients (the
    output had been cut from autograd), even where q holds inf."""
    q, k, v = (t.requires_grad_() for t in _qkv(Lkv=0))
    with torch.no_grad():
        q[0, 0, 0, 0] = math.inf
    o = _run(attncc.variant(mask=causal), q, k, v)
    assert o.requires_grad and torch.equal(o, torch.zeros_like(o))
    o.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q)) and k.grad is not None and v.grad is not None


@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid", "relu", "stick_breaking"])
def test_reference_kernel_itself_handles_empty_keys(normalizer: str) -> None:
    """run_plan directly (no Variant shortcut) on Lkv = 0 gives zeros, never NaN."""
    q, k, v = _qkv(Lkv=0)
    var = attncc.variant(mask=causal, normalizer=normalizer)
    o = run_plan(var.plan, {"q": q, "k": k, "v": v}, var.tensors, scale=None, q_offset=0, return_lse=False)
    assert torch.equal(o, torch.zeros(2, 4, 7, 6, dtype=f64))


# ---- against FlexAttention itself (CPU, eager, float64), through the whole pass pipeline -------
# Score functions below include what simplify rewrites (constant factors -> score_scale,
# row-only terms -> row_shift), so the pipeline plus the reference is checked end to end.

SLOPES = torch.rand(4, dtype=f64)
BIAS = torch.randn(4, 2 * 9 - 1, dtype=f64)
FLEX_CASES = {
    "alibi_causal": (lambda s, b, h, q, k: s - SLOPES[h] * (q - k).abs(), causal),
    "softcap_window": (lambda s, b, h, q, k: 10.0 * torch.tanh(s / 10.0), window),
    "constant_factor": (lambda s, b, h, q, k: s * 2.5, None),
    # NOTE: FlexAttention computes ``0.1 * k`` in float32 (int index times a Python float);
    # constants exact in float32 keep this comparison at float64 precision.
    "negative_factor": (lambda s, b, h, q, k: -0.5 * s + 0.125 * k, causal),
    "row_only_terms": (lambda s, b, h, q, k: s * 2 - 0.375 * q + SLOPES[h] * b, causal),
    "row_only_minus_inf": (lambda s, b, h, q, k: s + torch.where(q < 2, -float("inf"), 0.0), None),
    "bias_table_document": (lambda s, b, h, q, k: s + BIAS[h, q - k + 8], document),
    "masking_score": (lambda s, b, h, q, k: torch.where((q - k) % 3 == 0, s, -float("inf")), causal),
}


@pytest.mark.parametrize("name", sorted(FLEX_CASES))
def test_matches_flex_attention(name: str) -> None:
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    score_fn, mask = FLEX_CASES[name]
    q, k, v = _qkv(Lq=9, Lkv=9)
    block_mask = None if mask is None else create_block_mask(mask, 2, 4, 9, 9, device="cpu")
    with _quiet():
        expected, aux = flex_attention(q, k, v, score_mod=score_fn, block_mask=block_mask, enable_gqa=True,
                                       return_aux=AuxRequest(lse=True))
    o, lse = _run(attncc.variant(score_fn, mask=mask), q, k, v, return_lse=True)
    rows = torch.isfinite(aux.lse)
    _close(o[rows], expected[rows])
    assert torch.equal(o[~rows], torch.zeros_like(o[~rows])), "fully masked rows are zero"
    assert torch.equal(torch.isfinite(lse), rows)
    torch.testing.assert_close(lse[rows].to(f64), aux.lse[rows], rtol=1e-6, atol=1e-6)


def _quiet():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def context():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield

    return context()


def test_sigmoid_keeps_row_terms_and_factors() -> None:
    """Row-only terms do not cancel outside softmax: sigmoid(2s - 0.1 q - ln Lkv)."""
    q, k, v = _qkv()
    var = attncc.variant(lambda s, b, h, qi, ki: s * 2 - 0.1 * qi, mask=causal, normalizer="sigmoid")
    _, _, i, _ = _grid(2, 4, 7, 9)
    p = torch.where(_mask(causal, q, k), torch.sigmoid(2 * _raw_scores(q, k) - 0.1 * i.to(f64) - math.log(9)), 0.0)
    _close(_run(var, q, k, v), _apply(p, v))


def test_sinks_keep_row_terms() -> None:
    """With a sink the denominator holds exp(sink_h), which row terms do not shift."""
    q, k, v = _qkv()
    sink = torch.randn(4, dtype=f64)
    var = attncc.variant(lambda s, b, h, qi, ki: s - 0.3 * qi, mask=causal, normalizer=attncc.Softmax(sink=sink))
    _, _, i, _ = _grid(2, 4, 7, 9)
    e = torch.where(_mask(causal, q, k), torch.exp(_raw_scores(q, k) - 0.3 * i.to(f64)), 0.0)
    _close(_run(var, q, k, v), _apply(e / (torch.exp(sink).view(1, -1, 1, 1) + e.sum(-1, keepdim=True)), v))


def test_differential_attention() -> None:
    """o = softmax(q1 k1) v - lambda * softmax(q2 k2) v, one graph with a combine node."""
    g = attncc.GraphBuilder("diff")
    q1, k1, q2, k2, v = g.inputs("q1", "k1", "q2", "k2", "v")
    lam = g.scalar("lam")
    program = g.build(g.attention(q1, k1, v, mask=causal) - lam * g.attention(q2, k2, v, mask=causal))
    a, b, v_ = _qkv()
    c, d, _ = _qkv()
    out = program(q1=a, k1=b, q2=c, k2=d, v=v_, lam=torch.tensor(0.8, dtype=f64), backend="reference")
    keep = _mask(causal, a, b)

    def attend(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return _apply(torch.softmax(_raw_scores(q, k).masked_fill(~keep, -math.inf), -1), v_)

    _close(out, attend(a, b) - 0.8 * attend(c, d))


BACKEND_TVM = importlib.util.find_spec("tvm") is not None


def test_combine_operands_are_told_by_kind_not_name() -> None:
    """A scalar named ``offset`` (the prefix of ``o0``) and a combine of the second output alone
    failed to build or run; ``/`` and negation work on outputs and scalars alike."""
    a, b, v_ = _qkv()
    c, d, _ = _qkv()
    keep = _mask(causal, a, b)

    def attend(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return _apply(torch.softmax(_raw_scores(q, k).masked_fill(~keep, -math.inf), -1), v_)

    def build(combine):
        g = attncc.GraphBuilder("combined")
        q1, k1, q2, k2, v = g.inputs("q1", "k1", "q2", "k2", "v")
        offset = g.scalar("offset")
        return g.build(combine(g.attention(q1, k1, v, mask=causal), g.attention(q2, k2, v, mask=causal), offset))

    x = {"q1": a, "k1": b, "q2": c, "k2": d, "v": v_, "offset": torch.tensor(0.5, dtype=f64)}
    cases = [
        (lambda o1, o2, off: o1 - o2 + off, attend(a, b) - attend(c, d) + 0.5),
        (lambda o1, o2, off: 2.0 * o2, 2.0 * attend(c, d)),
        (lambda o1, o2, off: 1.0 / (2.0 + o1) - off / 4.0 * o2 + (-off) * o1 / off, 1.0 / (2.0 + attend(a, b))
         - 0.125 * attend(c, d) - attend(a, b)),
    ]
    for combine, want in cases:
        _close(build(combine)(**x, backend="reference"), want)
        if BACKEND_TVM:  # the same operands through the TVM backend's plan runner, in float32
            got = build(combine)(**{n: t.float() for n, t in x.items()}, backend="tvm")
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


# ---- attncc.testing: the tolerance helpers every backend test uses -----------------------------


def test_assert_close_rejects_wrong_infinities_nan_and_shape() -> None:
    from attncc.testing import assert_close_to_reference

    ref = torch.tensor([1.0, -math.inf], dtype=f64)
    assert_close_to_reference(torch.tensor([1.0, -math.inf]), ref, None, 16)
    for bad in ([1.0, math.inf], [1.0, 0.0], [1.0, math.nan], [1.001, -math.inf]):
        with pytest.raises(AssertionError):
            assert_close_to_reference(torch.tensor(bad), ref, None, 16)
    with pytest.raises(AssertionError, match="shape"):
        assert_close_to_reference(torch.zeros(3), torch.zeros(2, dtype=f64), None, 16)


def test_float32_tolerance_scales_with_key_length() -> None:
    from attncc.testing import assert_close_to_reference, float32_tolerance

    assert float32_tolerance(128) == 2e-5 and float32_tolerance(512) == pytest.approx(4e-5)
    ref = torch.zeros(4, dtype=f64)
    assert_close_to_reference(torch.full((4,), 3.9e-5), ref, None, 512)
    with pytest.raises(AssertionError):
        assert_close_to_reference(torch.full((4,), 3.9e-5), ref, None, 128)


def test_low_precision_rule_uses_reference_error_and_floor() -> None:
    from attncc.testing import assert_close_to_reference

    ref64 = torch.zeros(4, dtype=f64)
    lowp = torch.full((4,), 0.004, dtype=torch.float16)  # e_ref = 0.004 -> bound 0.008
    assert_close_to_reference(torch.full((4,), 0.0075, dtype=torch.float16), ref64, lowp, 16)
    with pytest.raises(AssertionError):
        assert_close_to_reference(torch.full((4,), 0.0085, dtype=torch.float16), ref64, lowp, 16)
    with pytest.raises(AssertionError):  # floor 1e-3 when the reference is exact
        assert_close_to_reference(torch.full((4,), 0.002, dtype=torch.float16), ref64, torch.zeros(4).half(), 16)
    overflowing = torch.tensor([math.inf, 0, 0, 0], dtype=torch.float16)  # grants no allowance
    with pytest.raises(AssertionError):
        assert_close_to_reference(torch.full((4,), 0.002, dtype=torch.float16), ref64, overflowing, 16)


def test_check_against_reference_catches_a_wrong_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    from attncc.codegen.reference import BACKEND
    from attncc.testing import check_against_reference

    var = attncc.variant(mask=causal)
    q, k, v = _qkv(dtype=torch.float32)
    check_against_reference(var, q, k, v, backend="reference", return_lse=True)
    original = BACKEND.run
    monkeypatch.setattr(type(BACKEND), "run", lambda self, *a, **kw: original(*a, **kw) * 1.001)
    with pytest.raises(AssertionError):
        check_against_reference(var, q, k, v, backend="reference")


def test_mask_reading_a_float_table_and_float32_captures_with_float64_inputs() -> None:
    weights = torch.rand(9)  # float32 capture, float64 q/k/v
    var = attncc.variant(lambda s, b, h, qi, ki: s * weights[ki], mask=lambda b, h, qi, ki: weights[ki] > 0.3)
    q, k, v = _qkv(Lq=9, Lkv=9)
    keep = (weights > 0.3).view(1, 1, 1, -1).expand(2, 4, 9, 9)
    s = (_raw_scores(q, k) * weights.to(f64)).masked_fill(~keep, -math.inf)
    _close(_run(var, q, k, v), _apply(torch.softmax(s, -1), v))


# ---- hypothesis: random score and mask functions through the whole pipeline ---------------------

RANDOM_MASKS = _term(2, with_score=False).filter(lambda t: t[1] == "bool" and t[2])


RANDOM_NORMALIZERS = st.sampled_from(["softmax", "sink", "sigmoid", "relu", "stick_breaking"])
SINK = torch.tensor([0.0, -1.0, 2.0, 0.5], dtype=f64)


def _stick_breaking_products(s: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """beta_ij * prod_{t kept, t > j} (1 - beta_it) as a reversed cumulative product (not log space)."""
    stay = torch.where(keep, 1 - torch.sigmoid(s), 1.0)
    after = torch.flip(torch.cumprod(torch.flip(stay, [-1]), -1), [-1])  # prod over t >= j
    after = torch.cat([after[..., 1:], torch.ones_like(after[..., :1])], -1)  # prod over t > j
    return torch.where(keep, torch.sigmoid(s) * after, 0.0)


@pytest.mark.filterwarnings("ignore")
@HYPOTHESIS
@given(_term(3, with_score=True), RANDOM_MASKS, RANDOM_NORMALIZERS)
def test_random_variants_match_direct_formula(score_term: tuple, mask_term: tuple, normalizer: str) -> None:
    """Random score and mask callables: the pipeline plus the reference equal a direct evaluation."""
    score_src, mask_src = score_term[0], mask_term[0]
    score_fn = eval(f"lambda score, b, h, q_idx, kv_idx: {score_src}", dict(NAMESPACE))
    mask_fn = eval(f"lambda b, h, q_idx, kv_idx: {mask_src}", dict(NAMESPACE))
    q, k, v = _qkv(B=2, Hq=4, Hkv=2, Lq=5, Lkv=6, D=4, Dv=3)
    grid = _grid(2, 4, 5, 6, q_offset=1)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(f64)
    try:
        s = torch.broadcast_to(torch.as_tensor(score_fn(_raw_scores(q, k), *grid)).to(f64), (2, 4, 5, 6))
        keep = torch.broadcast_to(torch.as_tensor(mask_fn(*grid)), (2, 4, 5, 6))
    finally:
        torch.set_default_dtype(previous)
    assume(not torch.isnan(s).any() and not (s == math.inf).any())
    keep = keep & (s != -math.inf)
    spec = attncc.Softmax(sink=SINK) if normalizer == "sink" else normalizer
    if normalizer == "softmax":
        m = torch.where(keep, s, -math.inf).amax(-1, keepdim=True)
        p = _row_normalize(torch.where(keep, torch.exp(s - torch.where(torch.isfinite(m), m, 0.0)), 0.0))
    elif normalizer == "sink":
        sink = SINK.view(1, -1, 1, 1)
        m = torch.maximum(torch.where(keep, s, -math.inf).amax(-1, keepdim=True), sink)
        e = torch.where(keep, torch.exp(s - m), 0.0)
        p = e / (torch.exp(sink - m) + e.sum(-1, keepdim=True))
    elif normalizer == "sigmoid":
        p = torch.where(keep, torch.sigmoid(s - math.log(6)), 0.0)
    elif normalizer == "stick_breaking":
        p = _stick_breaking_products(s, keep)
    else:
        p = _row_normalize(torch.where(keep, torch.relu(s), 0.0))
    got = _run(attncc.variant(score_fn, mask=mask_fn, normalizer=spec), q, k, v, q_offset=1)
    torch.testing.assert_close(got, _apply(p, v), rtol=1e-9, atol=1e-9,
                               msg=lambda m: f"score {score_src}\nmask {mask_src}\n{normalizer}\n{m}")


def test_softmax_of_huge_equal_scores_is_uniform() -> None:
    """Scores near 1e23 and 1e64, equal along a row: every weight is 1/n (an ulp of the lse
    there exceeds log n, so exp(s - lse) once gave each weight 1). CI's hypothesis example."""
    var = attncc.variant(lambda score, b, h, q_idx, kv_idx: torch.exp(torch.exp(torch.maximum(q_idx, score))))
    q, k, v = _qkv(B=1, Hq=1, Hkv=1, Lq=5, Lkv=6, D=4, Dv=3)
    q = q * 0.1  # raw scores below q_idx >= 1: each row's scores are equal
    out = _run(var, q, k, v, q_offset=1)
    torch.testing.assert_close(out[0, 0, 3:], v[0, 0].mean(0).expand(2, 3), rtol=1e-12, atol=1e-12)


def test_out_of_bounds_read_names_the_captured_tensor() -> None:
    short = torch.zeros(4)
    var = attncc.variant(lambda s, b, h, qi, ki: s + short[qi])
    with pytest.raises(IndexError, match="captured tensor 'short' of shape"):
        _run(var, *_qkv(Lq=7))


NORMALIZERS_FOR_DTYPES = ["softmax", "sigmoid", "softplus", "relu2", "stick_breaking", "linear", "sink"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NORMALIZERS_FOR_DTYPES)
def test_output_dtype_follows_input_for_every_normalizer(name: str, dtype: torch.dtype) -> None:
    spec = {"linear": attncc.Linear(), "sink": attncc.Softmax(sink=torch.zeros(4))}.get(name, name)
    q, k, v = _qkv(dtype=dtype)
    o = _run(attncc.variant(mask=causal, normalizer=spec), q, k, v)
    assert o.dtype == dtype and o.shape == (2, 4, 7, 6) and torch.isfinite(o).all()
    exact = _run(attncc.variant(mask=causal, normalizer=spec), q.double(), k.double(), v.double())
    # accumulation is float32 whatever the input: the error is that of rounding the output once
    bound = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert (o.double() - exact).abs().max().item() <= bound * max(1.0, exact.abs().max().item())


def test_gradcheck_router_logits() -> None:
    q, k, v = _tiny()
    router = torch.randn(1, 3, 2, dtype=f64, requires_grad=True)
    var = attncc.variant(mask=causal, routing=attncc.TopKHeads(1, router))
    (name,) = [n for n, t in var.tensors.items() if t is router]

    def run(q, k, v, router):
        return run_plan(var.plan, {"q": q, "k": k, "v": v}, {name: router}, scale=None, q_offset=0, return_lse=False)

    # k=1 keeps one head with weight softmax([logit]) = 1: the gradient to the router is 0, q/k/v flow
    assert torch.autograd.gradcheck(run, (q, k, v, router))
    var2 = attncc.variant(mask=causal, routing=attncc.TopKHeads(2, router))

    def run2(q, k, v, router):
        return run_plan(var2.plan, {"q": q, "k": k, "v": v}, {name: router}, scale=None, q_offset=0,
                        return_lse=False)

    assert torch.autograd.gradcheck(run2, (q, k, v, router))
