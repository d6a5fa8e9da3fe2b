"""Captured tensors read by generated kernels: bounds checked before launch, negative indices from
the end, as torch indexing and the reference backend do (``attncc.codegen.call_ranges``)."""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc import masks
from attncc.codegen import call_ranges
from attncc.testing import check_against_reference, check_gradients, random_qkv

pytest.importorskip("tvm")


def _qkv(H: int = 4, L: int = 40, seed: int = 0) -> tuple[torch.Tensor, ...]:
    return random_qkv(B=1, Hq=H, Hkv=H, Lq=L, Lkv=L, D=16, Dv=16, seed=seed)


@pytest.mark.parametrize("backend", ["tvm", None])
def test_reads_past_the_end_raise_as_in_the_reference(backend: str | None) -> None:
    """Two slopes for four heads, document ids shorter than the keys, two sinks for four heads:
    an IndexError naming the tensor, never neighbouring memory."""
    slopes = torch.tensor([0.5, 0.25])
    alibi = attncc.variant(lambda s, b, h, q, kv: s - slopes[h] * (q - kv), mask=masks.causal)
    docs = torch.zeros(30, dtype=torch.long)
    document = attncc.variant(mask=lambda b, h, q, kv: docs[q] == docs[kv])
    sinks = attncc.variant(mask=masks.causal, normalizer=attncc.Softmax(sink=torch.zeros(2)))
    for program, match in ((alibi, "'slopes'"), (document, "'docs'")):
        with pytest.raises(IndexError, match=match):
            program(*_qkv(), backend=backend)
    with pytest.raises(ValueError, match="one value per query head"):  # checked before any backend
        sinks(*_qkv(), backend=backend)
    with pytest.raises(IndexError, match="'slopes'"):
        alibi(*_qkv(), backend="reference")


def test_a_decoding_step_past_the_table_raises_after_steps_within_it() -> None:
    """The check is memoized per bucket of steps; a bucket that reaches past the table is decided
    on the step's own ranges: steps inside pass, the first one past the end raises."""
    table = torch.randn(4, 100)
    program = attncc.variant(lambda s, b, h, q, kv: s + table[h, q], mask=masks.causal)
    k, v = _qkv(L=120)[1:]
    for position in (60, 99):
        q = torch.randn(1, 4, 1, 16)
        program(q, k[:, :, : position + 1], v[:, :, : position + 1], q_offset=position, backend="tvm")
    with pytest.raises(IndexError, match="'table'"):
        program(q, k[:, :, :101], v[:, :, :101], q_offset=100, backend="tvm")


def test_negative_indices_count_from_the_end() -> None:
    """``table[h, q - kv]`` over a ``[H, 2L - 1]`` table: negative distances read the end, as in
    eager torch and FlexAttention; forward and the learned table's gradient."""
    L = 40
    table = torch.randn(4, 2 * L - 1, generator=torch.Generator().manual_seed(1))
    program = attncc.variant(lambda s, b, h, q, kv: s + table[h, q - kv])
    check_against_reference(program, *_qkv(L=L), backend="tvm")
    learned = table.clone().requires_grad_(True)
    trained = attncc.variant(lambda s, b, h, q, kv: s + learned[h, q - kv], mask=masks.sliding_window(9))
    name = next(n for n, t in trained.tensors.items() if t is learned)
    check_gradients(trained, *_qkv(L=L, seed=2), learn=(name,))


def test_index_read_from_another_tensor_follows_its_contents() -> None:
    """``bias[docs[kv]]``: the index ranges over docs' values; editing docs in place past the
    table is caught on the next call (the memo keys on the tensor's version)."""
    docs = torch.tensor([0] * 20 + [1] * 20)
    bias = torch.tensor([0.0, 0.5])
    program = attncc.variant(lambda s, b, h, q, kv: s + bias[docs[kv]])
    check_against_reference(program, *_qkv(), backend="tvm")
    docs[5] = 2
    with pytest.raises(IndexError, match="'bias'"):
        program(*_qkv(), backend="tvm")


def test_comparisons_of_booleans_compile() -> None:
    """``==``, ``!=`` and ``^`` between booleans (TVM lowered them to a float compare of i1 values,
    which LLVM rejected)."""
    keep = torch.arange(40) % 3 != 0
    for mask in (lambda b, h, q, kv: (q >= kv) ^ (kv % 2 == 0),
                 lambda b, h, q, kv: (q >= kv) != (kv % 2 == 0),
                 lambda b, h, q, kv: keep[q] == keep[kv]):
        check_against_reference(attncc.variant(mask=mask), *_qkv(), backend="tvm")


def test_may_be_negative_from_the_form_alone() -> None:
    """Plain index variables and their sums are never negative: no wrap is rendered for them."""
    table = torch.randn(4, 200)
    program = attncc.variant(lambda s, b, h, q, kv: s + table[h, q + kv] + table[h, q - kv + 3])
    loads = [n for n in program.plan.regions[0].score.walk() if n.op == "load"]
    found = {str(load.src[2]): call_ranges.may_be_negative(load.src[2]) for load in loads}
    assert sorted(found.values()) == [False, True], found


@pytest.mark.parametrize("op", ["floordiv", "mod"])
def test_an_integer_divisor_that_can_be_zero_raises(op: str) -> None:
    """``q // (kv - 5)`` divides by 0 at kv = 5: ZeroDivisionError, as in the reference (in the
    kernel it trapped, and SIGFPE killed the process); a divisor that stays away from 0 runs."""
    divide = (lambda a, d: a // d) if op == "floordiv" else (lambda a, d: a % d)
    zero = attncc.variant(lambda s, b, h, q, kv: s + divide(q, kv - 5) * 0.01)
    with pytest.raises(ZeroDivisionError, match="divisor"):
        zero(*_qkv(), backend="tvm")
    with pytest.raises(RuntimeError, match="divisor"):  # as torch raises for integer tensors
        zero(*_qkv(), backend="tvm")
    safe = attncc.variant(lambda s, b, h, q, kv: s + divide(q, kv + 1) * 0.01)
    check_against_reference(safe, *_qkv(), backend="tvm")
    odd = attncc.variant(lambda s, b, h, q, kv: s + divide(q, 2 * kv - 5) * 0.01)  # its range holds 0, it never is
    check_against_reference(odd, *_qkv(), backend="tvm")


def test_the_memo_holds_the_tensors_it_checked() -> None:
    """A checked call's entry keeps its captured tensors alive, so that a new tensor cannot take a
    freed one's id (and version 0) and pass as already checked."""
    docs = torch.tensor([0] * 20 + [1] * 20)
    bias = torch.tensor([0.0, 0.5])
    program = attncc.variant(lambda s, b, h, q, kv: s + bias[docs[kv]])
    program(*_qkv(), backend="tvm")
    assert any(t is docs for _, held in call_ranges._CHECKED.values() for t in held)


def test_positions_past_float32_integers_are_refused() -> None:
    """Sums of index variables are computed in float32 (exact below 2**24)."""
    q, k, v = _qkv(L=8)
    with pytest.raises(NotImplementedError, match="positions"):
        attncc.variant(mask=masks.causal)(q[:, :, :1], k, v, q_offset=call_ranges.MAX_POSITIONS, backend="tvm")
    # the automatic choice runs them on the reference instead of raising
    program = attncc.variant(mask=masks.causal)
    out = program(q[:, :, :1], k, v, q_offset=call_ranges.MAX_POSITIONS)
    assert "fell back to reference" in program.last_choice.reason
    torch.testing.assert_close(out, program(q[:, :, :1], k, v, q_offset=call_ranges.MAX_POSITIONS,
                                            backend="reference"), atol=0, rtol=0)


def test_an_index_intervals_cannot_bound_is_evaluated_exactly() -> None:
    """``q - (q // 5) * 5`` is always in [0, 4]; its interval [-15, 15] made the call raise."""
    table = torch.randn(5)
    program = attncc.variant(lambda s, b, h, q, kv: s + table[q - (q // 5) * 5])
    check_against_reference(program, *_qkv(), backend="tvm")
    assert program(*_qkv()) is not None and program.last_choice.backend.name == "tvm"


def test_an_index_read_from_a_tensor_never_leaves_the_buffer() -> None:
    """Bounds are checked again when a tensor's version changes; a write torch does not count
    (a NumPy view refilled, ``.data``) skipped the check and the kernel read 3 GB past ``T``
    (SIGSEGV). Such indices are clamped: a wrong element at worst, as documented."""
    table = torch.randn(5)
    ids = torch.arange(40) % 5
    program = attncc.variant(lambda s, b, h, q, kv: s + table[ids[kv]])
    program(*_qkv(), backend="tvm")
    ids.data[:] = 375_000_000  # not counted by ids._version
    assert torch.isfinite(program(*_qkv(), backend="tvm")).all()
