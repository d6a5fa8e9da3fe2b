"""``@attncc.variant`` and the callable programs it returns.

A ``Program`` is a verified attention graph plus the tensors it captured; calling it
compiles the graph once through the pass pipeline and runs the chosen backend. A
``Variant`` is the common case of one attention node called as ``var(q, k, v)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from attncc.codegen import registry
from attncc.codegen.call_ranges import PositionsBeyondKernels
from attncc.ir import nodes
from attncc.ir.graph import AttentionGraph
from attncc.ir.trace import Captures, trace_mask, trace_score
from attncc.ir.verify import verify
from attncc.normalizers import as_normalizer
from attncc.opaque import opaque_to_dynamo
from attncc.passes.causality import mask_implies_causal
from attncc.passes.pipeline import CompileReport, compile_graph
from attncc.passes.plan import KernelPlan
from attncc.routing import TopKBlocks, TopKHeads
from attncc.validate import check_captured, check_combined_shapes, check_head_tensors, check_qkv, checked_options

SOFTMAX_FAMILY = (nodes.SoftmaxNorm,)


def lower_attention(
    captures: Captures,
    *,
    score_fn: Callable[..., Any] | None,
    mask: Callable[..., Any] | None,
    normalizer: Any,
    routing: Any,
) -> dict[str, Any]:
    """Trace the functions of one attention into payloads by role (captures fill up)."""
    norm = as_normalizer(normalizer).lower(captures)
    if routing is not None and not isinstance(routing, TopKBlocks | TopKHeads):
        raise TypeError(f"routing must be attncc.TopKBlocks, attncc.TopKHeads or None, got {type(routing).__name__}")
    if score_fn is not None and not callable(score_fn):
        raise TypeError(
            f"score_fn must be callable (score, b, h, q_idx, kv_idx) -> score, got {type(score_fn).__name__}"
        )
    if mask is not None and not callable(mask):
        raise TypeError(f"mask must be callable (b, h, q_idx, kv_idx) -> bool, got {type(mask).__name__}")
    if isinstance(norm, nodes.LinearNorm) and score_fn is not None:
        raise ValueError("a score function cannot be combined with attncc.Linear: linear attention has no scores")
    payloads: dict[str, Any] = {}
    if score_fn is not None:
        payloads["score"] = nodes.ScoreMod(trace_score(score_fn, captures))
    if mask is not None:
        payloads["mask"] = nodes.MaskMod(trace_mask(mask, captures))
    mask_expr = payloads["mask"].expr if "mask" in payloads else None
    if isinstance(norm, nodes.LinearNorm) and norm.decay is not None and not mask_implies_causal(mask_expr):
        raise ValueError(
            "attncc.Linear(decay=...) requires a causal mask (kv_idx <= q_idx), e.g. mask=attncc.masks.causal"
        )
    payloads["normalizer"] = norm
    if routing is not None:
        payloads["routing"] = routing.lower(captures)
    return payloads


_NODE_PREFIX = {"score": "score", "mask": "mask", "normalizer": "norm", "routing": "route"}


def add_attention(graph: AttentionGraph, payloads: dict[str, Any], *, q: str, k: str, v: str) -> str:
    """Add one attention's nodes, wiring captured inputs to the nodes that read them."""
    operands: dict[str, str] = {"q": q, "k": k, "v": v}
    for role, payload in payloads.items():
        reads = {}
        for spec in nodes.referenced_specs(payload):
            if spec.name not in graph.nx:
                graph.add(spec.name, nodes.Input(spec.name, "captured", spec))
            reads[spec.name] = spec.name
        operands[role] = graph.add(graph.fresh_id(_NODE_PREFIX[role]), payload, **reads)
    return graph.add(graph.fresh_id("attn"), nodes.Attention(), **operands)


class Program:
    """A compiled-on-demand attention graph with its captured tensors."""

    def __init__(self, graph: AttentionGraph, tensors: dict[str, torch.Tensor]) -> None:
        self.ir = verify(graph)
        self.name = graph.name
        self.tensors = tensors
        self._plan: KernelPlan | None = None
        self._report: CompileReport | None = None
        self.last_choice: registry.Choice | None = None

    @property
    def fingerprint(self) -> str:
        return self.ir.fingerprint

    @property
    def plan(self) -> KernelPlan:
        if self._plan is None:
            self._plan, self._report = compile_graph(self.ir)
        return self._plan

    @property
    def report(self) -> CompileReport:
        self.plan  # noqa: B018 - compiles on first use
        assert self._report is not None
        return self._report

    def operand_roles(self) -> dict[str, str]:
        return {self.ir.payload(n).name: self.ir.payload(n).role for n in self.ir.inputs()}

    @opaque_to_dynamo
    def run(
        self,
        operands: dict[str, torch.Tensor],
        *,
        scale: float | None = None,
        q_offset: int = 0,
        backend: str | None = None,
        return_lse: bool = False,
    ) -> Any:
        scale, q_offset = checked_options(scale, q_offset)
        plan = self.plan
        empty = no_value_dim = False
        for region in plan.regions:
            q, k, v = operands[region.q], operands[region.k], operands[region.v]
            check_qkv(q, k, v, (region.q, region.k, region.v))
            empty = empty or nothing_to_compute(q, k)
            no_value_dim = no_value_dim or v.shape[3] == 0
        first = operands[plan.regions[0].q]
        if plan.combine is not None:
            check_combined_shapes(plan.regions, operands)
        if self.tensors:
            check_captured(self.tensors, first.device)
            for region in plan.regions:
                check_head_tensors(region, operands[region.q], self.tensors)
        if return_lse:
            self._check_lse(plan)
        if (empty or (no_value_dim and not return_lse)) and plan.combine is None:
            self.last_choice = registry.Choice(registry.load("reference"), "empty input: nothing to compute")
            return _empty_result(plan, operands, self.tensors, return_lse)
        if no_value_dim or empty:
            # NOTE: the output is empty but the lse is not: it depends on q and k only; a combine of
            # empty attentions is still its expression of their zeros (1 / (2 + o) is not 0)
            backend = "reference"
        choice = registry.choose(backend, plan, first)
        self.last_choice = choice
        try:
            return choice.backend.run(plan, operands, self.tensors, scale=scale, q_offset=q_offset,
                                      return_lse=return_lse)
        except PositionsBeyondKernels as why:
            if backend is not None:
                raise
            self.last_choice = registry.Choice(registry.load("reference"), f"automatic: {why}; fell back to reference")
            return self.last_choice.backend.run(plan, operands, self.tensors, scale=scale, q_offset=q_offset,
                                                return_lse=return_lse)

    def _check_lse(self, plan: KernelPlan) -> None:
        if plan.combine is not None:
            raise ValueError("return_lse=True is defined for a single attention, not a combined graph")
        norm = plan.regions[0].normalizer
        if not isinstance(norm, SOFTMAX_FAMILY):
            raise ValueError(
                f"return_lse=True needs a softmax-family normalizer; this variant uses {type(norm).__name__}"
            )

    def explain(self, source: bool = False) -> str:
        from attncc.explain import explain_program

        return explain_program(self, source=source)

    def __repr__(self) -> str:
        return f"<attncc {type(self).__name__} {self.name} {self.fingerprint[:12]}>"


def nothing_to_compute(q: torch.Tensor, k: torch.Tensor) -> bool:
    """No kernel is needed: the ``[B, Hq, Lq]`` grid of rows is empty, or there are no keys.

    Such outputs are zeros and the lse is ``-inf`` (or the sink), known without any kernel; backends
    may assume every size is at least one, as their shape keys do.
    """
    return 0 in q.shape[:3] or k.shape[2] == 0


def _empty_result(
    plan: KernelPlan, operands: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], return_lse: bool
) -> Any:
    region = plan.regions[0]
    q, v = operands[region.q], operands[region.v]
    B, Hq, Lq, _ = q.shape
    out = torch.zeros(B, Hq, Lq, v.shape[-1], dtype=q.dtype, device=q.device)
    inputs = [t for t in operands.values() if t.requires_grad]
    if inputs and torch.is_grad_enabled():
        # NOTE: in the graph, as torch's SDPA returns it: a loss over it backpropagates zeros (an
        # empty slice's sum is 0 even where an input holds inf or NaN)
        out = out + sum(t.narrow(0, 0, 0).sum() for t in inputs).to(out.dtype)
    if not return_lse:
        return out
    sink = region.normalizer.sink
    lse = torch.full((B, Hq, Lq), -math.inf, dtype=torch.float32, device=q.device)
    if sink is not None and lse.numel() > 0:
        lse = tensors[sink.name].float().view(1, Hq, 1).expand(B, Hq, Lq).clone()
    return out, lse


class Variant(Program):
    """One attention variant: ``var(q, k, v, *, scale=None, q_offset=0, backend=None)``."""

    def __init__(
        self,
        score_fn: Callable[..., Any] | None = None,
        *,
        mask: Callable[..., Any] | None = None,
        normalizer: Any = "softmax",
        routing: Any = None,
        name: str | None = None,
    ) -> None:
        self._options = {"mask": mask, "normalizer": normalizer, "routing": routing}
        label = name or getattr(score_fn, "__name__", None) or getattr(mask, "__name__", None) or "variant"
        graph = AttentionGraph(label)
        for role in ("q", "k", "v"):
            graph.add(role, nodes.Input(role, role))
        captures = Captures()
        payloads = lower_attention(captures, score_fn=score_fn, **self._options)
        graph.outputs.append(add_attention(graph, payloads, q="q", k="k", v="v"))
        super().__init__(graph, captures.tensors)
        self.score_fn = score_fn

    @property
    def mask(self) -> Callable[..., Any] | None:
        """The mask function as the user passed it (a FlexAttention mask_mod works unchanged)."""
        return self._options["mask"]

    @property
    def normalizer(self) -> Any:
        return self._options["normalizer"]

    @property
    def routing(self) -> Any:
        return self._options["routing"]

    @opaque_to_dynamo
    def __call__(self, q: Any, k: Any = None, v: Any = None, **kwargs: Any) -> Any:
        if k is None and v is None and callable(q) and not isinstance(q, torch.Tensor) and not kwargs:
            return Variant(q, name=getattr(q, "__name__", None), **self._options)  # decorator use
        return self.run({"q": q, "k": k, "v": v}, **kwargs)


def variant(
    score_fn: Callable[..., Any] | None = None,
    *,
    mask: Callable[..., Any] | None = None,
    normalizer: Any = "softmax",
    routing: Any = None,
    name: str | None = None,
) -> Variant:
    """Declare an attention variant: as ``@variant``, ``@variant(mask=...)`` or ``variant(mask=...)``.

    ``score_fn(score, b, h, q_idx, kv_idx)`` and ``mask(b, h, q_idx, kv_idx)`` have
    FlexAttention's ``score_mod``/``mask_mod`` signatures and are traced symbolically, once.
    """
    return Variant(score_fn, mask=mask, normalizer=normalizer, routing=routing, name=name)
