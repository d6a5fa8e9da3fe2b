"""Tolerances of SEMANTICS.md ("Numerical tolerance used by tests"), shared by every test.

``check_against_reference`` runs a variant on a backend and compares it with a float64
reference computed from the same inputs; for float16/bfloat16 it applies FlashAttention's
rule, measuring the reference backend's own error in that dtype. ``check_gradients`` does the
same for the gradients of q, k, v and learned captured tensors, at twice the tolerance.
"""

from __future__ import annotations

import math
from typing import Any

import torch

LOW_PRECISION_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def float32_tolerance(Lkv: int) -> float:
    return 2e-5 * (math.sqrt(Lkv / 128) if Lkv > 128 else 1.0)


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    finite = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), finite):
        return math.inf
    if not torch.equal(a[~finite], b[~finite].to(a.dtype)):
        return math.inf
    diff = (a.double() - b.double()).abs()[finite]
    return float(diff.max()) if diff.numel() else 0.0


def assert_close_to_reference(
    out: torch.Tensor,
    ref64: torch.Tensor,
    ref_lowp: torch.Tensor | None,
    Lkv: int,
    what: str = "output",
    factor: float = 1.0,
) -> None:
    """``factor=2`` for gradients ("twice the forward tolerance")."""
    if out.shape != ref64.shape:
        raise AssertionError(f"{what}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}")
    if torch.isnan(out).any():
        raise AssertionError(f"{what}: contains NaN")
    if out.dtype in (torch.float32, torch.float64):
        tol = factor * float32_tolerance(Lkv)
        diff = (out.double() - ref64.double()).abs()
        bound = tol + tol * ref64.double().abs()
        bad = ~(diff <= bound)
        finite = torch.isfinite(ref64)
        # NOTE: where the reference is +-inf the output must be the same infinity (lse = -inf).
        finite_mismatch = (torch.isfinite(out) != finite) | (~finite & (out.double() != ref64.double()))
        if bad[finite].any() or finite_mismatch.any():
            raise AssertionError(f"{what}: max abs error {max_abs_error(out, ref64):.3g} exceeds atol=rtol={tol:.3g}")
        return
    assert ref_lowp is not None, "low-precision comparisons need the reference run in that dtype"
    e_ref = max_abs_error(ref_lowp, ref64)
    if not math.isfinite(e_ref):  # a reference that overflows in this dtype grants no allowance
        e_ref = 0.0
    bound = factor * max(2 * e_ref, LOW_PRECISION_FLOOR[out.dtype])
    err = max_abs_error(out, ref64)
    if not err <= bound:
        raise AssertionError(
            f"{what}: max abs error {err:.3g} exceeds max(2*e_ref={2 * e_ref:.3g}, floor) = {bound:.3g}"
        )


def _run(
    program: Any, operands: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor] | None, **kwargs: Any
) -> Any:
    from attncc.codegen.reference.attention import run_plan

    return run_plan(program.plan, operands, tensors if tensors is not None else program.tensors, **kwargs)


def reference_outputs(
    program: Any, operands: dict[str, torch.Tensor], *, scale: float | None = None, q_offset: int = 0,
    return_lse: bool = False,
) -> tuple[Any, Any]:
    """(float64 reference from upcast inputs, reference computed in the inputs' own dtype)."""
    up = {n: t.double() for n, t in operands.items()}
    tensors64 = {n: (t.double() if t.is_floating_point() else t) for n, t in program.tensors.items()}
    ref64 = _run(program, up, tensors64, scale=scale, q_offset=q_offset, return_lse=return_lse)
    dtype = next(iter(operands.values())).dtype
    lowp = None
    if dtype in LOW_PRECISION_FLOOR:
        lowp = _run(program, operands, None, scale=scale, q_offset=q_offset, return_lse=return_lse,
                    compute_dtype=dtype)
    return ref64, lowp


def check_against_reference(
    program: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str | None,
    scale: float | None = None, q_offset: int = 0, return_lse: bool = False,
) -> None:
    """Run ``program(q, k, v, backend=backend)`` and assert SEMANTICS.md's tolerance."""
    operands = {"q": q, "k": k, "v": v}
    got = program(q, k, v, backend=backend, scale=scale, q_offset=q_offset, return_lse=return_lse)
    ref64, lowp = reference_outputs(program, operands, scale=scale, q_offset=q_offset, return_lse=return_lse)
    Lkv = k.shape[2]
    if return_lse:
        assert_close_to_reference(got[0], ref64[0], lowp[0] if lowp else None, Lkv)
        lse_ref = ref64[1].double()
        assert_close_to_reference(got[1].double(), lse_ref, None, Lkv, what="lse")
    else:
        assert_close_to_reference(got, ref64, lowp, Lkv)


def _loss(out: torch.Tensor, lse: torch.Tensor | None, seed: int) -> torch.Tensor:
    """A seeded random projection of (o, lse): every output element gets its own weight."""
    gen = torch.Generator().manual_seed(seed + 100)
    loss = (out.double() * torch.randn(out.shape, generator=gen, dtype=torch.float64)).sum()
    if lse is not None:  # the lse's own gradient: d lse_i / d s_ij = p_ij
        weights = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
        loss = loss + (torch.where(torch.isfinite(lse), lse.double(), 0.0) * weights).sum()
    return loss


def _reference_gradients(
    program: Any, inputs: tuple[torch.Tensor, ...], learn: tuple[str, ...], dtype: torch.dtype, *, q_offset: int,
    with_lse: bool, seed: int, compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, ...]:
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in inputs]
    live = {n: (t.detach().to(dtype) if t.is_floating_point() else t) for n, t in program.tensors.items()}
    learned = [live[n].requires_grad_(True) for n in learn]
    got = _run(program, dict(zip("qkv", leaves)), live, scale=None, q_offset=q_offset, return_lse=with_lse,
               compute_dtype=compute_dtype)
    out, lse = got if with_lse else (got, None)
    return torch.autograd.grad(_loss(out, lse, seed), (*leaves, *learned))


def check_gradients(
    program: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "tvm", q_offset: int = 0,
    learn: tuple[str, ...] = (), with_lse: bool = False, seed: int = 0,
) -> None:
    """Gradients of q, k, v and the captured tensors named in ``learn`` (which require grad) from
    ``backend`` against the float64 reference's, at twice the forward tolerance (SEMANTICS.md);
    float16 / bfloat16 by FlashAttention's rule, the reference's own error measured in that dtype."""
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    learned = [program.tensors[n] for n in learn]
    got = program(*leaves, backend=backend, q_offset=q_offset, return_lse=with_lse)
    out, lse = got if with_lse else (got, None)
    grads = torch.autograd.grad(_loss(out, lse, seed), (*leaves, *learned))
    ref64 = _reference_gradients(program, (q, k, v), learn, torch.float64, q_offset=q_offset, with_lse=with_lse,
                                 seed=seed)
    lowp: list[torch.Tensor | None] | tuple[torch.Tensor, ...] = [None] * len(ref64)
    if q.dtype in LOW_PRECISION_FLOOR:
        lowp = _reference_gradients(program, (q, k, v), learn, q.dtype, q_offset=q_offset, with_lse=with_lse,
                                    seed=seed, compute_dtype=q.dtype)
    names = ["dq", "dk", "dv", *(f"d{n}" for n in learn)]
    for name, g, want, want_lowp in zip(names, grads, ref64, lowp):
        assert g.dtype == (q.dtype if name in ("dq", "dk", "dv") else program.tensors[name[1:]].dtype)
        # NOTE: a float32 tensor learned from low-precision inputs is held to the low-precision rule.
        got_lowp = g.to(want_lowp.dtype) if want_lowp is not None else g
        assert_close_to_reference(got_lowp, want, want_lowp, k.shape[2], what=name, factor=2.0)


def check_gradient_penalty(program: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str,
                           seed: int = 0) -> None:
    """Assert that a gradient penalty (``create_graph=True``, then a loss on dq and dk) gets the
    reference backend's gradients on ``backend``: second-order terms included, none dropped. The
    loss is linear in the output, so that only the recomputed graph carries them. Warnings (a
    backend's switch to its reference path) are the caller's to check."""
    import warnings

    weight = torch.randn(q.shape[:3] + v.shape[3:], generator=torch.Generator().manual_seed(seed)).to(q)
    found = []
    for name in (backend, "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = (program(*leaves, backend=name) * weight).sum()
            dq, dk = torch.autograd.grad(loss, leaves[:2], create_graph=True)
            assert dq.requires_grad and dk.requires_grad, f"{name}: the gradients have no graph"
            found.append(torch.autograd.grad(loss + dq.square().sum() + dk.square().sum(), leaves))
    for got, want in zip(*found, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def largest_backward_allocation(program: Any, backend: str, q: torch.Tensor, k: torch.Tensor,
                                v: torch.Tensor) -> int:
    """The most memory (bytes) one profiler event of ``backend``'s backward allocates; an event
    counts its children's, so a dense backward shows at least its ``Lq x Lkv`` buffers."""
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = program(*leaves, backend=backend)
    grad = torch.randn_like(out)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.autograd.grad(out, leaves, grad)
    return max(event.cpu_memory_usage for event in prof.events())


def check_example(
    program: Any, batch: int, heads: int, seq_len: int, head_dim: int, *, backend: str | None = None,
    label: str | None = None,
) -> None:
    """An example's ``main()``: one line there, the same seed-0 inputs and printed verdict in every file.

    ``label`` replaces the program's name in the printed line when the example wants to show its
    parameters (``"sliding_window(64)"``).
    """
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, generator=gen) for _ in range(3))
    check_against_reference(program, q, k, v, backend=backend)
    name = program.name if label is None else label
    print(f"{name}: ran on {program.last_choice.backend.name}, matches the float64 reference")


def random_qkv(
    B: int = 2, Hq: int = 4, Hkv: int = 2, Lq: int = 37, Lkv: int = 77, D: int = 32, Dv: int | None = None,
    dtype: torch.dtype = torch.float32, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lkv, D]``, ``v [B, Hkv, Lkv, Dv]`` (drawn in float32,
    then cast, so every dtype sees the same values)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, Lkv, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, Lkv, D if Dv is None else Dv, generator=gen).to(dtype)
    return q, k, v
