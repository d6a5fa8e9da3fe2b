"""The TVM backend's generated backward (softmax with sinks, sigmoid, pointwise) against the reference.

Gradients of q, k, v (and sink logits, and the lse's own gradient) are compared with a float64
reference computed from the same inputs, at twice the forward tolerance (SEMANTICS.md). Each
variant compiles its two backward kernels once (lengths, batch and heads are symbolic), so the
parametrizations reuse modules; the lengths are odd (not tile multiples) on purpose.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("tvm")

import attncc
from attncc import masks
from attncc.codegen.tvm import autograd as tvm_autograd
from attncc.codegen.tvm import backward_launch, launcher
from attncc.codegen.tvm.backward_launch import transpose_tables
from attncc.testing import (
    assert_close_to_reference,
    check_gradient_penalty,
    check_gradients,
    largest_backward_allocation,
    random_qkv,
)

HEADS = 4
SLOPES = torch.tensor([2.0 ** (-8.0 * (i + 1) / HEADS) for i in range(HEADS)])
DOCS = torch.tensor([0] * 30 + [1] * 25 + [2] * 40 + [3] * 110)  # covers q_offset + Lq and Lkv below


def _alibi(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * (q_idx - kv_idx)


def _softcap(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)


VARIANTS = {
    "dense": lambda: attncc.variant(),
    "causal": lambda: attncc.variant(mask=masks.causal),
    "sliding_window": lambda: attncc.variant(mask=masks.causal & masks.sliding_window(8)),
    "document": lambda: attncc.variant(mask=lambda b, h, q, kv: DOCS[q] == DOCS[kv]),
    "alibi": lambda: attncc.variant(_alibi, mask=masks.causal),
    "softcap": lambda: attncc.variant(_softcap),
    "strict_causal": lambda: attncc.variant(mask=lambda b, h, q, kv: q > kv),  # row q_idx = 0 sees nothing
    "sigmoid": lambda: attncc.variant(mask=masks.causal, normalizer="sigmoid"),
    "sigmoid_bias_softcap": lambda: attncc.variant(_softcap, normalizer=attncc.Sigmoid(bias=-2.0)),
    "softplus": lambda: attncc.variant(mask=masks.causal, normalizer="softplus"),
    "relu": lambda: attncc.variant(mask=masks.causal, normalizer="relu"),
    "relu2": lambda: attncc.variant(normalizer="relu2"),
    "phi_unnormalized": lambda: attncc.variant(
        normalizer=attncc.Pointwise(lambda s: torch.exp(-s * s), normalize=False)),
    "phi_normalized": lambda: attncc.variant(mask=masks.causal, normalizer=attncc.Pointwise(lambda s: torch.exp(-s * s))),
    "stick_breaking": lambda: attncc.variant(mask=masks.causal, normalizer="stick_breaking"),
    "stick_breaking_strict_window": lambda: attncc.variant(  # row q_idx = 0 sees nothing
        mask=lambda b, h, q, kv: (q > kv) & (q - kv < 40), normalizer="stick_breaking"),
    "stick_breaking_softcap": lambda: attncc.variant(_softcap, normalizer="stick_breaking"),  # every key, descending
    # documents with every fifth key dropped: a captured tensor in the mask (both kernels read
    # it) and rows with holes in every tile
    "stick_breaking_document": lambda: attncc.variant(
        mask=lambda b, h, q, kv: (DOCS[q] == DOCS[kv]) & (q >= kv) & (kv % 5 != 2), normalizer="stick_breaking"),
    "stick_breaking_alibi": lambda: attncc.variant(_alibi, mask=masks.causal, normalizer="stick_breaking"),
    "stick_breaking_wide_window": lambda: attncc.variant(
        mask=masks.causal & masks.sliding_window(150), normalizer="stick_breaking"),
    "stick_breaking_window_per_head": lambda: attncc.variant(
        mask=lambda b, h, q, kv: (q >= kv) & (q - kv < 70 + 40 * h), normalizer="stick_breaking"),
}
_BUILT: dict[str, attncc.Variant] = {}


def variant(name: str) -> attncc.Variant:
    if name not in _BUILT:
        _BUILT[name] = VARIANTS[name]()
    return _BUILT[name]


@pytest.fixture(scope="module", autouse=True)
def _no_fallback_warnings_leak():
    """Warnings are asserted per test: start every module run with no plan marked as warned."""
    tvm_autograd._WARNED.clear()
    yield


qkv = functools.partial(random_qkv, B=1, Hq=4, Hkv=2, Lq=37, Lkv=77, D=32, Dv=32)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_gradients_float32(name: str) -> None:
    """Every mask, score function and covered normalizer: odd lengths, GQA 2:1, Lq != Lkv, an
    offset; no fallback warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_gradients(variant(name), *qkv(Lq=37, Lkv=77), q_offset=20)


@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa_4_to_1_and_mqa(Hkv: int) -> None:
    """GQA 4:1 and MQA (8:1): every query head of a group accumulates into the same dK/dV."""
    check_gradients(variant("alibi"), *qkv(Hq=4, Hkv=Hkv, Lq=45, Lkv=45), with_lse=True)  # ALiBi: 4 heads
    check_gradients(variant("causal"), *qkv(B=2, Hq=8, Hkv=Hkv, Lq=45, Lkv=45, seed=1))


@pytest.mark.parametrize("Lq,Lkv,q_offset", [(1, 1, 0), (1, 100, 99), (37, 100, 63), (100, 37, 0),
                                             (200, 200, 0), (20, 90, 11)])
@pytest.mark.parametrize("name", ["causal", "document", "softplus", "stick_breaking"])
def test_lengths_and_q_offset(name: str, Lq: int, Lkv: int, q_offset: int) -> None:
    """Lengths that are not tile multiples, Lq != Lkv, q_offset moving q_idx (decode rows)."""
    check_gradients(variant(name), *qkv(Lq=Lq, Lkv=Lkv), q_offset=q_offset)


def test_stick_breaking_long_rows_keep_float32_precision() -> None:
    """2048 keys a row: the walks never subtract large sums (``_stick_breaking_tile``). One walk
    down with T = Delta - sum_{t >= j} g measured 0.96 of the gradient tolerance in dQ here (its
    error grows with the keys a row sees); the two walks measure 0.003, held to a tenth."""
    program = variant("stick_breaking")
    q, k, v = qkv(B=1, Hq=1, Hkv=1, Lq=2048, Lkv=2048, D=64, Dv=64, seed=7)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    grad_out = torch.randn(1, 1, 2048, 64, generator=torch.Generator().manual_seed(8))
    got = torch.autograd.grad(program(*leaves, backend="tvm"), leaves, grad_out)
    exact = [t.double().requires_grad_(True) for t in (q, k, v)]
    want = torch.autograd.grad(program(*exact, backend="reference"), exact, grad_out.double())
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close_to_reference(g, w, None, 2048, what=name, factor=0.2)


def test_head_dims_differ() -> None:
    """D != Dv, neither a multiple of the vector width: the products' register blocks adapt."""
    check_gradients(variant("causal"), *qkv(Lq=50, Lkv=70, D=24, Dv=40), q_offset=20, with_lse=True)


def test_fully_masked_rows_have_zero_gradients() -> None:
    """A row that sees no key (o = 0, lse = -inf) contributes nothing and never NaN."""
    q, k, v = qkv(Lq=40, Lkv=40)
    check_gradients(variant("strict_causal"), q, k, v, with_lse=True)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = variant("strict_causal")(*leaves, backend="tvm")
    dq, = torch.autograd.grad(out.sum(), leaves[0])
    assert torch.all(dq[:, :, 0] == 0) and not torch.isnan(dq).any()


def test_sink_gradient() -> None:
    """Learned sink logits: d sink_h = sum_i p_sink_i (dlse_i - rowsum(dO_i O_i)); lse gradient too."""
    sink = torch.tensor([0.5, -1.0, 0.0, 2.0], requires_grad=True)
    program = attncc.variant(mask=lambda b, h, q, kv: (q >= kv) & (q > 3), normalizer=attncc.Softmax(sink=sink))
    (name,) = [n for n in program.tensors if program.tensors[n] is sink]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_gradients(program, *qkv(Lq=50, Lkv=50), learn=(name,), with_lse=True)
        check_gradients(program, *qkv(Lq=9, Lkv=70, seed=2), q_offset=61, learn=(name,))
    slopes = SLOPES.clone().requires_grad_(True)  # with a sink, simplify keeps -slope * q_idx in the score
    alibi = attncc.variant(lambda s, b, h, qi, ki: s - slopes[h] * (qi - ki), mask=masks.causal,
                           normalizer=attncc.Softmax(sink=sink))
    learn = (_learned(alibi, sink), _learned(alibi, slopes))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_gradients(alibi, *qkv(Lq=40, Lkv=60), q_offset=20, learn=learn, with_lse=True)
        check_gradients(alibi, *qkv(Lq=40, Lkv=60, dtype=torch.bfloat16), q_offset=20, learn=learn, with_lse=True)


@pytest.mark.parametrize("name,dtype", [
    ("causal", torch.float16), ("causal", torch.bfloat16), ("softcap", torch.float16), ("softcap", torch.bfloat16),
    ("sigmoid", torch.bfloat16), ("softplus", torch.float16), ("stick_breaking", torch.float16),
    ("stick_breaking", torch.bfloat16),
])
def test_low_precision_inputs(name: str, dtype: torch.dtype) -> None:
    """float16 / bfloat16 inputs, float32 accumulation, gradients in the input dtype."""
    check_gradients(variant(name), *qkv(Lq=45, Lkv=70, dtype=dtype), q_offset=25 if name == "causal" else 0)


@pytest.mark.parametrize("name", ["causal", "alibi"])
def test_low_precision_inputs_without_pair_dots(name: str, monkeypatch) -> None:
    """bfloat16 through the float32 products everywhere (hosts without AVX-512 BF16)."""
    monkeypatch.setattr(backward_launch, "uses_pair_dots", lambda *args: False)
    check_gradients(variant(name), *qkv(Lq=45, Lkv=70, dtype=torch.bfloat16), q_offset=25)


@pytest.mark.parametrize("name", ["causal", "alibi", "document", "softcap", "sigmoid", "softplus", "dense",
                                  "stick_breaking"])
def test_bfloat16_pair_dots_gradients(name: str, monkeypatch) -> None:
    """On a host with AVX-512 BF16, the backward's five products multiply by bfloat16 pairs
    (``BackwardShape.pair_dots``): both kernel schemes, GQA, a query offset, ragged tiles, lse."""
    from attncc.codegen.tvm import bf16_pairs

    if not bf16_pairs.on_host():
        pytest.skip("this host has no AVX-512 BF16: bfloat16 takes the float32 products (tested above)")
    decided: list[bool] = []
    uses = backward_launch.uses_pair_dots
    monkeypatch.setattr(backward_launch, "uses_pair_dots", lambda *args: decided.append(uses(*args)) or decided[-1])
    lse = name in ("causal", "alibi", "document", "softcap", "dense")
    for fused in (True, False):
        with fused_kernel(fused):
            check_gradients(variant(name), *qkv(B=2, Hq=4, Hkv=2, Lq=45, Lkv=70, dtype=torch.bfloat16), q_offset=25,
                            with_lse=lse)
            check_gradients(variant(name), *qkv(B=1, Hq=4, Hkv=1, Lq=3, Lkv=40, dtype=torch.bfloat16, seed=1),
                            q_offset=37)
    assert decided and all(decided)


@pytest.mark.parametrize("name", ["causal", "alibi", "sigmoid"])
def test_bfloat16_pair_dots_agree_with_float32_products(name: str, monkeypatch) -> None:
    """Pair dots against the float32 products on the same bfloat16 inputs, closer than SEMANTICS.md's
    bfloat16 rule can tell: S and dP are exact either way and P and dS are rounded to bfloat16
    (2**-9 relative), so the gradients agree within 1% in norm. A 2% error in dK's scale passes the
    reference comparison above and fails here."""
    from attncc.codegen.tvm import bf16_pairs

    if not bf16_pairs.on_host():
        pytest.skip("this host has no AVX-512 BF16")
    q, k, v = qkv(B=2, Hq=4, Hkv=2, Lq=77, Lkv=100, dtype=torch.bfloat16, seed=4)
    weights = torch.randn(2, 4, 77, 32, generator=torch.Generator().manual_seed(9))
    uses, decided = backward_launch.uses_pair_dots, []
    for fused in (True, False):
        grads = []
        for pairs in (True, False):
            monkeypatch.setattr(backward_launch, "uses_pair_dots",
                                lambda *a, on=pairs: on and (decided.append(uses(*a)) or decided[-1]))
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
            with fused_kernel(fused):
                out = variant(name)(*leaves, backend="tvm", q_offset=23)
            grads.append(torch.autograd.grad((out.float() * weights).sum(), leaves))
        for what, got, want in zip(("dq", "dk", "dv"), *grads):
            gap = (got.float() - want.float()).norm() / want.float().norm()
            assert gap < 1e-2, f"{what}: pair dots differ from the float32 products by {gap:.3g} in norm"
    assert decided and all(decided)


def test_pair_tiles_layout_and_refusal() -> None:
    """``_pair_tiles``: word (d, j) of tile t holds features 2d and 2d + 1 of key t * BN + j, zero
    past the keys, also from a tensor at an odd storage offset (whole tiles, no padding copy); the
    renderer refuses pair dots for knobs that do not fit (``BackwardShape.fits_pair_dots``)."""
    from attncc.codegen.tvm.backward import BackwardShape, render_backward

    k = torch.randn(2, 3, 21, 8).to(torch.bfloat16)
    tiles = backward_launch._pair_tiles(k, 16).view(torch.bfloat16).view(2, 3, 2, 4, 16, 2)
    keys = torch.cat([k, torch.zeros(2, 3, 11, 8, dtype=torch.bfloat16)], 2).view(2, 3, 2, 16, 4, 2)
    assert torch.equal(tiles, keys.transpose(3, 4))
    shifted = torch.empty(2 * 3 * 32 * 8 + 1, dtype=torch.bfloat16)[1:].view(2, 3, 32, 8)
    shifted.copy_(keys.view(2, 3, 32, 8))
    assert torch.equal(backward_launch._pair_tiles(shifted, 16).view(torch.bfloat16).view(2, 3, 2, 4, 16, 2), tiles)
    region = variant("causal").plan.regions[0]
    for knobs in ({"D": 16, "Dv": 16, "vector": 8}, {"D": 8, "Dv": 8}, {"D": 16, "Dv": 16, "block_n": 16},
                  {"D": 16, "Dv": 16, "block_m": 7, "rows": 7}):
        assert not BackwardShape(**knobs).fits_pair_dots
        with pytest.raises(ValueError, match="backward pair dots need"):
            render_backward(region, BackwardShape(**knobs, pair_dots=True), "dq")
    assert BackwardShape(16, 16).fits_pair_dots


@contextlib.contextmanager
def fused_kernel(on: bool):
    """Force the single fused kernel over (b, hk) (on) or the two kernels (off)."""
    names = ("FUSED_MIN_TASKS_PER_THREAD", "STICK_BREAKING_FUSED_MIN_TASKS_PER_THREAD")
    old = {name: getattr(backward_launch, name) for name in names}
    for name in names:
        setattr(backward_launch, name, 0 if on else 10**9)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(backward_launch, name, value)


@settings(max_examples=16, deadline=None)
@given(
    name=st.sampled_from(["causal", "document", "dense", "stick_breaking", "stick_breaking_strict_window"]),
    fused=st.booleans(),
    B=st.integers(1, 2), Hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 3]),
    Lq=st.integers(1, 90), Lkv=st.integers(1, 130), offset=st.integers(0, 40), seed=st.integers(0, 2**16),
)
def test_random_shapes(name, fused, B, Hkv, group, Lq, Lkv, offset, seed) -> None:
    """Random small shapes, head groups and offsets against the reference, either kernel scheme."""
    q_offset = min(offset, max(0, 190 - Lq))  # DOCS covers q_idx < 205
    with fused_kernel(fused):
        check_gradients(variant(name), *qkv(B=B, Hq=Hkv * group, Hkv=Hkv, Lq=Lq, Lkv=Lkv, seed=seed),
                        q_offset=q_offset, seed=seed)


@pytest.mark.parametrize("name,dtype", [
    ("causal", torch.float32), ("causal", torch.bfloat16), ("alibi", torch.float32), ("strict_causal", torch.float32),
    ("sigmoid", torch.float32), ("phi_unnormalized", torch.float32), ("stick_breaking_document", torch.float32),
    ("stick_breaking_alibi", torch.bfloat16),
])
def test_fused_kernel(name: str, dtype: torch.dtype) -> None:
    """The fused scheme (one task per (b, hk) owning its dQ rows): GQA, offsets, dead rows."""
    with fused_kernel(True):
        check_gradients(variant(name), *qkv(B=2, Hq=4, Hkv=2, Lq=77, Lkv=100, dtype=dtype), q_offset=20,
                        with_lse=name in ("causal", "alibi", "strict_causal"))
        check_gradients(variant(name), *qkv(B=1, Hq=4, Hkv=1, Lq=3, Lkv=40, dtype=dtype, seed=1), q_offset=37)


@pytest.mark.parametrize("name", ["stick_breaking_document", "stick_breaking_strict_window", "stick_breaking_alibi",
                                  "stick_breaking_wide_window", "stick_breaking_window_per_head"])
def test_stick_breaking_two_kernels(name: str, monkeypatch) -> None:
    """Stick-breaking on the two kernels: dq walks each query tile's kv tiles in ascending order
    (the PARTIAL and FULL lists merged: a wide window lists PARTIAL, FULL, PARTIAL; per-head
    windows give per-head tables) and leaves T at each tile's first key for dkdv; GQA, offsets,
    a ragged last query tile."""
    kinds: list[str] = []
    render = backward_launch.render_backward
    monkeypatch.setattr(backward_launch, "render_backward",
                        lambda region, shape, kind, *args: kinds.append(kind) or render(region, shape, kind, *args))
    with fused_kernel(False):
        check_gradients(variant(name), *qkv(B=2, Hq=4, Hkv=2, Lq=150, Lkv=200), q_offset=50)
        check_gradients(variant(name), *qkv(B=1, Hq=4, Hkv=1, Lq=3, Lkv=40, seed=1), q_offset=37)
    assert set(kinds) == {"sums", "dq", "dkdv"}


@pytest.mark.parametrize("threads", [2, 3])
def test_balanced_task_tables_with_per_head_masks(threads: int) -> None:
    """The two kernels' task tables (schedule.balanced_order) on a mask whose tiles differ per
    query head, GQA 2:1: dkdv weighs a kv head by its group's query heads; every task runs once."""
    program = attncc.variant(mask=lambda b, h, q, kv: (q >= kv) & (q - kv < 16 + 24 * h))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with fused_kernel(False):
            check_gradients(program, *qkv(B=1, Hq=4, Hkv=2, Lq=150, Lkv=150, seed=3))
    finally:
        torch.set_num_threads(before)
    tiles = torch.tensor([[[1, 2, 3], [4, 5, 6], [0, 0, 1], [1, 1, 1]]])
    assert backward_launch._per_kv_head(tiles, 2).tolist() == [[[5, 7, 9], [1, 1, 2]]]


def test_fused_kernel_choice() -> None:
    """Fused when every thread gets a few (b, hk) tasks; never for a normalised pointwise map;
    stick-breaking once every thread gets one (its two kernels walk each tile twice more)."""
    threads = torch.get_num_threads()
    region = variant("causal").plan.regions[0]
    assert backward_launch.use_fused(region, 4 * threads) and not backward_launch.use_fused(region, 4 * threads - 1)
    assert not backward_launch.use_fused(variant("softplus").plan.regions[0], 10**6)
    stick = variant("stick_breaking").plan.regions[0]
    assert backward_launch.use_fused(stick, threads) and not backward_launch.use_fused(stick, threads - 1)


def _learned(program: attncc.Variant, tensor: torch.Tensor) -> str:
    (name,) = [n for n, t in program.tensors.items() if t is tensor]
    return name


def test_learned_captured_tensors() -> None:
    """ALiBi slopes, a relative bias table indexed by q_idx - kv_idx, a sigmoid's learned scale, a
    0-d gain in the score and in the row_shift (simplify moves ``q_idx * gain * 0.3`` there):
    generated (the fused kernel scatters per-task partial gradients, the row_shift's share comes
    from the lse's gradient), with the lse's gradient too; no warning."""
    slopes = SLOPES.clone().requires_grad_(True)
    alibi = attncc.variant(lambda s, b, h, qi, ki: s - slopes[h] * (qi - ki), mask=masks.causal)
    table = (0.1 * torch.randn(300, generator=torch.Generator().manual_seed(5))).requires_grad_(True)
    relative = attncc.variant(lambda s, b, h, qi, ki: s + table[qi - ki + 150], mask=masks.causal)
    temperature = torch.tensor([1.0, 0.5, 2.0, 1.5], requires_grad=True)
    sigmoid = attncc.variant(lambda s, b, h, qi, ki: s * temperature[h], normalizer="sigmoid")
    gain = torch.tensor(0.7, requires_grad=True)  # 0-d, in the score and in the row_shift
    scalar = attncc.variant(lambda s, b, h, qi, ki: s * gain + qi * gain * 0.3, mask=masks.causal)
    assert scalar.plan.regions[0].row_shift is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_gradients(alibi, *qkv(Lq=45, Lkv=70), q_offset=25, learn=(_learned(alibi, slopes),), with_lse=True)
        check_gradients(relative, *qkv(B=2, Lq=45, Lkv=100), q_offset=55, learn=(_learned(relative, table),))
        check_gradients(sigmoid, *qkv(Lq=30, Lkv=50), learn=(_learned(sigmoid, temperature),))
        check_gradients(scalar, *qkv(Lq=30, Lkv=40), q_offset=10, learn=(_learned(scalar, gain),), with_lse=True)


def test_learned_alibi_slopes_on_long_rows() -> None:
    """ALiBi's distance stays whole (``simplify.cancels_growth``): split into ``slope * kv`` (score)
    and ``-slope * q`` (row_shift), the float32 rounding of dS was multiplied by absolute positions:
    1e-2 off at 256 keys, 180x the tolerance, while the float32 reference passed."""
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], requires_grad=True)
    alibi = attncc.variant(lambda s, b, h, qi, ki: s - slopes[h] * (qi - ki), mask=masks.causal)
    assert alibi.plan.regions[0].row_shift is None
    name = _learned(alibi, slopes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_gradients(alibi, *qkv(Lq=256, Lkv=256, D=16, Dv=16, seed=3), learn=(name,), with_lse=True, seed=3)
        check_gradients(alibi, *qkv(Lq=64, Lkv=512, D=16, Dv=16, seed=2), q_offset=448, learn=(name,), seed=2)


def test_a_tensor_learned_outside_the_regions_keeps_the_generated_backward() -> None:
    """Differential attention with a learned lambda: its gradient comes through the torch combine;
    the regions, which do not read it, keep their generated backward (no warning)."""
    g = attncc.GraphBuilder("differential")
    q1, k1, q2, k2, v = g.inputs("q1", "k1", "q2", "k2", "v")
    lam = g.scalar("lam")
    program = g.build(g.attention(q1, k1, v, mask=masks.causal) - lam * g.attention(q2, k2, v, mask=masks.causal))
    gen = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(1, 4, 40, 16, generator=gen) for n in ("q1", "k1", "q2", "k2", "v")}
    found = []
    for backend, dtype in (("tvm", torch.float32), ("reference", torch.float64)):
        leaves = {n: t.to(dtype).requires_grad_(True) for n, t in inputs.items()}
        lam_leaf = torch.tensor(0.8, dtype=dtype, requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = program(**leaves, lam=lam_leaf, backend=backend)
            found.append(torch.autograd.grad(out.square().sum(), [*leaves.values(), lam_leaf]))
    for got, want in zip(*found):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("normalizer", ["stick_breaking", "relu", "phi", "softplus", "phi_normalized"])
def test_learned_tensors_under_other_normalizers(normalizer: str) -> None:
    """Learned ALiBi slopes and a learned per-head temperature under stick-breaking and pointwise
    maps: the kernel scatters d loss / d score_fn (before the chain) into float64 partial sums
    (float32 ones lost 20x the float32 reference's error under relu), per (b, hk) in the fused
    kernel, per kv tile in dkdv (a normalised map: its row sums come first); no warning."""
    slopes = SLOPES.clone().requires_grad_(True)
    temperature = torch.tensor([1.0, 0.5, 2.0, 1.5], requires_grad=True)
    norm = {"stick_breaking": "stick_breaking", "relu": attncc.Pointwise("relu", normalize=False),
            "phi": attncc.Pointwise(lambda s: torch.exp(-s * s), normalize=False), "softplus": "softplus",
            "phi_normalized": attncc.Pointwise(lambda s: torch.exp(-s * s))}[normalizer]
    alibi = attncc.variant(lambda s, b, h, qi, ki: s - slopes[h] * (qi - ki), mask=masks.causal, normalizer=norm)
    scaled = attncc.variant(lambda s, b, h, qi, ki: s * temperature[h], mask=masks.causal & masks.sliding_window(30),
                            normalizer=norm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_gradients(alibi, *qkv(B=2, Lq=45, Lkv=70), q_offset=25, learn=(_learned(alibi, slopes),))
        check_gradients(scaled, *qkv(Hkv=4, Lq=60, Lkv=60), learn=(_learned(scaled, temperature),))
        check_gradients(alibi, *qkv(Lq=33, Lkv=33, dtype=torch.bfloat16), learn=(_learned(alibi, slopes),))


def test_warning_only_when_falling_back() -> None:
    """Covered cases warn nothing; a learned tensor read by the mask falls back once, with the
    reason."""
    q, k, v = (t.requires_grad_(True) for t in qkv(Hq=4, Hkv=4, Lq=24, Lkv=24))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        variant("causal")(q, k, v, backend="tvm").sum().backward()
        variant("stick_breaking")(q, k, v, backend="tvm").sum().backward()
    widths = torch.tensor([8.0, 12.0, 16.0, 20.0], requires_grad=True)
    program = attncc.variant(mask=lambda b, h, qi, ki: (qi >= ki) & (qi - ki < widths[h]))
    with pytest.warns(UserWarning, match="reference backend") as record:
        program(q, k, v, backend="tvm").sum().backward()
    assert len([w for w in record if "reference backend" in str(w.message)]) == 1
    assert "gradient of captured tensor" in str(record[0].message) and "read by the mask" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        program(q, k, v, backend="tvm").sum().backward()  # once per plan
        with torch.no_grad():
            program(q, k, v, backend="tvm")
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_double_backward_of_a_nonlinear_loss() -> None:
    """The generated backward is not itself differentiable; under ``create_graph=True`` the
    reference's recomputed graph gives the gradients, so the second derivative is the reference's
    (it had raised "differentiate twice")."""
    grads = []
    for backend in ("tvm", "reference"):
        q, k, v = (t.requires_grad_(True) for t in qkv(Lq=20, Lkv=20))
        (dq,) = torch.autograd.grad(variant("causal")(q, k, v, backend=backend).square().sum(), q, create_graph=True)
        dq.sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_double_backward_through_the_reference_fallback() -> None:
    """A fallback (learned mask width) recomputes with the reference, which is differentiable
    twice: a gradient penalty gets the reference's gradients, never a silently dropped term."""
    widths = torch.tensor([8.0, 12.0, 16.0, 20.0], requires_grad=True)
    program = attncc.variant(mask=lambda b, h, qi, ki: (qi >= ki) & (qi - ki < widths[h]))
    inputs = qkv(Hq=4, Hkv=4, Lq=24, Lkv=24)
    found = []
    for backend in ("reference", "tvm"):
        q, k, v = (t.clone().requires_grad_(True) for t in inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = program(q, k, v, backend=backend)
            (dq,) = torch.autograd.grad(out.sin().sum(), q, create_graph=True)
        assert dq.requires_grad
        found.append(torch.autograd.grad(out.sin().sum() + dq.square().sum(), (q, k, v)))
    for got, want in zip(*reversed(found)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_double_backward_of_self_attention_through_the_reference_fallback() -> None:
    """``program(x, x, x)`` with ``create_graph=True``: each role gets its own share of x's gradient
    (the same tensor passed as q, k and v once came back three times over)."""
    widths = torch.tensor([8.0, 12.0, 16.0, 20.0], requires_grad=True)
    program = attncc.variant(mask=lambda b, h, qi, ki: (qi >= ki) & (qi - ki < widths[h]))
    base = qkv(Hq=4, Hkv=4, Lq=24, Lkv=24)[0]
    found = []
    for backend in ("reference", "tvm"):
        x = base.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = program(x, x, x, backend=backend)
        (dx,) = torch.autograd.grad(out.sin().sum(), x, create_graph=True)
        found.append(torch.autograd.grad(out.sin().sum() + dx.square().sum(), x)[0])
    torch.testing.assert_close(found[1], found[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("path", ["generated", "reference", "linear"])
def test_captured_tensor_edited_before_backward_raises(path: str) -> None:
    """A captured tensor edited in place between forward and backward raises as any tensor autograd
    saved does: the gradients would belong to the new contents, not to the output computed."""
    docs = DOCS[:40].clone()
    widths = torch.tensor([8.0, 12.0, 16.0, 20.0], requires_grad=True)
    scale = torch.tensor([1.0, 0.5, 2.0, 1.5])
    program = {
        "generated": lambda: attncc.variant(mask=lambda b, h, qi, ki: docs[qi] == docs[ki]),
        "reference": lambda: attncc.variant(mask=lambda b, h, qi, ki: (docs[qi] == docs[ki]) & (qi - ki < widths[h])),
        "linear": lambda: attncc.variant(mask=masks.causal, normalizer=attncc.Linear(lambda x: torch.relu(x) * scale[1])),
    }[path]()
    q, k, v = (t.requires_grad_(True) for t in qkv(Hq=4, Hkv=4, Lq=40, Lkv=40))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = program(q, k, v, backend="tvm")
    (docs if path != "linear" else scale).mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_transpose_tables_round_trip() -> None:
    """Per-kv-tile lists of q tiles list exactly the pairs of the per-q-tile lists, ascending."""
    count = torch.tensor([[[2, 0, 3]]], dtype=torch.int32)
    index = torch.tensor([[[[1, 3, 0], [0, 0, 0], [0, 1, 3]]]], dtype=torch.int32)
    tcount, tindex = transpose_tables(count, index, nkv=4)
    assert tcount.tolist() == [[[1, 2, 0, 2]]]
    assert tindex[0, 0, 0, :1].tolist() == [2]
    assert tindex[0, 0, 1, :2].tolist() == [0, 2]
    assert tindex[0, 0, 3, :2].tolist() == [0, 2]
    empty_count, empty_index = transpose_tables(torch.zeros(1, 1, 2, dtype=torch.int32),
                                                torch.zeros(1, 1, 2, 1, dtype=torch.int32), nkv=3)
    assert empty_count.tolist() == [[[0, 0, 0]]] and empty_index.shape == (1, 1, 3, 1)


@pytest.mark.parametrize("name", ["causal", "stick_breaking"])
def test_backward_allocates_no_lq_by_lkv_buffer(name: str) -> None:
    """No tensor of the backward is as large as one float32 Lq x Lkv matrix (the reference's are;
    stick-breaking's per-row sums per kv tile are Lq x Lkv / 64)."""
    L = 1024  # NOTE: an event's memory includes its children's: the whole backward's O(L*D) tensors
    q, k, v = qkv(B=1, Hq=1, Hkv=1, Lq=L, Lkv=L)
    assert largest_backward_allocation(variant(name), "reference", q, k, v) >= 4 * L * L  # the probe sees a dense one
    assert largest_backward_allocation(variant(name), "tvm", q, k, v) < L * L


def test_modules_are_reused_across_lengths() -> None:
    """Lengths, batch and heads are symbolic: a second length compiles nothing new."""
    check_gradients(variant("causal"), *qkv(Lq=33, Lkv=33))
    before = launcher.STATS["compiled"]
    check_gradients(variant("causal"), *qkv(Lq=71, Lkv=71, seed=3))
    assert launcher.STATS["compiled"] == before


@pytest.mark.parametrize("normalizer", ["softmax", "linear"])
def test_gradient_penalty_is_differentiated_as_the_reference(normalizer: str) -> None:
    """``create_graph=True`` then a loss on the gradient (a gradient penalty): the generated
    kernels' gradients are not differentiable again, so the reference's recomputed graph gives
    them. A loss linear in the output had left dq without a graph, and the penalty's second-order
    term was silently dropped."""
    kwargs = {"normalizer": attncc.Linear()} if normalizer == "linear" else {}
    var = attncc.variant(mask=masks.causal, **kwargs)
    check_gradient_penalty(var, *qkv(Hq=2, Hkv=2, Lq=20, Lkv=20), backend="tvm")
