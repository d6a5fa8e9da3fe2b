"""Corners of the expressions a generated TVM kernel evaluates, each against the reference (torch
semantics): found by fuzzing score and mask functions."""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.testing import check_against_reference, random_qkv

pytest.importorskip("tvm")


def _qkv(L: int = 96) -> tuple[torch.Tensor, ...]:
    return random_qkv(B=1, Hq=2, Hkv=2, Lq=L, Lkv=L, D=16, Dv=16)


def _check(score=None, mask=None, L: int = 96) -> None:
    program = attncc.variant(score, mask=mask) if score is not None else attncc.variant(mask=mask)
    check_against_reference(program, *_qkv(L), backend="tvm")


@pytest.mark.parametrize("op", ["lt", "le", "gt", "ge", "eq", "ne", "xor"])
def test_comparisons_of_two_booleans(op: str) -> None:
    """TVM lowered every comparison of two bools to a float compare of i1 values (LLVM rejects it)."""
    fn = {"lt": lambda a, b: a < b, "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
          "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "xor": lambda a, b: a ^ b}[op]
    _check(mask=lambda b, h, q, kv: fn(q > 40, kv > 50) | (q == kv))


def test_shifts_past_63_and_negative_follow_torch() -> None:
    """``<<`` past 63 or by a negative amount gives 0, ``>>`` the sign (x86 masks the count to 6
    bits; a constant amount of 64 failed the build)."""
    _check(lambda s, b, h, q, kv: s + ((q + 1) << 64).float())
    _check(lambda s, b, h, q, kv: s + ((q - 20) >> 64).float())
    _check(lambda s, b, h, q, kv: s + ((kv << (q + 60)) != 0).float() + ((q - 50) >> (kv - 40)).float() * 0.1)


def test_float_constants_beyond_float32_saturate() -> None:
    """``1e39`` is inf in float32, as torch rounds it (TVM rejected the literal)."""
    _check(lambda s, b, h, q, kv: torch.where(kv < 10, s - 1e39, s))


def test_float_remainder_is_torch_remainder() -> None:
    """``x % 0.1`` at x = 1 is 0.0999..., not ``x - floor(x / 0.1) * 0.1`` (0 after rounding);
    negative operands take the divisor's sign."""
    _check(lambda s, b, h, q, kv: s + torch.where(kv >= 3, 1.0, 0.0) % 0.1 + (s - 0.5) % -0.7)


def test_tanh_near_zero_keeps_its_relative_precision() -> None:
    """A wide soft cap (``500 tanh(s / 500)``) multiplies tanh's absolute error near 0 (1e-7)."""
    _check(lambda s, b, h, q, kv: 500.0 * torch.tanh(s / 500.0))
    _check(lambda s, b, h, q, kv: 3000.0 * torch.tanh(s / 3000.0))


def test_float_to_int_casts_truncate_in_the_block_map() -> None:
    """``(0.001 * (kv - q)).long()`` is 0 on every pair, so the mask below keeps nothing: the
    sparsity analysis proved a tile FULL from the untruncated range."""
    _check(mask=lambda b, h, q, kv: ((kv - q) * 0.001).long() < 0)


def test_integer_expressions_that_may_wrap_run_on_the_reference() -> None:
    """torch wraps int64 past 2**63; TVM's simplifier assumes it does not (``q * 2**62 > 0``
    became ``q > 0``; ``q + 2**63 - 1`` failed the build). The TVM backend declines them, naming
    the expression, and the automatic choice computes them as torch does."""
    q, k, v = _qkv()
    for program in (attncc.variant(mask=lambda b, h, q_idx, kv_idx: q_idx * 2**62 > 0),
                    attncc.variant(mask=lambda b, h, q_idx, kv_idx: q_idx + (2**63 - 1) > 0),
                    attncc.variant(lambda s, b, h, q_idx, kv_idx: s + (kv_idx * 2**62 // 2**61).float())):
        with pytest.raises(NotImplementedError, match=r"may pass 2\*\*62"):
            program(q, k, v, backend="tvm")
        out = program(q, k, v)
        assert "fell back to reference" in program.last_choice.reason
        torch.testing.assert_close(out, program(q, k, v, backend="reference"), atol=0, rtol=0)
    _check(mask=lambda b, h, q_idx, kv_idx: (q_idx * 2**30 - kv_idx * 2**30) >= 0)  # within range: generated



def test_a_loaded_integer_scaled_past_2_31_is_declined() -> None:
    """A loaded value is the data's: ``ids[kv] * 2**62 > 0`` was folded as ``ids[kv] > 0``."""
    ids = torch.arange(96) % 7
    q, k, v = _qkv()
    program = attncc.variant(mask=lambda b, h, q_idx, kv_idx: ids[kv_idx] * 2**62 > 0)
    with pytest.raises(NotImplementedError, match=r"may pass 2\*\*62"):
        program(q, k, v, backend="tvm")
    _check(mask=lambda b, h, q_idx, kv_idx: (ids[q_idx] == ids[kv_idx]) | (ids[kv_idx] * 1000 + 1 < q_idx))
