"""Fill the kernel templates from a region: one source module per (region, kind, dtype).

``render_source`` renders the region's score, mask, normalizer map, row shift and routing
into the template variables that ``templates/_helpers.py.jinja`` documents, with the
``ExprRenderer`` of ``render.py`` turning each ``Expr`` into SSA lines. The same call
serves every variant: nothing here is specific to one.
"""

from __future__ import annotations

import os
from pathlib import Path

import jinja2

from attncc.codegen.triton.render import SCALAR_VARS, ExprRenderer, pointer_args
from attncc.ir.expr import Expr, TensorSpec
from attncc.passes.plan import AttentionRegion

ROUTE_PARAMS = ["RT", "rt_sb", "rt_sh", "rt_sr", "rt_q0"]
HEAD_PARAMS = ["HW", "hw_sb", "hw_sh", "hw_sm"]

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATES = {"forward": "forward.py.jinja", "backward": "backward.py.jinja", "linear": "linear.py.jinja"}


def _indent(lines: list[str], spaces: int) -> str:
    return "\n".join(" " * spaces + line for line in lines)


def _captured_specs(region: AttentionRegion) -> list[TensorSpec]:
    """Captured tensors the kernel body reads (score, mask, phi), in a stable order."""
    norm, row_shift = region.normalizer, getattr(region, "row_shift", None)
    feature = getattr(norm, "feature_map", None)
    candidates = (region.score, region.mask, getattr(norm, "phi", None), row_shift,
                  feature if isinstance(feature, Expr) else None)
    exprs = [e for e in candidates if e is not None]
    found: dict[str, TensorSpec] = {}
    for e in exprs:
        for spec in e.inputs():
            found.setdefault(spec.name, spec)
    return [found[name] for name in sorted(found)]


def render_source(region: AttentionRegion, kind: str, dtype: str, learn: tuple[str, ...] = ()) -> str:
    """The Python/Triton source of one module (``kind`` forward or backward) for ``region``.

    ``learn``: captured float tensors of the score function whose gradients the backward's
    dQ kernel accumulates (atomically, at the addresses the forward loads from).
    """
    from attncc.ir import nodes
    from attncc.ir.derivative import score_derivative

    specs = _captured_specs(region)
    params = [p for spec in specs for p in pointer_args(spec)]
    norm = region.normalizer
    if kind == "linear":
        return _render_linear(region, params, dtype)
    family = {nodes.SoftmaxNorm: "softmax", nodes.SigmoidNorm: "sigmoid", nodes.PointwiseNorm: "pointwise",
              nodes.StickBreakingNorm: "stick_breaking"}[type(norm)]
    index_env = {"b": "b", "h": "h", "q_idx": "q_idx", "kv_idx": "kv_idx", "score": "score"}
    body = ExprRenderer(dict(index_env))
    context: dict[str, object] = {
        "norm": family,
        "has_sink": family == "softmax" and norm.sink is not None,
        "normalize": getattr(norm, "normalize", False),
        "log2_scores": family == "softmax",
        "cap_params": "".join(f", {p}" for p in params),
        "cap": "".join(f", {p}" for p in params),
        "dot_args": _dot_args(dtype),
        "pv_fp32": dtype != "float32" and family in ("pointwise", "stick_breaking"),
        "score_result": None,
        "mask_result": None,
    }
    if region.score is not None:
        context["score_result"] = body.render_as(region.score, "float")
        context["score_lines"] = _indent(body.take_lines(), 4)
    if region.mask is not None:
        context["mask_result"] = body.render_as(region.mask, "bool")
        context["mask_lines"] = _indent(body.take_lines(), 8)
    gate, heads = getattr(region, "gate", None), getattr(region, "head_select", None)
    extra = (ROUTE_PARAMS if gate is not None else []) + (HEAD_PARAMS if heads is not None else [])
    context["cap_params"] = context["cap"] = "".join(f", {p}" for p in params + extra)
    context["route_block"] = gate.block if gate is not None else None
    context["route_k"] = gate.k if gate is not None else None
    context["route_per_token"] = gate is not None and gate.per == "token"
    context["head_weights"] = heads is not None
    context["row_shift_result"] = None
    if getattr(region, "row_shift", None) is not None:
        rows = ExprRenderer({"b": "b", "h": "h", "q_idx": "q_idx"}, prefix="r")
        context["row_shift_result"] = rows.render_as(region.row_shift, "float")
        context["row_shift_lines"] = _indent(rows.take_lines(), 4)
    if family == "pointwise":
        phi = ExprRenderer({"score": "score"}, prefix="f")
        context["phi_result"] = phi.render_as(norm.phi, "float")
        context["phi_lines"] = _indent(phi.take_lines(), 4)
    if kind == "backward" and family == "pointwise":
        dphi = ExprRenderer({"score": "score"}, prefix="d")
        derivative = score_derivative(norm.phi)
        context["dphi_result"] = "0.0" if derivative is None else dphi.render_as(derivative, "float")
        context["dphi_lines"] = _indent(dphi.take_lines(), 4)
    context["capgrad_lines"] = None
    if kind == "backward" and learn:
        grad_params = [p for name in learn for p in grad_args(_spec_named(specs, name))]
        context["cap_params"] = context["cap"] = context["cap_params"] + "".join(f", {p}" for p in grad_params)
        context["capgrad_lines"] = _indent(_captured_grad_lines(region.score, learn, index_env), 4)
    if kind == "backward":
        context["dscore_result"] = None
        derivative = score_derivative(region.score) if region.score is not None else None
        if derivative is not None:
            grad = ExprRenderer(dict(index_env), prefix="g")
            context["dscore_result"] = grad.render_as(derivative, "float")
            context["dscore_lines"] = _indent(grad.take_lines(), 4)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    header = f"# attncc generated Triton module: {kind}, {family}, {dtype}, region %{region.node}\n"
    return header + env.get_template(TEMPLATES[kind]).render(**context)


def _render_linear(region: AttentionRegion, params: list[str], dtype: str) -> str:
    """The chunked (causal) or global (unmasked) linear attention module."""
    norm, lowering = region.normalizer, region.linear
    context: dict[str, object] = {
        "cap_params": "".join(f", {p}" for p in params),
        "cap": "".join(f", {p}" for p in params),
        "has_decay": norm.decay is not None,
        "strategy": "global" if lowering.strategy == "linear_global" else "chunked",
        "strict": lowering.causal_strict,
        "feature": norm.feature_map if isinstance(norm.feature_map, str) else "traced",
        "store": _indent(_LINEAR_STORE[bool(norm.normalize)], 8),
        "precision": "ieee" if dtype == "float32" or os.environ.get("TRITON_INTERPRET", "0") == "1" else "tf32",
    }
    if not isinstance(norm.feature_map, str):
        body = ExprRenderer({"x": "x"}, prefix="f")
        context["feature_result"] = body.render_as(norm.feature_map, "float")
        context["feature_lines"] = _indent(body.take_lines(), 4)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    header = f"# attncc generated Triton module: linear ({lowering.strategy}), region %{region.node}\n"
    return header + env.get_template(TEMPLATES["linear"]).render(**context)


_LINEAR_STORE = {
    True: [
        "nonzero = den != 0.0",
        "o = tl.where(nonzero[:, None], num / tl.where(nonzero, den, 1.0)[:, None], 0.0)",
        "tl.store(O_base + rows[:, None] * stride_om + offs_dv[None, :] * stride_od, o.to(O.dtype.element_ty),",
        "         mask=(rows[:, None] < Lq) & (offs_dv[None, :] < DV))",
    ],
    False: [
        "tl.store(O_base + rows[:, None] * stride_om + offs_dv[None, :] * stride_od, num.to(O.dtype.element_ty),",
        "         mask=(rows[:, None] < Lq) & (offs_dv[None, :] < DV))",
    ],
}


def grad_args(spec: TensorSpec) -> list[str]:
    """Kernel parameters of a captured tensor's float32 gradient buffer."""
    return [f"{spec.name}_g"] + [f"{spec.name}_gs{d}" for d in range(len(spec.shape))]


def _spec_named(specs: list[TensorSpec], name: str) -> TensorSpec:
    return next(spec for spec in specs if spec.name == name)


def _captured_grad_lines(score: Expr, learn: tuple[str, ...], env: dict[str, str]) -> list[str]:
    """Per load of a learned tensor: ``d score_fn / d load`` times ``dsout``, added atomically."""
    from attncc.ir.derivative import derivative

    body = ExprRenderer(dict(env), prefix="c")
    lines: list[str] = []
    loads = [n for n in score.walk() if n.op == "load" and n.src[0].arg.name in learn]
    for i, node in enumerate(loads):
        d = derivative(score, node)
        if d is None:
            continue
        local = body.render_as(d, "float")
        for index in node.src[1:]:
            body.render(index)
        spec = node.src[0].arg
        address, bounds = body.address(node, f"{spec.name}_g", f"{spec.name}_gs")
        lines += body.take_lines()
        lines.append(f"g{i} = tl.where(keep, dsout * ({local} + tl.zeros_like(dsout)), 0.0)")
        if all(index.free_vars() <= SCALAR_VARS for index in node.src[1:]):
            lines.append(f"tl.atomic_add({address}, tl.sum(tl.sum(g{i}, 1), 0))")
        else:
            lines.append(f"a{i} = {address} + tl.zeros_like(dsout).to(tl.int32)")
            lines.append(f"tl.atomic_add(a{i}, g{i}, mask={' & '.join(['keep', *bounds])})")
    return lines or ["pass"]


def _dot_args(dtype: str) -> str:
    """Operands of ``tl.dot``; the CPU interpreter multiplies bfloat16 wrongly, so it upcasts."""
    if dtype == "float32":
        return 'a, b, input_precision="ieee"'
    if dtype == "bfloat16" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return 'a.to(tl.float32), b.to(tl.float32), input_precision="ieee"'
    return "a, b"


def captured_specs(region: AttentionRegion) -> list[TensorSpec]:
    return _captured_specs(region)
