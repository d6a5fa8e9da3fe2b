"""The TVM linear attention kernels (``attncc/codegen/tvm/linear.py``) against the reference.

Every case compares with the float64 reference (``attncc.testing``, SEMANTICS.md tolerances).
Lengths 1, 37 and 200 are not chunk multiples; decoding-like offsets put the prefix pass and
queries past the last key to work. Variants are built once per module, so each compiles once
(lengths, batch and heads are symbolic).

NOTE: with ``normalize=False`` (or an identity feature map) outputs are unnormalized sums whose
float32 rounding grows with their magnitude; such cases scale q by ``D ** -0.5`` as models do,
which keeps them well conditioned for the fixed float32 tolerance.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("tvm")

import attncc
from attncc import masks
from attncc.codegen.tvm import BACKEND, launcher, linear_backward, linear_launch
from attncc.testing import (
    assert_close_to_reference,
    check_against_reference,
    check_gradients,
    largest_backward_allocation,
    reference_outputs,
)

HEADS = 4
DECAY = 1.0 - 2.0 ** (-5.0 - torch.arange(HEADS, dtype=torch.float32))  # RetNet's decays
FAST_DECAY = torch.tensor([0.5, 0.8, 0.95, 1.0])
OFFSET = torch.tensor([0.1, 0.3])


pytestmark = pytest.mark.usefixtures("tvm_cache_dir")


def _strict(b, h, q_idx, kv_idx):
    return q_idx > kv_idx


def _linear(mask=masks.causal, feature="elu1", normalize=True, decay=None):
    return attncc.variant(mask=mask, normalizer=attncc.Linear(feature, normalize=normalize, decay=decay))


VARIANTS = {
    "elu1": lambda: _linear(),
    "traced": lambda: _linear(feature=lambda x: torch.sigmoid(x) + torch.relu(x) * OFFSET[1]),
    "identity_unnormalized": lambda: _linear(feature="identity", normalize=False),
    "lightning": lambda: _linear(feature="identity", normalize=False, decay=DECAY),
    "decay_normalized": lambda: _linear(decay=FAST_DECAY),
    "strict": lambda: _linear(mask=_strict),
    "strict_decay": lambda: _linear(mask=_strict, feature="relu", decay=FAST_DECAY),
    "global": lambda: _linear(mask=None),
    "global_unnormalized": lambda: _linear(mask=None, feature="relu", normalize=False),
}
_BUILT: dict[str, attncc.Program] = {}


def variant(name: str) -> attncc.Program:
    if name not in _BUILT:
        _BUILT[name] = VARIANTS[name]()
    return _BUILT[name]


def qkv(B=2, Hq=HEADS, Hkv=2, Lq=37, Lkv=37, D=32, Dv=32, dtype=torch.float32, seed=0, q_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, Lq, D, generator=gen) * q_scale).to(dtype)
    k = torch.randn(B, Hkv, Lkv, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, Lkv, Dv, generator=gen).to(dtype)
    return q, k, v


def _q_scale(name: str) -> float:
    return 32**-0.5 if "unnormalized" in name or name == "lightning" else 1.0


@pytest.mark.parametrize("L", [1, 37, 200])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_matches_reference(name: str, L: int) -> None:
    """Feature maps, decay, strict causality, normalize False, global form; GQA (4 -> 2 heads).

    relu runs in ``strict_decay`` and ``global_unnormalized`` (each variant is one more compile)."""
    program = variant(name)
    expected = "linear_global" if name.startswith("global") else "linear_chunked"
    assert program.plan.strategy == expected
    check_against_reference(program, *qkv(Lq=L, Lkv=L, seed=L, q_scale=_q_scale(name)), backend="tvm")
    assert program.last_choice.backend.name == "tvm"


@pytest.mark.parametrize(
    ("Lq", "Lkv", "q_offset"),
    [(1, 130, 129), (5, 130, 125), (37, 200, 0), (90, 40, 0), (3, 40, 60), (70, 70, 3)],
    ids=["decode1", "decode5", "short_q", "late_queries", "offset_past_keys", "offset_inside"],
)
@pytest.mark.parametrize("name", ["elu1", "lightning", "strict_decay", "global"])
def test_lengths_and_offsets(name: str, Lq: int, Lkv: int, q_offset: int) -> None:
    """Lq != Lkv and q_offset: the prefix pass, the decay across a gap, queries past the last key."""
    q, k, v = qkv(Lq=Lq, Lkv=Lkv, seed=Lq + Lkv, q_scale=_q_scale(name))
    check_against_reference(variant(name), q, k, v, backend="tvm", q_offset=q_offset)


@pytest.mark.parametrize("Hkv", [1, 4])
def test_mqa_and_mha(Hkv: int) -> None:
    check_against_reference(variant("lightning"), *qkv(Hkv=Hkv, Lq=77, Lkv=77, q_scale=32**-0.5), backend="tvm")


def test_value_width_differs_from_head_dim() -> None:
    """Dv != D, neither a multiple of 16 lanes (another module: dims are compiled in)."""
    check_against_reference(variant("decay_normalized"), *qkv(Lq=70, Lkv=70, D=24, Dv=40), backend="tvm")


@pytest.mark.parametrize(
    ("name", "dtype"), [("elu1", torch.float16), ("lightning", torch.bfloat16)]
)
def test_low_precision(name: str, dtype: torch.dtype) -> None:
    """float16/bfloat16 inputs are converted on load, accumulated in float32, stored in q's dtype."""
    q, k, v = qkv(Lq=100, Lkv=100, dtype=dtype, q_scale=_q_scale(name))
    out = variant(name)(q, k, v, backend="tvm")
    assert out.dtype == dtype
    check_against_reference(variant(name), q, k, v, backend="tvm")


def test_zero_denominator_gives_zero() -> None:
    """relu features that are all zero (and the strict mask's first row) divide by 0: o = 0."""
    q, k, v = qkv(Lq=40, Lkv=40)
    q[:, :, 10:20] = -q[:, :, 10:20].abs()  # relu(q) = 0 on these rows
    out = variant("strict_decay")(q, k, v, backend="tvm")
    assert torch.equal(out[:, :, 10:20], torch.zeros_like(out[:, :, 10:20]))
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    check_against_reference(variant("strict_decay"), q, k, v, backend="tvm")


def test_automatic_choice_is_tvm_on_cpu() -> None:
    q, k, v = qkv(Lq=50, Lkv=50, q_scale=32**-0.5)
    for name in ("elu1", "lightning", "global"):
        program = variant(name)
        assert BACKEND.checker(program.plan, q) is None
        program(q, k, v)
        assert program.last_choice.backend.name == "tvm"
        assert "tvm" in program.explain()
    assert "linear_chunked" in variant("lightning").explain(source=True)


def test_non_causal_mask_is_declined() -> None:
    """A mask that is neither absent nor causal keeps the quadratic form: not generated here."""
    program = _linear(mask=masks.causal & masks.sliding_window(8))
    why = BACKEND.checker(program.plan, qkv()[0])
    assert why is not None and "linear attention" in why
    program(*qkv())
    assert program.last_choice.backend.name == "reference"


def test_new_length_reuses_the_module() -> None:
    program = variant("elu1")
    program(*qkv(Lq=21, Lkv=21), backend="tvm")
    compiled = launcher.STATS["compiled"]
    for L in (40, 64, 131):
        check_against_reference(program, *qkv(Lq=L, Lkv=L, seed=L), backend="tvm")
    assert launcher.STATS["compiled"] == compiled


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_gradients_match_reference(name: str, monkeypatch) -> None:
    """dq, dk, dv of every variant (GQA 4 -> 2, odd length) from runs of the kernel
    (``linear_backward``): no warning (the dense reference would give one), and not the torch
    recurrence (the global form is torch's own four products)."""
    _no_recomputation(monkeypatch, allow_torch=name.startswith("global"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_gradients(variant(name), *qkv(Lq=77, Lkv=77, seed=3, q_scale=_q_scale(name)))


def _no_recomputation(monkeypatch, allow_torch: bool = False) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the backward recomputed the region with the torch recurrence")

    if not allow_torch:
        monkeypatch.setattr(linear_backward, "linear_attention", refuse)


@pytest.mark.parametrize(
    ("Lq", "Lkv", "q_offset"),
    [(1, 130, 129), (5, 130, 125), (37, 200, 0), (90, 40, 0), (3, 40, 60), (70, 70, 3)],
    ids=["decode1", "decode5", "short_q", "late_queries", "offset_past_keys", "offset_inside"],
)
@pytest.mark.parametrize("name", ["elu1", "lightning", "strict_decay"])
def test_gradients_lengths_and_offsets(name: str, Lq: int, Lkv: int, q_offset: int, monkeypatch) -> None:
    """Lq != Lkv and offsets: the transposed products run on zero-padded rows in reversed time."""
    _no_recomputation(monkeypatch)
    q, k, v = qkv(Lq=Lq, Lkv=Lkv, seed=Lq + Lkv, q_scale=_q_scale(name))
    check_gradients(variant(name), q, k, v, q_offset=q_offset)


@pytest.mark.parametrize("Hkv", [1, 4])
def test_gradients_mqa_and_mha(Hkv: int) -> None:
    """MQA sums the four query heads' dK and dV; MHA sums nothing."""
    check_gradients(variant("decay_normalized"), *qkv(Hkv=Hkv, Lq=66, Lkv=66))


def test_gradients_value_width_differs_from_head_dim() -> None:
    """Dv = 40: dN' = [dN, dden] is padded to 44 columns; D = 24."""
    check_gradients(variant("decay_normalized"), *qkv(Lq=70, Lkv=70, D=24, Dv=40))


@pytest.mark.parametrize(("name", "dtype"), [("elu1", torch.float16), ("lightning", torch.bfloat16),
                                             ("strict", torch.bfloat16), ("global", torch.float16)])
def test_gradients_low_precision(name: str, dtype: torch.dtype) -> None:
    """float16 / bfloat16 inputs: float32 products, gradients in the input dtype (FlashAttention's rule)."""
    check_gradients(variant(name), *qkv(Lq=100, Lkv=100, dtype=dtype, q_scale=_q_scale(name)))


def test_gradients_at_zero_denominators() -> None:
    """Rows whose denominator is exactly 0 (o = 0) pass no gradient on, and none is NaN."""
    q, k, v = qkv(Lq=40, Lkv=40)
    q[:, :, 10:20] = -q[:, :, 10:20].abs()  # relu(q) = 0 on these rows
    check_gradients(variant("strict_decay"), q, k, v)


@pytest.mark.parametrize("mask", [masks.causal, None], ids=["causal", "global"])
def test_gradient_of_a_feature_map_table(mask, monkeypatch) -> None:
    """A captured tensor that a traced feature map reads gets its gradient through torch's
    derivative of phi, with no warning."""
    _no_recomputation(monkeypatch, allow_torch=mask is None)
    table = OFFSET.clone().requires_grad_(True)
    program = _linear(mask=mask, feature=lambda x: torch.sigmoid(x) + torch.relu(x) * table[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_gradients(program, *qkv(Lq=50, Lkv=50), learn=(program.plan.regions[0].normalizer.feature_map
                                                              .inputs()[0].name,))


def test_learned_decay_recomputes_in_chunks_with_one_warning() -> None:
    """A learned decay (its gradient weighs each pair by i - j, no kernel run gives it): the torch
    recurrence, chunked, after one warning."""
    linear_backward._WARNED.clear()
    decay = FAST_DECAY.clone().requires_grad_(True)
    program = _linear(mask=_strict, feature="relu", decay=decay)
    name = program.plan.regions[0].normalizer.decay.name
    with pytest.warns(UserWarning, match="learned Linear decay"):
        check_gradients(program, *qkv(Lq=45, Lkv=60), q_offset=15, learn=(name,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_gradients(program, *qkv(Lq=30, Lkv=30, seed=1), learn=(name,))


def test_reversed_kernel_reads_rows_from_the_end() -> None:
    """``LinearShape.reverse``: the kernel on tensors equals the plain kernel on their flips, flipped."""
    program = variant("lightning")
    region = program.plan.regions[0]
    q, k, v = qkv(Lq=70, Lkv=70, q_scale=32**-0.5)
    reversed_out = linear_launch._forward(region, q, k, v, program.tensors, 0, True)
    flipped = linear_launch._forward(region, q.flip(2), k.flip(2), v.flip(2), program.tensors, 0)
    torch.testing.assert_close(reversed_out, flipped.flip(2), rtol=0, atol=0)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(("elu1", "lightning", "strict_decay", "traced")),
    group=st.sampled_from([(4, 1), (4, 2), (4, 4)]),
    Lq=st.integers(1, 100),
    extra_keys=st.integers(-10, 100),
    past=st.integers(0, 60),
    seed=st.integers(0, 2**16),
)
def test_random_gradients(name, group, Lq, extra_keys, past, seed) -> None:
    """Random small shapes, offsets and variants: gradients against the float64 reference."""
    Hq, Hkv = group
    Lkv = max(1, Lq + extra_keys)
    q, k, v = qkv(B=1, Hq=Hq, Hkv=Hkv, Lq=Lq, Lkv=Lkv, seed=seed, q_scale=_q_scale(name))
    with pytest.MonkeyPatch.context() as monkeypatch:
        _no_recomputation(monkeypatch)
        check_gradients(variant(name), q, k, v, q_offset=min(past, max(0, Lkv - 1)))


FUZZ_NAMES = ("elu1", "lightning", "strict_decay", "traced", "global_unnormalized")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(FUZZ_NAMES),
    B=st.integers(1, 2),
    group=st.sampled_from([(4, 1), (4, 2), (4, 4)]),
    Lq=st.integers(1, 140),
    extra_keys=st.integers(-10, 140),
    past=st.integers(0, 80),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(name, B, group, Lq, extra_keys, past, seed) -> None:
    """Random small shapes, offsets and variants against the float64 reference."""
    Hq, Hkv = group
    Lkv = max(1, Lq + extra_keys)
    q_offset = min(past, max(0, Lkv - 1)) if name != "global_unnormalized" else past
    q, k, v = qkv(B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lkv=Lkv, seed=seed, q_scale=_q_scale(name))
    program = variant(name)
    got = program(q, k, v, backend="tvm", q_offset=q_offset)
    ref64, _ = reference_outputs(program, {"q": q, "k": k, "v": v}, q_offset=q_offset)
    assert_close_to_reference(got, ref64, None, Lkv)


def test_backward_allocates_no_lq_by_lkv_buffer() -> None:
    """The causal backward's tensors are O(L): none is as large as one float32 L x L matrix."""
    L = 2048  # NOTE: an event's memory includes its children's: the whole backward's O(L*D) tensors
    one_head = {"lightning": lambda: _linear(feature="identity", normalize=False, decay=DECAY[:1]), "elu1": _linear}
    for name, program in one_head.items():
        q, k, v = qkv(B=1, Hq=1, Hkv=1, Lq=L, Lkv=L, q_scale=_q_scale(name))
        assert largest_backward_allocation(program(), "reference", q, k, v) >= 4 * L * L  # a dense one
        assert largest_backward_allocation(program(), "tvm", q, k, v) < L * L
