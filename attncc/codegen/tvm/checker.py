"""What the TVM backend can run, in one place: each refusal names its reason."""

from __future__ import annotations

import torch

from attncc.codegen.tvm.linear import linear_checker
from attncc.codegen.tvm.render import unsupported
from attncc.ir import nodes
from attncc.passes.plan import AttentionRegion, KernelPlan

NORMALIZERS = (nodes.SoftmaxNorm, nodes.SigmoidNorm, nodes.PointwiseNorm, nodes.StickBreakingNorm)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SINK_DTYPES = ("float32", "float16", "bfloat16")  # TensorSpec dtype names


def tvm_checker(plan: KernelPlan, q: torch.Tensor) -> str | None:
    """Why the TVM backend cannot run ``plan`` on tensors like ``q``, or None."""
    device = q.device.type
    if device != "cpu":
        return f"{device} tensors (TVM kernels here are built for the CPU)"
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} (TVM kernels take float32, float16, bfloat16)"
    found = _CHECKED.get(id(plan))
    if found is not None and found[0] is plan:
        return found[1]
    if len(_CHECKED) >= _CHECKED_SIZE:
        _CHECKED.pop(next(iter(_CHECKED)))
    why = plan_checker(plan)
    _CHECKED[id(plan)] = (plan, why)
    return why


# NOTE: every call asks, and a plan is immutable: its answer is memoized per plan object, since
# hashing a plan (every region and expression) costs more than the lookup. An entry holds its
# plan, so an id is never reused while it lives (as sparsify's _TENSOR_TABLES).
_CHECKED: dict[int, tuple[KernelPlan, str | None]] = {}
_CHECKED_SIZE = 256


def plan_checker(plan: KernelPlan) -> str | None:
    """Why the TVM backend cannot run ``plan`` at all, or None (the plan alone decides)."""
    if plan.combine is not None or len(plan.regions) != 1:
        linear = [r.node for r in plan.regions if isinstance(r.normalizer, nodes.LinearNorm)]
        if linear:
            return f"combine over linear attention ({', '.join(linear)}) is not generated yet"
        return next((why for why in map(region_checker, plan.regions) if why), None)
    if isinstance(plan.regions[0].normalizer, nodes.LinearNorm):
        return linear_checker(plan.regions[0])
    return region_checker(plan.regions[0])


def sink_checker(norm: nodes.Payload) -> str | None:
    """Why a softmax sink cannot be a kernel buffer, or None: expressions never read the sink, so
    ``unsupported`` does not see its dtype (float64, e.g. from numpy, has no buffer dtype)."""
    sink = norm.sink if isinstance(norm, nodes.SoftmaxNorm) else None
    if sink is None or sink.dtype in SINK_DTYPES:
        return None
    return f"sink tensor {sink.name!r} has dtype {sink.dtype} (TVM kernels take {', '.join(SINK_DTYPES)})"


def region_checker(region: AttentionRegion) -> str | None:
    norm = region.normalizer
    if not isinstance(norm, NORMALIZERS):
        return f"normalizer {type(norm).__name__} has no TVM kernel yet"
    if region.routing is not None and region.gate is None and region.head_select is None:
        return f"routing {type(region.routing).__name__} was not lowered (run lower_routing)"
    if region.gate is not None and region.head_select is not None:
        return "TopKBlocks and TopKHeads on one region are not generated"
    if region.row_shift is not None and not isinstance(norm, nodes.SoftmaxNorm):
        return "row_shift outside softmax is not rendered"
    why = sink_checker(norm)
    if why:
        return why
    phi = norm.phi if isinstance(norm, nodes.PointwiseNorm) else None
    for what, expr in (("score", region.score), ("mask", region.mask), ("row_shift", region.row_shift),
                       ("phi", phi)):
        if expr is None:
            continue
        why = unsupported(expr)
        if why:
            return f"{what}: {why}"
    return None
