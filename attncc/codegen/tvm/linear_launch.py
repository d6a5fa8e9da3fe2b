"""Run the linear attention kernel (``linear.py``) on torch tensors, with autograd.

Inputs pass in their own dtype (the kernel converts on load); the module comes from
``launcher.kernel_function`` (cached by source in memory and on disk). When q, k, v or a
captured float tensor (a feature map's table, the decay) requires grad, the causal backward runs
the same kernel on derived inputs; the global form, and a learned decay, recompute the torch
form under autograd (``linear_backward.py``).
"""

from __future__ import annotations

import torch

from attncc.codegen.tvm import launcher
from attncc.codegen.tvm.autograd import learned_names, needs_grad
from attncc.codegen.tvm.linear import LinearShape, kernel_chunk, linear_specs, render_linear
from attncc.codegen.tvm.linear_backward import linear_with_grad
from attncc.passes.plan import AttentionRegion


def linear_shape(region: AttentionRegion, q: torch.Tensor, v: torch.Tensor, reverse: bool = False,
                 writes_den: bool = False) -> LinearShape:
    return LinearShape(
        D=q.shape[-1],
        Dv=v.shape[-1],
        dtype=str(q.dtype).removeprefix("torch."),
        chunk=kernel_chunk(region.linear.chunk),
        reverse=reverse,
        writes_den=writes_den,
    )


def _forward(
    region: AttentionRegion,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    q_offset: int,
    reverse: bool = False,
    den: torch.Tensor | None = None,
) -> torch.Tensor:
    """o in q's dtype (``reverse``: every sequence in reversed time, ``LinearShape.reverse``);
    ``den``: a float32 ``[B, Hq, Lq]`` buffer the kernel fills with the rows' denominators
    (a normalised region, ``LinearShape.writes_den``)."""
    B, Hq, Lq, _ = q.shape
    Hkv, Lkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.empty(B, Hq, Lq, Dv, dtype=q.dtype)
    if Lq == 0 or Lkv == 0:  # no keys: every weight is 0, so is the output
        return out.zero_()
    shape = linear_shape(region, q, v, reverse, den is not None)
    attn = launcher.kernel_function(render_linear(region, shape))
    launcher.set_threads()
    workspace = []
    if region.linear.strategy == "linear_global":
        workspace = [torch.empty(B, Hkv, shape.D, Dv), torch.empty(B, Hkv, shape.D)]
    extra = [launcher.as_buffer(tensors[spec.name]) for spec in linear_specs(region)]
    dens = [] if den is None else [den]
    attn(launcher.dense(q), launcher.dense(k), launcher.dense(v), out, *dens, *workspace, *extra, int(q_offset))
    return out


def run_linear(
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
    return linear_with_grad(region, _forward, q, k, v, tensors, learned_names(tensors), q_offset)
