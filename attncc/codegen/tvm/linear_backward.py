"""The backward of linear attention: the chunked kernel (``linear.py``) run on derived inputs.

Why no kernel of its own: the gradients of a causal linear attention are causal linear
attentions themselves. With ``W_ij = g ** (i - j)`` on the visible pairs (``j <= i``, or
``j < i`` for the strict mask) and 0 elsewhere, ``A = W * phi(Q) phi(K)^T``, the numerator
``N = A V`` and the denominator ``den = A 1``; write ``V' = [V, 1]`` and ``dN' = [dN, dden]``
with ``dN = dO / den`` and ``dden = -(dO . O) / den`` (both 0 where ``den == 0``, and
``dN' = dO`` without the normalizer). Then

- ``d phi(Q) = (W * dN' V'^T) phi(K)``: query ``dN'``, key ``V'``, value ``phi(K)``;
- ``d phi(K) = (W * dN' V'^T)^T phi(Q)`` and ``dV = A^T dN``: the same products with ``W^T``,
  which is causal (with the same decay) once both sequences are read in reversed time (the
  kernel reads its rows from the end, ``LinearShape.reverse``);

so the kernel with the identity feature map and no normalizer computes each in ``O(L)`` memory
and ``O(L * chunk)`` work (three runs; ``den`` is the forward's, which stores it,
``LinearShape.writes_den``), and torch differentiates ``phi`` (a named map or a traced one, with
the gradients of any captured tensor it reads).

Two cases recompute ``lower_linear.linear_attention`` under autograd instead: the global form
(no mask), four matrix products that torch runs as they are (``O(L)`` memory), and a learned
decay, whose gradient weighs each pair by ``i - j`` (no run of the kernel gives that), by the
chunked recurrence (``O(L * chunk)`` memory) after a one-time warning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from attncc import caller
from attncc.codegen.reference.attention import recompute_input
from attncc.codegen.tvm.autograd import restored_captured, saved_captured
from attncc.ir import nodes
from attncc.ir.dense import expand_kv, feature_map
from attncc.passes.lower_linear import divide_rows_by, linear_attention
from attncc.passes.plan import AttentionRegion

# (region, q, k, v, captured tensors, q_offset, reverse, den) -> o: one run of the kernel
# (linear_launch._forward; den, a buffer for the rows' denominators, or None)
Kernel = Callable[[AttentionRegion, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor], int, bool,
                   torch.Tensor | None], torch.Tensor]

_WARNED: set[AttentionRegion] = set()
LEARNED_DECAY_WARNING = (
    "attncc: a learned Linear decay has no generated backward on the TVM backend; its gradients "
    "are computed by the chunked torch recurrence (O(L * chunk) memory, slower than the kernels)"
)


def linear_with_grad(
    region: AttentionRegion, kernel: Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    tensors: dict[str, torch.Tensor], learned: list[str], q_offset: int,
) -> torch.Tensor:
    """o from the kernel now; gradients later (``learned``: the captured tensors that require grad)."""
    decay = region.normalizer.decay
    generated = region.linear.strategy == "linear_chunked" and (decay is None or decay.name not in learned)
    if not generated and decay is not None and region not in _WARNED:
        _WARNED.add(region)
        caller.warn(LEARNED_DECAY_WARNING)
    context = (region, kernel, tensors, learned, q_offset, generated)
    return _LinearAttention.apply(context, q, k, v, *(tensors[n] for n in learned))


class _LinearAttention(torch.autograd.Function):
    """Forward: the kernel. Backward: ``kernel_gradients`` or ``recomputed_gradients``."""

    @staticmethod
    def forward(ctx: Any, context: tuple, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                *learned: torch.Tensor) -> torch.Tensor:
        region, kernel, tensors, _, q_offset, generated = context
        ctx.context = context
        # the kernel's own denominators, kept for the backward (it would otherwise run again)
        den = None
        if generated and region.normalizer.normalize:
            den = torch.empty(q.shape[:3], dtype=torch.float32)
        out = kernel(region, q.detach(), k.detach(), v.detach(), tensors, q_offset, False, den)
        ctx.save_for_backward(q, k, v, out, den, *learned, *saved_captured(ctx, tensors))
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        """With ``create_graph=True`` (grad mode on here) the gradients must be differentiable: the
        recomputed graph gives them, not the kernels (their second-order term had been dropped)."""
        region, kernel, tensors, names, q_offset, generated = ctx.context
        q, k, v, out, den, *rest = ctx.saved_tensors
        learned = rest[: len(names)]
        live = restored_captured(ctx, tensors, rest[len(names):])
        if generated and not torch.is_grad_enabled():
            grads = kernel_gradients(region, kernel, q, k, v, out, den, grad_out, live, names, q_offset)
        else:
            grads = recomputed_gradients(region, q, k, v, grad_out, live, names, q_offset)
        return (None, *(None if g is None else g.to(t.dtype) for g, t in zip(grads, (q, k, v, *learned))))


def kernel_gradients(
    region: AttentionRegion, kernel: Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    den: torch.Tensor | None, grad_out: torch.Tensor, tensors: dict[str, torch.Tensor], learned: list[str],
    q_offset: int,
) -> tuple[torch.Tensor | None, ...]:
    """(dq, dk, dv, d learned...) of a causal chunked region from three runs of the kernel
    (module docstring), computed in float32 (the caller casts each to its input's dtype);
    ``den``: the forward's denominators ``[B, Hq, Lq]`` (with the normalizer)."""
    norm: nodes.LinearNorm = region.normalizer
    Hq, Lq = q.shape[1], q.shape[2]
    Hkv, Lkv = k.shape[1], k.shape[2]
    plain = dataclasses.replace(region, normalizer=nodes.LinearNorm("identity", normalize=False, decay=norm.decay))
    decay = {norm.decay.name: tensors[norm.decay.name]} if norm.decay is not None else {}

    def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, offset: int = 0,
               reverse: bool = False) -> torch.Tensor:
        return kernel(plain, query, key, value, decay, offset, reverse, None)  # the kernel makes them dense

    with torch.enable_grad():
        q32, k32 = (t.detach().float().requires_grad_(True) for t in (q, k))
        sources = [tensors[n].detach().requires_grad_(True) for n in learned]
        ctx = {**tensors, **dict(zip(learned, sources))}
        ctx = {n: (t.float() if t.is_floating_point() else t) for n, t in ctx.items()}
        fq, fk = feature_map(norm.feature_map, q32, ctx), feature_map(norm.feature_map, k32, ctx)
    phi_q, phi_k, v32, dout = fq.detach(), fk.detach(), v.float(), grad_out.float()
    if norm.normalize:
        den = den.unsqueeze(-1)
        d_num = divide_rows_by(dout, den)
        d_den = divide_rows_by(-(dout * out.float()).sum(-1, keepdim=True), den)
        d_nums, values = _with_ones(d_num, d_den), _with_ones(v32, torch.ones_like(v32[..., :1]))
    else:
        d_num = d_nums = dout
        values = v32
    d_phi_q = attend(d_nums, values, phi_k, q_offset)
    # the transposed products run in reversed time, on one axis of n positions (queries at
    # q_offset + i, keys at j)
    n = max(Lkv, q_offset + Lq)

    def query_side(t: torch.Tensor) -> torch.Tensor:
        return padded_rows(t, q_offset, n)

    def key_side(t: torch.Tensor) -> torch.Tensor:
        return padded_rows(t if Hq == Hkv else expand_kv(t, Hq), 0, n)

    d_phi_k = attend(key_side(values), query_side(d_nums), query_side(phi_q), reverse=True)
    dv = attend(key_side(phi_k), query_side(phi_q), query_side(d_num), reverse=True)
    d_phi_k, dv = (_kv_heads(t[:, :, :Lkv], Hkv) for t in (d_phi_k, dv))
    with torch.enable_grad():
        inputs = [q32, k32, *sources]
        dq, dk, *d_learned = torch.autograd.grad([fq, fk], inputs, [d_phi_q, d_phi_k], allow_unused=True)
    return (dq, dk, dv, *d_learned)


def recomputed_gradients(
    region: AttentionRegion, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
    tensors: dict[str, torch.Tensor], learned: list[str], q_offset: int,
) -> tuple[torch.Tensor | None, ...]:
    """(dq, dk, dv, d learned...) by autograd through ``lower_linear.linear_attention``: the
    global form, or a causal one with a learned decay."""
    norm: nodes.LinearNorm = region.normalizer
    lowering = region.linear
    causal = None if lowering.strategy == "linear_global" else ("strict" if lowering.causal_strict else "inclusive")
    create = torch.is_grad_enabled()  # create_graph=True: differentiable again (recompute_input)
    with torch.enable_grad():
        inputs = [recompute_input(t, create) for t in (q, k, v, *(tensors[n] for n in learned))]
        live = {**tensors, **dict(zip(learned, inputs[3:]))}
        out = linear_attention(
            *inputs[:3], feature=norm.feature_map, normalize=norm.normalize,
            decay=None if norm.decay is None else live[norm.decay.name], causal=causal, chunk=lowering.chunk,
            q_offset=q_offset, tensors=live)
        return torch.autograd.grad(out, inputs, grad_out.to(out.dtype), allow_unused=True, create_graph=create)


def padded_rows(t: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """``t`` ``[B, H, L, d]`` as the rows of positions ``start .. start + L - 1`` among ``n``,
    zeros elsewhere: a zero key adds nothing and a zero query's row is not read back."""
    if start == 0 and t.shape[2] == n:  # the usual training call
        return t
    rows = t.new_zeros(*t.shape[:2], n, t.shape[3])
    rows[:, :, start:start + t.shape[2]] = t
    return rows


def _kv_heads(t: torch.Tensor, Hkv: int) -> torch.Tensor:
    """Per query head gradients ``[B, Hq, L, d]`` summed over each kv head's group (GQA)."""
    B, Hq, L, d = t.shape
    return t if Hq == Hkv else t.view(B, Hkv, Hq // Hkv, L, d).sum(2)


def _with_ones(t: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """``[t, column]`` padded with zero columns to a multiple of 4 (the kernel's register
    blocks divide the feature dimension by 4)."""
    width = t.shape[-1]
    out = t.new_empty(*t.shape[:-1], width + 1 + -(width + 1) % 4)
    out[..., :width] = t
    out[..., width:width + 1] = column
    out[..., width + 1:] = 0.0
    return out
