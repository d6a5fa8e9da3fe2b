"""Bad code fails when it is declared; bad tensors fail before any backend runs.

Decoration-time errors name the function, the line and the construct; argument errors
name the argument and what was expected.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import attncc
from attncc.ir.trace import TraceError


def _line_of(fn, text: str) -> int:
    """Line number of the first source line of ``fn`` containing ``text``."""
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


def _expect_trace_error(fn, construct: str, line_text: str, **variant_kwargs) -> None:
    with pytest.raises(TraceError) as info:
        if variant_kwargs.pop("as_mask", False):
            attncc.variant(mask=fn, **variant_kwargs)
        else:
            attncc.variant(fn, **variant_kwargs)
    message = str(info.value)
    assert fn.__name__ in message, message
    assert f"{__file__}:{_line_of(fn, line_text)}" in message, message
    assert construct in message, message


def test_python_if_on_traced_value() -> None:
    def branchy(score, b, h, q_idx, kv_idx):
        if q_idx > kv_idx:
            return score
        return score * 2

    _expect_trace_error(branchy, "if", "if q_idx > kv_idx")


def test_python_and_on_traced_values() -> None:
    def both(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx and kv_idx > 0

    _expect_trace_error(both, "torch.where", "and kv_idx", as_mask=True)


def test_item() -> None:
    def scalar(score, b, h, q_idx, kv_idx):
        return score * q_idx.item()

    _expect_trace_error(scalar, ".item()", "q_idx.item()")


@pytest.mark.parametrize("construct", ["torch.cumsum", "torch.sort"])
def test_unsupported_torch_function(construct: str) -> None:
    def cumulative(score, b, h, q_idx, kv_idx):
        return torch.cumsum(score, 0)

    def ordered(score, b, h, q_idx, kv_idx):
        return torch.sort(score).values

    fn = cumulative if construct == "torch.cumsum" else ordered
    _expect_trace_error(fn, construct, construct)


def test_tensor_captured_on_another_device() -> None:
    doc_ids = torch.zeros(16, dtype=torch.int64)
    other = torch.zeros(16, dtype=torch.int64, device="meta")

    def two_devices(b, h, q_idx, kv_idx):
        return doc_ids[q_idx] == other[kv_idx]

    _expect_trace_error(two_devices, "device meta", "other[kv_idx]", as_mask=True)


def test_sink_on_another_device_than_a_captured_table() -> None:
    table = torch.zeros(16, device="meta")

    def biased(score, b, h, q_idx, kv_idx):
        return score + table[q_idx]

    _expect_trace_error(biased, "device meta", "table[q_idx]", normalizer=attncc.Softmax(sink=torch.zeros(4)))


def test_float_index() -> None:
    positions = torch.arange(16)

    def halves(score, b, h, q_idx, kv_idx):
        return score + positions[q_idx / 2]

    _expect_trace_error(halves, "floating-point", "positions[q_idx / 2]")


def test_bool_index_is_refused() -> None:
    positions = torch.arange(16)

    def masked(score, b, h, q_idx, kv_idx):
        return score + positions[q_idx > kv_idx]

    _expect_trace_error(masked, "boolean index", "positions[q_idx > kv_idx]")


def test_min_with_int_second_argument_is_a_reduction() -> None:
    def reduce(score, b, h, q_idx, kv_idx):
        return torch.max(score, 0)

    _expect_trace_error(reduce, "reduction", "torch.max(score, 0)")


def test_error_in_helper_names_helper_and_line() -> None:
    def helper(x):
        return torch.argsort(x)

    def outer(score, b, h, q_idx, kv_idx):
        return score + helper(q_idx)

    with pytest.raises(TraceError) as info:
        attncc.variant(outer)
    message = str(info.value)
    assert "outer" in message and "helper" in message and "torch.argsort" in message
    assert f":{_line_of(helper, 'argsort')}" in message


# ---- var(q, k, v) argument checks (attncc/validate.py) --------------------------------------


def _qkv(B=1, Hq=4, Hkv=2, L=5, D=8, Dv=8, dtype=torch.float32):
    return (torch.randn(B, Hq, L, D, dtype=dtype), torch.randn(B, Hkv, L, D, dtype=dtype),
            torch.randn(B, Hkv, L, Dv, dtype=dtype))


VAR = attncc.variant(mask=lambda b, h, q, k: q >= k)


def _bad(q, k, v, exc: type[Exception], *needles: str) -> None:
    with pytest.raises(exc) as info:
        VAR(q, k, v, backend="reference")
    for needle in needles:
        assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_wrong_rank(which: str) -> None:
    ops = dict(zip("qkv", _qkv(), strict=True))
    ops[which] = ops[which][0]
    _bad(ops["q"], ops["k"], ops["v"], ValueError, f"{which} must have rank 4", "[B, H, L, D]")


def test_heads_not_divisible() -> None:
    q, k, v = _qkv(Hq=6, Hkv=4)
    _bad(q, k, v, ValueError, "q heads (6)", "k heads (4)")


def test_kv_head_count_mismatch() -> None:
    q, k, _ = _qkv(Hkv=2)
    v = torch.randn(1, 4, 5, 8)
    _bad(q, k, v, ValueError, "k and v", "heads")


def test_head_dim_mismatch() -> None:
    q, _, v = _qkv()
    k = torch.randn(1, 2, 5, 7)
    _bad(q, k, v, ValueError, "k head dim 7", "q head dim 8")


def test_length_mismatch_between_k_and_v() -> None:
    q, k, _ = _qkv()
    v = torch.randn(1, 2, 6, 8)
    _bad(q, k, v, ValueError, "k and v", "length", "5", "6")


def test_batch_mismatch() -> None:
    q, k, v = _qkv()
    _bad(q, k[:0].expand(0, 2, 5, 8), v, ValueError, "batch", "k")


def test_mixed_devices() -> None:
    q, k, v = _qkv()
    _bad(q, k, v.to("meta"), ValueError, "v is on meta", "q is on cpu")


def test_mixed_dtypes() -> None:
    q, k, v = _qkv()
    _bad(q, k.half(), v, TypeError, "k has dtype torch.float16", "q has dtype torch.float32")


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_integer_tensors(which: str) -> None:
    ops = dict(zip("qkv", _qkv(), strict=True))
    ops[which] = ops[which].long()
    _bad(ops["q"], ops["k"], ops["v"], TypeError, f"{which} must be", "torch.int64")


def test_not_a_tensor() -> None:
    q, k, _ = _qkv()
    _bad(q, k, [1.0], TypeError, "v must be a torch.Tensor")


def test_captured_tensor_on_another_device_than_q() -> None:
    table = torch.zeros(8, device="meta")
    var = attncc.variant(lambda s, b, h, q, k: s + table[q])
    with pytest.raises(ValueError, match="captured tensor 'table' is on meta"):
        var(*_qkv(), backend="reference")


@pytest.mark.parametrize(("value", "error", "message"), [
    (-1, ValueError, "q_offset must be non-negative, got -1"),
    (np.int64(-2), ValueError, "q_offset must be non-negative, got -2"),
    (1.5, TypeError, "q_offset must be an int, got float"),
    (True, TypeError, "q_offset must be an int, got bool"),
    (torch.tensor(3), TypeError, "q_offset must be an int, got Tensor"),
])
def test_bad_q_offset(value, error, message) -> None:
    with pytest.raises(error, match=message):
        VAR(*_qkv(), q_offset=value, backend="reference")


@pytest.mark.parametrize("backend", ["reference", "tvm"])
def test_numpy_numbers_are_ints_and_floats(backend: str) -> None:
    """``q_offset=np.int64(3)`` was refused as "must be a non-negative int" (it is one), and
    ``scale=np.float32(0.5)`` as not a float."""
    qkv = _qkv()
    want = VAR(*qkv, q_offset=3, scale=0.5, backend=backend)
    got = VAR(*qkv, q_offset=np.int64(3), scale=np.float32(0.5), backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bad_scale() -> None:
    with pytest.raises(TypeError, match="scale"):
        VAR(*_qkv(), scale="0.1", backend="reference")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scale(value: float) -> None:
    """TVM returned zeros (every score masked), the reference NaN."""
    for backend in ("reference", "tvm"):
        with pytest.raises(ValueError, match="scale must be finite"):
            VAR(*_qkv(), scale=value, backend=backend)


def _differential() -> attncc.Program:
    g = attncc.GraphBuilder("diff")
    q1, k1, q2, k2, v = g.inputs("q1", "k1", "q2", "k2", "v")
    lam = g.scalar("lam")
    return g.build(g.attention(q1, k1, v, mask=attncc.masks.causal) - lam * g.attention(q2, k2, v, mask=attncc.masks.causal))


def test_combined_outputs_of_different_shapes_name_their_inputs() -> None:
    program = _differential()
    x = {n: torch.randn(1, 4, 16, 8) for n in ("q1", "k1", "k2", "v")}
    for q2 in (torch.randn(1, 4, 10, 8), torch.randn(1, 8, 16, 8)):
        for backend in ("reference", "tvm"):
            with pytest.raises(ValueError, match=r"must agree: q1 and v give \[1, 4, 16, 8\]; q2 and v give"):
                program(**x, q2=q2, lam=torch.tensor(0.5), backend=backend)


def test_return_lse_of_a_combined_graph_is_refused_by_name() -> None:
    x = {n: torch.randn(1, 2, 16, 8) for n in ("q1", "k1", "q2", "k2", "v")}
    with pytest.raises(ValueError, match="return_lse=True is defined for a single attention"):
        _differential()(**x, lam=torch.tensor(0.5), return_lse=True, backend="reference")


def test_unknown_normalizer_lists_known_names() -> None:
    with pytest.raises(ValueError) as info:
        attncc.variant(normalizer="softmaxx")
    message = str(info.value)
    assert "softmaxx" in message
    for name in ("softmax", "sigmoid", "softplus", "relu", "relu2", "stick_breaking"):
        assert name in message


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="backend='nope'"):
        VAR(*_qkv(), backend="nope")


def test_python_error_inside_torch_points_at_the_user_line() -> None:
    def bad_unpack(score, b, h, q_idx, kv_idx):
        first, _ = q_idx  # iterating a 0-dim value fails inside torch
        return score + first

    with pytest.raises(TraceError) as info:
        attncc.variant(bad_unpack)
    message = str(info.value)
    assert "bad_unpack" in message and f"{__file__}:{_line_of(bad_unpack, 'first, _')}" in message, message


@pytest.mark.parametrize("construct", ["s & 1", "s | q_idx", "1 ^ s", "s >> 1"])
def test_bitwise_on_float_is_refused(construct: str) -> None:
    fn = eval(f"lambda s, b, h, q_idx, kv_idx: {construct}")
    with pytest.raises(TraceError, match="bitwise"):
        attncc.variant(fn)


def test_in_place_widening_keeps_its_message() -> None:
    def widening(b, h, q_idx, kv_idx):
        q_idx *= 0.5
        return q_idx > kv_idx

    _expect_trace_error(widening, "in-place", "q_idx *= 0.5", as_mask=True)


@pytest.mark.parametrize("backend", ["reference", "tvm", None])
@pytest.mark.parametrize(("what", "sizes"), [("B=0", {"B": 0}), ("Hq=Hkv=0", {"Hq": 0, "Hkv": 0}), ("Dv=0", {"Dv": 0})])
def test_empty_inputs_give_an_empty_output_on_every_backend(what: str, sizes: dict, backend: str | None) -> None:
    """As for Lq=0 or Lkv=0, nothing is computed: the backends' shape keys need every size >= 1."""
    q, k, v = _qkv(**sizes)
    out = VAR(q, k, v, backend=backend)
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3]) and out.dtype == q.dtype, what
    assert out.numel() == 0


def test_zero_value_dim_still_returns_the_lse() -> None:
    """Dv=0 empties the output, not the lse: it depends on q and k only."""
    q, k, v = _qkv(Dv=4)
    out, lse = VAR(q, k, v[..., :0], return_lse=True)
    assert out.shape == (1, 4, 5, 0)
    torch.testing.assert_close(lse, VAR(q, k, v, return_lse=True, backend="reference")[1])


def test_zero_head_dim_names_the_head_dim() -> None:
    q, k, v = _qkv(D=0)
    with pytest.raises(ValueError, match="q head dim must be at least 1"):
        VAR(q, k, v)


def test_heads_without_kv_heads_still_fail() -> None:
    q, k, v = _qkv(Hkv=0)
    with pytest.raises(ValueError, match="multiple of k heads"):
        VAR(q, k, v)


def test_explain_refuses_a_block_map_too_large_to_build() -> None:
    """``--blocks 100000 --tile 1`` asks for 10^10 tiles: a usage error before anything is loaded
    or allocated, not the process killed for memory."""
    from click.testing import CliRunner

    from attncc.cli import main
    from attncc.explain import MAX_BLOCK_TILES, block_grid_error

    result = CliRunner().invoke(main, ["explain", "missing.py:var", "--blocks", "100000", "--tile", "1"])
    assert result.exit_code == 2, result.output
    assert "--blocks" in result.output and "--tile" in result.output
    assert block_grid_error(2048, (1, 1)) is None and 2048 * 2048 == MAX_BLOCK_TILES
    assert block_grid_error(2049, (1, 1)) is not None
    assert block_grid_error(100000, (64, 64)) is None


@pytest.mark.parametrize("backend", ["reference", "tvm"])
def test_tensors_shaped_by_q_are_checked_on_every_backend(backend: str) -> None:
    """A sink or decay holds one value per query head, a TopKHeads router ``[B, Lq, Hq]``: TVM
    cut a longer sink silently and zeroed the tokens a short router left out; the reference
    broadcast a ``[B, 1, Hq]`` router."""
    if backend == "tvm":
        pytest.importorskip("tvm")
    q, k, v = (torch.randn(1, 4, 40, 16) for _ in range(3))
    sink = attncc.variant(mask=attncc.masks.causal, normalizer=attncc.Softmax(sink=torch.zeros(8)))
    with pytest.raises(ValueError, match=r"sink tensor 'sink' must hold one value per query head \(4\), got shape \(8,\)"):
        sink(q, k, v, backend=backend)
    decay = attncc.variant(mask=attncc.masks.causal, normalizer=attncc.Linear(decay=torch.full((2,), 0.9)))
    with pytest.raises(ValueError, match=r"decay tensor 'decay' must hold one value per query head \(4\)"):
        decay(q, k, v, backend=backend)
    for shape in ((1, 1, 4), (1, 30, 4), (3, 40, 4), (1, 40, 8)):
        routed = attncc.variant(mask=attncc.masks.causal, routing=attncc.TopKHeads(2, torch.randn(shape)))
        with pytest.raises(ValueError, match=r"TopKHeads router 'router' must be \[B, Lq, Hq\] = \[1, 40, 4\]"):
            routed(q, k, v, backend=backend)
    routed = attncc.variant(mask=attncc.masks.causal, routing=attncc.TopKHeads(2, torch.randn(1, 40, 4)))
    assert routed(q, k, v, backend=backend).shape == (1, 4, 40, 16)


def test_a_scalar_may_not_take_an_output_name() -> None:
    g = attncc.GraphBuilder("taken")
    with pytest.raises(ValueError, match="scalar name 'o1' is taken"):
        g.scalar("o1")
