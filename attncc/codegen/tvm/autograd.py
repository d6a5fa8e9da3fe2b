"""Run one region on the TVM kernel, with autograd through the generated backward kernels.

Softmax (with learned sinks), sigmoid, the pointwise normalizers and stick-breaking have
generated backward kernels (``backward.py``, run by ``backward_launch.py``): any score function
and phi whose derivatives render, any mask, GQA/MQA, offsets and block sparsity, and the
gradients of captured tensors that a score function reads (an ALiBi slope table, a relative
bias table). Linear attention has its own (``linear_backward.py``). Everything else (a learned
tensor read by a mask or phi) recomputes the region with the reference backend's
differentiable path (dense, ``O(Lq*Lkv)`` memory) after a one-time warning that says why: never
a silent wrong gradient. So does ``create_graph=True`` (a gradient penalty): the generated
kernels' gradients are not differentiable again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from attncc import caller
from attncc.codegen.tvm.backward import BackwardShape
from attncc.codegen.tvm.backward_launch import (
    backward_unsupported,
    launch_backward,
    row_shift_gradient,
    sink_gradient,
)
from attncc.codegen.tvm.forward import run_forward, sigmoid_bias
from attncc.codegen.tvm.kernels import captured_specs
from attncc.ir import nodes
from attncc.passes.plan import AttentionRegion, KernelPlan
from attncc.passes.sparsify import BlockTables

_WARNED: set[object] = set()  # plan fingerprints and regions warned about
BACKWARD_WARNING = (
    "attncc: the TVM backend's generated backward does not cover this variant ({reason}); its gradients "
    "are computed by recomputing it with the reference backend (dense, O(Lq*Lkv) memory)"
)


def learned_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Captured float tensors that require grad (a learned bias table, sink logits, a decay)."""
    return [n for n, t in tensors.items() if t.is_floating_point() and t.requires_grad]


def needs_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensors: dict[str, torch.Tensor]) -> bool:
    if not torch.is_grad_enabled():
        return False
    return q.requires_grad or k.requires_grad or v.requires_grad or bool(tensors and learned_names(tensors))


def read_by(region: AttentionRegion, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The captured tensors ``region``'s kernel reads. Why: a tensor learned elsewhere in the graph (a
    combine node's lambda, a router) gets its gradient through the torch ops around the kernel,
    and must not send the region to the reference backward."""
    read = {spec.name for spec in captured_specs(region)}
    return {name: t for name, t in tensors.items() if name in read}


def saved_captured(ctx: Any, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The captured tensors to pass to ``ctx.save_for_backward`` (after the Function's own), their
    names kept on ``ctx``. Why saved: autograd then checks their versions, so a tensor edited in
    place between forward and backward raises, as for any saved tensor, rather than give gradients of
    the new contents against the old output."""
    ctx.captured_names = tuple(n for n, t in tensors.items() if isinstance(t, torch.Tensor))
    return tuple(tensors[n] for n in ctx.captured_names)


def restored_captured(ctx: Any, tensors: dict[str, torch.Tensor], saved: list[torch.Tensor],
                      ) -> dict[str, torch.Tensor]:
    """``tensors`` with the entries ``saved_captured`` saved, unpacked (version-checked)."""
    return {**tensors, **dict(zip(ctx.captured_names, saved))}


Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def reference_backward(
    plan: KernelPlan, region: AttentionRegion, forward: Forward, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, tensors: dict[str, torch.Tensor], *, scale: float | None, q_offset: int, reason: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse): ``forward`` (a generated kernel) now, the reference backend's gradients later,
    after the one-time warning that names ``reason``: every TVM path without a generated backward."""
    if plan.fingerprint not in _WARNED:
        _WARNED.add(plan.fingerprint)
        caller.warn(BACKWARD_WARNING.format(reason=reason))
    names = learned_names(tensors)
    context = (region, tensors, names, scale, q_offset, forward)
    return _ReferenceBackward.apply(context, q, k, v, *(tensors[n] for n in names))


def run_region(
    plan: KernelPlan, region: AttentionRegion, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    tensors: dict[str, torch.Tensor], *, scale: float, q_offset: int, config: dict | None = None,
    grad: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(o, lse or None): lse only for the softmax family, as SEMANTICS.md defines it. ``grad``:
    ``needs_grad`` when the caller has just asked it (None: ask here)."""
    has_lse = isinstance(region.normalizer, nodes.SoftmaxNorm)
    if grad is None:
        grad = needs_grad(q, k, v, tensors)
    if not grad:
        out, lse = run_forward(plan, region, q, k, v, tensors, scale, q_offset, config)
        return out, (lse if has_lse else None)
    tensors = read_by(region, tensors)
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return run_forward(plan, region, q, k, v, tensors, scale, q_offset, config)

    reason = backward_unsupported(region, tuple(learned_names(tensors)), tasks=k.shape[0] * k.shape[1],
                                  tensors=tensors, kv_tiles=-(-k.shape[2] // BackwardShape.block_n))
    if reason is None:
        out, lse = generated_backward(region, forward, q, k, v, tensors, scale=scale, q_offset=q_offset)
    else:
        out, lse = reference_backward(plan, region, forward, q, k, v, tensors, scale=scale, q_offset=q_offset,
                                      reason=reason)
    return out, (lse if has_lse else None)


def generated_backward(
    region: AttentionRegion, forward: Forward, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    tensors: dict[str, torch.Tensor], *, scale: float, q_offset: int,
    tiles: tuple[BlockTables, BackwardShape] | None = None,
    reference: tuple[AttentionRegion, dict[str, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse): ``forward`` (a generated kernel of ``region``) now, the generated backward kernels
    later (the caller has checked ``backward_unsupported``). ``tiles``: the tables the forward
    visited and the backward's tile shape, when the mask alone does not say which (routing);
    ``reference``: the region and tensors the reference recomputes under ``create_graph=True``
    where ``region`` alone does not say what the forward computed (the tiles do)."""
    names = learned_names(tensors)
    context = (region, tensors, names, scale, q_offset, forward, tiles, reference)
    return _GeneratedBackward.apply(context, q, k, v, *(tensors[n] for n in names))


def routed_backward(
    region: AttentionRegion, forward: Forward, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    tensors: dict[str, torch.Tensor], tables: BlockTables, config: dict, *, scale: float, q_offset: int,
    reference: tuple[AttentionRegion, dict[str, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | str:
    """``generated_backward`` for a routed path's kernel (``region`` re-indexed or with the selection
    in its mask), on the ``tables`` at ``config``'s tiles its forward visits; or why it cannot be.
    The kernel is given only the tensors it reads: anything else (a router) gets its gradient
    through the torch ops around the kernel."""
    block_m, block_n = config["block_m"], config["block_n"]
    shape = BackwardShape(q.shape[3], v.shape[3], block_m, block_n)
    if block_m % shape.rows or block_n % shape.vector:
        return f"routing tiles {block_m} x {block_n} do not fit the backward's register blocks"
    live = read_by(region, tensors)
    why = backward_unsupported(region, tuple(learned_names(live)), tasks=k.shape[0] * k.shape[1], tensors=live,
                               kv_tiles=-(-k.shape[2] // block_n))
    if why:
        return why
    return generated_backward(region, forward, q, k, v, live, scale=scale, q_offset=q_offset, tiles=(tables, shape),
                              reference=reference)


class _GeneratedBackward(torch.autograd.Function):
    """Forward: a TVM kernel (the context's callable). Backward: the generated kernels; the sink's and the row_shift's
    shares of captured tensors' gradients in torch (O(B * Hq * Lq)); under ``create_graph=True`` the
    reference's recomputed graph."""

    @staticmethod
    def forward(ctx: Any, context: tuple, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                *grad_tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        region, *_, forward, _tiles, _reference = context
        ctx.context = context
        out, lse = forward(q.detach(), k.detach(), v.detach())
        ctx.save_for_backward(q, k, v, out, lse, *grad_tensors, *saved_captured(ctx, context[1]))
        if not isinstance(region.normalizer, nodes.SoftmaxNorm):
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor | None) -> tuple:
        """With ``create_graph=True`` (grad mode on here) the gradients must be differentiable, and
        the generated kernels' are not: the reference's recomputed graph gives them (a gradient
        penalty's second-order term had been silently dropped)."""
        region, tensors, grad_names, scale, q_offset, _forward, tiles, reference = ctx.context
        q, k, v, out, lse, *rest = ctx.saved_tensors
        grad_tensors = rest[: len(grad_names)]
        tensors = restored_captured(ctx, tensors, rest[len(grad_names):])
        if torch.is_grad_enabled():
            if region not in _WARNED:
                _WARNED.add(region)
                caller.warn(BACKWARD_WARNING.format(reason="create_graph=True: the kernels' gradients are not "
                                                           "differentiable again"))
            ref_region, ref_tensors = reference or (region, tensors)
            grads = reference_gradients(ref_region, {**ref_tensors, **tensors}, grad_names, scale, q_offset,
                                        (q, k, v, *grad_tensors), grad_out, grad_lse)
        else:
            grads = _generated_gradients(region, tensors, grad_names, scale, q_offset, tiles, q, k, v, out, lse,
                                         grad_tensors, grad_out, grad_lse)
        return (None, *grads)


def _generated_gradients(region: AttentionRegion, tensors: dict[str, torch.Tensor], grad_names: list[str],
                         scale: float, q_offset: int, tiles: tuple | None, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, grad_tensors: list[torch.Tensor],
                         grad_out: torch.Tensor, grad_lse: torch.Tensor | None) -> tuple:
    """The generated kernels' gradients (not differentiable again: the caller runs it with grad
    mode off, as autograd does without ``create_graph``)."""
    tables, shape = tiles or (None, None)
    norm = region.normalizer
    rowdot = torch.einsum("bhld,bhld->bhl", grad_out.float(), out.float())
    dlse = torch.zeros_like(lse)
    if grad_lse is not None and isinstance(norm, nodes.SoftmaxNorm):
        dlse = torch.where(torch.isfinite(lse), grad_lse.float(), 0.0)
    if region.score_scale is not None:
        scale = scale * region.score_scale
    # NOTE: d lse_i / d s_ij = p_ij, so an lse gradient shifts Delta_i by -dlse_i.
    sink = getattr(norm, "sink", None)
    learn = tuple(n for n in grad_names if sink is None or n != sink.name)
    dq, dk, dv, *learned = launch_backward(
        region, q.detach(), k.detach(), v.detach(), lse, grad_out, rowdot - dlse, tensors, scale=scale,
        q_offset=q_offset, bias=sigmoid_bias(norm, k.shape[2]), learn=learn, shape=shape, tables=tables)
    by_name = {}
    for name, grad in zip(learn, learned):
        shifted = row_shift_gradient(region, name, tensors, dlse, q_offset)
        grad = grad if shifted is None else grad + shifted.view(grad.shape)
        by_name[name] = grad.to(tensors[name].dtype)
    grads = [sink_gradient(t, lse, rowdot, dlse) if name not in by_name else by_name[name]
             for name, t in zip(grad_names, grad_tensors)]
    return (dq, dk, dv, *grads)


class _ReferenceBackward(torch.autograd.Function):
    """Forward: a TVM kernel (the context's callable). Backward: the reference backend's
    autograd graph, recomputed."""

    @staticmethod
    def forward(ctx: Any, context: tuple, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                *grad_tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        region, *_, forward = context
        ctx.context = context
        ctx.save_for_backward(q, k, v, *grad_tensors, *saved_captured(ctx, context[1]))
        out, lse = forward(q.detach(), k.detach(), v.detach())
        if not isinstance(region.normalizer, nodes.SoftmaxNorm):
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor | None) -> tuple:
        region, tensors, grad_names, scale, q_offset, _ = ctx.context
        q, k, v, *rest = ctx.saved_tensors
        grad_tensors = rest[: len(grad_names)]
        tensors = restored_captured(ctx, tensors, rest[len(grad_names):])
        return (None, *reference_gradients(region, tensors, grad_names, scale, q_offset, (q, k, v, *grad_tensors),
                                           grad_out, grad_lse))


def reference_gradients(region: AttentionRegion, tensors: dict[str, torch.Tensor], grad_names: list[str],
                        scale: float, q_offset: int, saved: tuple[torch.Tensor, ...], grad_out: torch.Tensor,
                        grad_lse: torch.Tensor | None) -> tuple:
    """(dq, dk, dv, d learned...) by autograd through the reference backend, recomputed from the
    ``saved`` inputs (q, k, v, the learned tensors); differentiable again under ``create_graph=True``
    (grad mode on here; ``recompute_input``)."""
    from attncc.codegen.reference.attention import attention, recompute_input

    create = torch.is_grad_enabled()
    with torch.enable_grad():
        inputs = [recompute_input(t, create) for t in saved]
        live = dict(tensors)
        live.update(zip(grad_names, inputs[3:]))
        out, lse = attention(region, inputs[0], inputs[1], inputs[2], live, scale=scale, q_offset=q_offset)
        outputs, grads = [out], [grad_out]
        if lse is not None and grad_lse is not None:
            finite = torch.isfinite(lse)
            outputs.append(torch.where(finite, lse, 0.0))
            grads.append(torch.where(finite, grad_lse, 0.0))
        return torch.autograd.grad(outputs, inputs, grads, allow_unused=True, create_graph=create)
