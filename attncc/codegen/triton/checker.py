"""What the Triton backend can run, in one place: each refusal names its reason.

Also answers the finer question the autograd Function asks: can the fused backward
kernels produce this region's gradients (``backward_unsupported``), or must it fall back
to the reference backward.
"""

from __future__ import annotations

import torch

from attncc.codegen.triton.render import unsupported
from attncc.ir import nodes
from attncc.ir.derivative import score_derivative_problem
from attncc.passes.plan import AttentionRegion, KernelPlan

FORWARD_NORMALIZERS = (nodes.SoftmaxNorm, nodes.SigmoidNorm, nodes.PointwiseNorm, nodes.StickBreakingNorm)
BACKWARD_NORMALIZERS = (nodes.SoftmaxNorm, nodes.SigmoidNorm, nodes.PointwiseNorm, nodes.StickBreakingNorm)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_checker(plan: KernelPlan, q: torch.Tensor) -> str | None:
    """Why the Triton backend cannot run ``plan`` on tensors like ``q``, or None."""
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} (Triton kernels take float32, float16, bfloat16)"
    if plan.combine is None and len(plan.regions) != 1:
        return f"{len(plan.regions)} regions without a combine expression"
    for region in plan.regions:
        why = region_checker(region)
        if why:
            return why if len(plan.regions) == 1 else f"region %{region.node}: {why}"
    return None


def region_checker(region: AttentionRegion) -> str | None:
    norm = region.normalizer
    if isinstance(norm, nodes.LinearNorm):
        return _linear_checker(region)
    if not isinstance(norm, FORWARD_NORMALIZERS):
        return f"normalizer {type(norm).__name__} has no Triton kernel yet"
    gate, heads = getattr(region, "gate", None), getattr(region, "head_select", None)
    if region.routing is not None and gate is None and heads is None:
        return f"routing {type(region.routing).__name__} without its lower_routing step in the plan"
    row_shift = getattr(region, "row_shift", None)
    if row_shift is not None and not isinstance(norm, nodes.SoftmaxNorm):
        return "row_shift outside the softmax family"
    exprs = (("score", region.score), ("mask", region.mask), ("phi", getattr(norm, "phi", None)),
             ("row_shift", row_shift))
    for what, expr in exprs:
        if expr is None:
            continue
        why = unsupported(expr)
        if why:
            return f"{what}: {why}"
        for spec in expr.inputs():
            if spec.dtype in ("float64", "complex64", "complex128"):
                return f"{what}: captured tensor {spec.name!r} of dtype {spec.dtype}"
    return None


def _linear_checker(region: AttentionRegion) -> str | None:
    if getattr(region, "linear", None) is None:
        return "Linear with a mask that is neither absent nor causal (quadratic masked form) is not generated"
    if region.routing is not None:
        return "routing with Linear"
    feature = region.normalizer.feature_map
    if not isinstance(feature, str):
        why = unsupported(feature)
        if why:
            return f"feature map: {why}"
    return None


def backward_unsupported(region: AttentionRegion, learn: tuple[str, ...] = ()) -> str | None:
    """Why the fused backward cannot give this region's gradients (None: it can).

    ``learn``: captured float tensors (other than a sink) that require grad.
    """
    norm = region.normalizer
    phi = getattr(norm, "phi", None)
    if learn and isinstance(norm, nodes.StickBreakingNorm):
        return "gradients of learned captured tensors with stick-breaking"
    for name in learn:
        if phi is not None and any(spec.name == name for spec in phi.inputs()):
            return f"gradient of captured tensor {name!r} inside phi"
        if region.score is None or not any(spec.name == name for spec in region.score.inputs()):
            if region.mask is None or not any(spec.name == name for spec in region.mask.inputs()):
                return f"gradient of captured tensor {name!r} outside the score function"
        elif getattr(region, "row_shift", None) is not None:
            return f"gradient of captured tensor {name!r} with a row_shift"
    if not isinstance(norm, BACKWARD_NORMALIZERS):
        return f"no fused backward for {type(norm).__name__} yet"
    for what, expr in (("score function", region.score), ("phi", getattr(norm, "phi", None))):
        why = None if expr is None else score_derivative_problem(expr, unsupported)
        if why:
            return f"{what} derivative: {why}"
    return None
