"""Run the linear attention kernel (``linear.py``) on torch tensors, with autograd.

Inputs pass in their own dtype (the kernel converts on load); the module comes from
``launcher.get_module`` (cached by source in memory and on disk). There is no generated
backward: when q, k, v or a captured float tensor (the decay, a feature map's table) requires
grad, the forward still runs the kernel and the backward recomputes the region with the
reference backend's differentiable path, after the backend's one-time warning.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from attncc.codegen.tvm import launcher
from attncc.codegen.tvm.autograd import BACKWARD_WARNING
from attncc.codegen.tvm.linear import LinearShape, kernel_chunk, linear_specs, render_linear
from attncc.passes.plan import AttentionRegion, KernelPlan

_WARNED: set[str] = set()


def linear_shape(region: AttentionRegion, q: torch.Tensor, v: torch.Tensor) -> LinearShape:
    return LinearShape(
        D=q.shape[-1],
        Dv=v.shape[-1],
        dtype=str(q.dtype).removeprefix("torch."),
        chunk=kernel_chunk(region.linear.chunk),
    )


def _forward(
    region: AttentionRegion,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    q_offset: int,
) -> torch.Tensor:
    B, Hq, Lq, _ = q.shape
    Hkv, Lkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.empty(B, Hq, Lq, Dv, dtype=q.dtype)
    if Lq == 0 or Lkv == 0:  # no keys: every weight is 0, so is the output
        return out.zero_()
    shape = linear_shape(region, q, v)
    module = launcher.get_module(render_linear(region, shape))
    launcher.set_threads()
    workspace = []
    if region.linear.strategy == "linear_global":
        workspace = [torch.empty(B, Hkv, shape.D, Dv), torch.empty(B, Hkv, shape.D)]
    extra = [launcher.as_buffer(tensors[spec.name]) for spec in linear_specs(region)]
    module["attn"](q.contiguous(), k.contiguous(), v.contiguous(), out, *workspace, *extra, int(q_offset))
    return out


def run_linear(
    plan: KernelPlan,
    region: AttentionRegion,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    *,
    q_offset: int,
) -> torch.Tensor:
    """o in q's dtype for a region lowered to ``linear_chunked`` or ``linear_global``."""
    grad_names = [n for n, t in tensors.items() if t.is_floating_point() and t.requires_grad]
    needs_grad = torch.is_grad_enabled() and (any(t.requires_grad for t in (q, k, v)) or grad_names)
    if not needs_grad:
        return _forward(region, q, k, v, tensors, q_offset)
    if plan.fingerprint not in _WARNED:
        _WARNED.add(plan.fingerprint)
        warnings.warn(BACKWARD_WARNING.format(reason="linear attention has no generated backward"), stacklevel=4)
    context = (region, tensors, grad_names, q_offset)
    return _ReferenceBackward.apply(context, q, k, v, *(tensors[n] for n in grad_names))


class _ReferenceBackward(torch.autograd.Function):
    """Forward: the TVM kernel. Backward: the reference backend's autograd graph, recomputed."""

    @staticmethod
    def forward(
        ctx: Any, context: tuple, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *grad_tensors: torch.Tensor
    ) -> torch.Tensor:
        region, tensors, _grad_names, q_offset = context
        ctx.context = context
        ctx.save_for_backward(q, k, v, *grad_tensors)
        return _forward(region, q.detach(), k.detach(), v.detach(), tensors, q_offset)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        from attncc.codegen.reference.attention import attention

        region, tensors, grad_names, q_offset = ctx.context
        q, k, v, *grad_tensors = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(True) for t in (q, k, v, *grad_tensors)]
            live = dict(tensors)
            live.update(zip(grad_names, inputs[3:]))
            out, _ = attention(region, inputs[0], inputs[1], inputs[2], live, scale=None, q_offset=q_offset)
            found = torch.autograd.grad([out], inputs, [grad_out], allow_unused=True)
        return (None, *found)
