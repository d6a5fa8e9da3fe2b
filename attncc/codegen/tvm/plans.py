"""Run a whole kernel plan on the TVM backend: each region by the path that fits it, then combine.

Per region: TopKBlocks (``routing.py``) and TopKHeads (``heads.py``) visit only what the routing
selected; a decode-shaped call of a plan with a ``decode_split`` rule splits the keys
(``decode.py``); everything else is the plain tiled kernel (``autograd.run_region``). A plan with
``combine`` evaluates it in torch over the region outputs, as the reference backend does
(float64, then the first output's dtype); ``return_lse`` is defined for one attention only.

Gradients: the plain path has generated backward kernels (``autograd.py``); so have the routed
paths, on the tables their forward visited: TopKBlocks on its tile path
(``routing.run_topk_blocks_with_grad``), TopKHeads on its compacted rows (the router's gradient
through torch ops). Where the generated backward does not cover a routed region, it runs on the
reference backend (with a one-time warning that says why); split-KV falls back to the plain
path: never a silent wrong gradient.
"""

from __future__ import annotations

import math

import torch

from attncc import caller
from attncc.codegen.tvm import decode, heads, routing
from attncc.codegen.tvm.autograd import needs_grad, run_region
from attncc.codegen.tvm.forward import select_config
from attncc.ir import nodes
from attncc.ir.evaluate import evaluate
from attncc.passes.plan import AttentionRegion, KernelPlan

Tensor = torch.Tensor
_WARNED: set[str] = set()
ROUTED_GRAD_WARNING = (
    "attncc: the TVM backend has no gradient for this routed attention ({reason}); this call "
    "runs the region on the reference backend (dense, O(Lq*Lkv) memory)"
)


def run_plan(plan: KernelPlan, operands: dict[str, Tensor], tensors: dict[str, Tensor], *, scale: float | None,
             q_offset: int, return_lse: bool, config: dict | None = None) -> Tensor | tuple[Tensor, Tensor]:
    if return_lse and plan.combine is not None:
        raise ValueError("return_lse=True is defined for a single attention, not a combined graph")
    outputs: dict[str, tuple[Tensor, Tensor | None]] = {}
    for region in plan.regions:
        q, k, v = operands[region.q], operands[region.k], operands[region.v]
        resolved = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        outputs[region.node] = run_one(plan, region, q, k, v, tensors, scale=resolved, q_offset=q_offset,
                                       config=config)
    if plan.combine is None:
        out, lse = outputs[plan.regions[0].node]
        return (out, lse) if return_lse else out
    env = plan.combine_inputs(outputs)
    dtype = next(iter(env.values())).dtype
    return evaluate(plan.combine, env, tensors, float_dtype=torch.float64).to(dtype)


def run_one(plan: KernelPlan, region: AttentionRegion, q: Tensor, k: Tensor, v: Tensor,
            tensors: dict[str, Tensor], *, scale: float, q_offset: int,
            config: dict | None = None) -> tuple[Tensor, Tensor | None]:
    """(o, lse or None) of one region; lse only for the softmax family, as SEMANTICS.md defines it."""
    has_lse = isinstance(region.normalizer, nodes.SoftmaxNorm)
    grad = needs_grad(q, k, v, tensors)
    routed = region.gate is not None or region.head_select is not None
    if routed:
        chosen = config or select_config(plan, q, k, v)[0]
        if region.gate is not None:
            run = routing.run_topk_blocks_with_grad if grad else routing.run_topk_blocks
            got = run(region, q, k, v, tensors, chosen, scale=scale, q_offset=q_offset)
        else:
            got = heads.run_topk_heads(region, q, k, v, tensors, chosen, scale=scale, q_offset=q_offset, grad=grad)
        if isinstance(got, str):  # no generated backward for this one
            return _reference(plan, region, q, k, v, tensors, scale, q_offset, got)
        out, lse = got
        return out, (lse if has_lse else None)
    splits = 0 if grad else decode.num_splits(plan, region, q, k)
    if splits:
        chosen = config or select_config(plan, q, k, v)[0]
        return decode.run_split_kv(region, q, k, v, tensors, chosen, splits, scale=scale, q_offset=q_offset)
    return run_region(plan, region, q, k, v, tensors, scale=scale, q_offset=q_offset, config=config, grad=grad)


def _reference(plan: KernelPlan, region: AttentionRegion, q: Tensor, k: Tensor, v: Tensor,
               tensors: dict[str, Tensor], scale: float, q_offset: int, why: str) -> tuple[Tensor, Tensor | None]:
    from attncc.codegen.reference.attention import attention

    if plan.fingerprint not in _WARNED:
        _WARNED.add(plan.fingerprint)
        caller.warn(ROUTED_GRAD_WARNING.format(reason=why))
    return attention(region, q, k, v, tensors, scale=scale, q_offset=q_offset)
