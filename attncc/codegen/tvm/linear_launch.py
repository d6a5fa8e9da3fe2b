"""Run the linear attention kernel (``linear.py``) on torch tensors, with autograd.

Inputs pass in their own dtype (the kernel converts on load); the module comes from
``launcher.kernel_function`` (cached by source in memory and on disk). There is no generated
backward: when q, k, v or a captured float tensor (the decay, a feature map's table) requires
grad, the forward still runs the kernel and the backward recomputes the region with the
reference backend's differentiable path, after the backend's one-time warning.
"""

from __future__ import annotations

import torch

from attncc.codegen.tvm import launcher
from attncc.codegen.tvm.autograd import needs_grad, reference_backward
from attncc.codegen.tvm.linear import LinearShape, kernel_chunk, linear_specs, render_linear
from attncc.passes.plan import AttentionRegion, KernelPlan


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
    attn = launcher.kernel_function(render_linear(region, shape))
    launcher.set_threads()
    workspace = []
    if region.linear.strategy == "linear_global":
        workspace = [torch.empty(B, Hkv, shape.D, Dv), torch.empty(B, Hkv, shape.D)]
    extra = [launcher.as_buffer(tensors[spec.name]) for spec in linear_specs(region)]
    attn(q.contiguous(), k.contiguous(), v.contiguous(), out, *workspace, *extra, int(q_offset))
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
    if not needs_grad(q, k, v, tensors):
        return _forward(region, q, k, v, tensors, q_offset)

    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        no_lse = torch.zeros(q.shape[:3], dtype=torch.float32)  # linear attention has no lse
        return _forward(region, q, k, v, tensors, q_offset), no_lse

    out, _ = reference_backward(plan, region, forward, q, k, v, tensors, scale=None, q_offset=q_offset,
                                reason="linear attention has no generated backward")
    return out
