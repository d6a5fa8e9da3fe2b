"""``torch.library`` custom ops for the generated kernels: fake impls and autograd.

``attncc::triton_attention`` runs a region's fused forward; ``attncc::triton_attention_bwd``
its fused backward. Both take the region by key (``register_region``) so one op
serves every variant, and both have fake (meta) implementations, so ``torch.compile``
traces through them without running a kernel.

Autograd: softmax (sinks), sigmoid, pointwise and stick-breaking regions whose score (and
phi) derivatives render use the fused backward (sink gradients from ``lse``, learned
tensors of the score function accumulated in the dQ kernel, TopKHeads router logits from
``o`` and ``do``). Any other case (linear attention, a learned tensor inside phi or the
mask, a score op without a derivative rule) recomputes through the reference backend's
autograd, with a one-time warning naming the reason: never a silent wrong gradient.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from attncc.codegen.triton import launcher, space
from attncc.codegen.triton.checker import backward_unsupported
from attncc.codegen.triton.source import captured_specs
from attncc.ir import nodes
from attncc.passes.plan import AttentionRegion

Tensor = torch.Tensor

_REGIONS: dict[str, AttentionRegion] = {}
_WARNED: set[tuple[str, str]] = set()


def register_region(region: AttentionRegion) -> str:
    key = launcher.region_key(region)
    _REGIONS.setdefault(key, region)
    return key


def captured_names(region: AttentionRegion) -> list[str]:
    """Captured tensors the op takes, in order: those of score/mask/phi, then sink/decay, router."""
    names = [spec.name for spec in captured_specs(region)]
    for spec in (getattr(region.normalizer, "sink", None), getattr(region.normalizer, "decay", None)):
        if spec is not None and spec.name not in names:
            names.append(spec.name)
    heads = getattr(region, "head_select", None)
    if heads is not None and heads.router not in names:
        names.append(heads.router)
    return names


@torch.library.custom_op("attncc::triton_attention", mutates_args=())
def triton_attention(key: str, q: Tensor, k: Tensor, v: Tensor, captured: list[Tensor], scale: float,
                     q_offset: int, want_lse: bool, splits: int, config: list[int]) -> tuple[Tensor, Tensor]:
    """``config``: [] for the default tiles, else [BLOCK_M, BLOCK_N, num_warps, num_stages]."""
    region = _REGIONS[key]
    tensors = dict(zip(captured_names(region), captured, strict=True))
    tiles = space.Config(*config, splits) if config else None
    return launcher.forward(region, q, k, v, tensors, scale=scale, q_offset=q_offset, want_lse=want_lse,
                            splits=splits if splits > 1 else None, config=tiles)


@triton_attention.register_fake
def _(key: str, q: Tensor, k: Tensor, v: Tensor, captured: list[Tensor], scale: float, q_offset: int,
      want_lse: bool, splits: int, config: list[int]) -> tuple[Tensor, Tensor]:
    B, Hq, Lq, _ = q.shape
    return q.new_empty(B, Hq, Lq, v.shape[-1]), q.new_empty(B, Hq, Lq, dtype=torch.float32)


@torch.library.custom_op("attncc::triton_attention_bwd", mutates_args=())
def triton_attention_bwd(key: str, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor,
                         dlse: Tensor, captured: list[Tensor], learn_mask: list[bool], scale: float,
                         q_offset: int) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    region = _REGIONS[key]
    names = captured_names(region)
    tensors = dict(zip(names, captured, strict=True))
    learn = [n for n, want in zip(names, learn_mask, strict=True) if want]
    # NOTE: d lse_i / d s_ij = p_ij, so an lse gradient just shifts delta by -dlse.
    dq, dk, dv, *learned = launcher.backward(region, q, k, v, o, lse, do, tensors, scale=scale, q_offset=q_offset,
                                             dlse=dlse, learn=tuple(learn))
    return dq, dk, dv, learned


@triton_attention_bwd.register_fake
def _(key: str, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, dlse: Tensor,
      captured: list[Tensor], learn_mask: list[bool], scale: float,
      q_offset: int) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    learned = [torch.empty_like(c, dtype=c.dtype) for c, want in zip(captured, learn_mask, strict=True) if want]
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), learned


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    key, q, k, v, captured, scale, q_offset, _want_lse, _splits, config = inputs
    ctx.n_config = len(config)
    o, lse = output
    ctx.key, ctx.scale, ctx.q_offset = key, scale, q_offset
    ctx.n_captured = len(captured)
    ctx.save_for_backward(q, k, v, o, lse, *captured)


def _backward(ctx: Any, do: Tensor, dlse: Tensor | None) -> tuple[Any, ...]:
    q, k, v, o, lse, *captured = ctx.saved_tensors
    region = _REGIONS[ctx.key]
    names = captured_names(region)
    sink = getattr(region.normalizer, "sink", None)
    wants = [c.requires_grad and c.is_floating_point() for c in captured]
    heads = getattr(region, "head_select", None)
    router = heads.router if heads is not None else None
    learn = [n for n, want in zip(names, wants, strict=True) if want and n not in (getattr(sink, "name", None), router)]
    reason = backward_unsupported(region, tuple(learn))
    if reason is None and torch.is_grad_enabled():
        reason = "create_graph=True: the kernels' gradients are not differentiable again"
    if reason is not None:
        grads = _reference_backward(region, q, k, v, captured, names, do, dlse, ctx.scale, ctx.q_offset, reason)
        return (None, *grads[:3], list(grads[3:]), None, None, None, None, [None] * ctx.n_config)
    dlse_t = dlse if dlse is not None else torch.zeros_like(lse)
    learn_mask = [n in learn for n in names]
    dq, dk, dv, learned = triton_attention_bwd(ctx.key, q, k, v, o, lse, do, dlse_t, captured, learn_mask,
                                               ctx.scale, ctx.q_offset)
    dcaptured: list[Tensor | None] = [None] * len(captured)
    for name, grad in zip(learn, learned, strict=True):
        dcaptured[names.index(name)] = grad
    if router is not None and wants[names.index(router)]:
        i = names.index(router)
        dcaptured[i] = _router_grad(region, captured[i], o, do)
    if sink is not None:
        i = names.index(sink.name)
        if wants[i]:
            delta = (o.float() * do.float()).sum(-1)
            logit = captured[i].float().view(1, -1, 1)
            # NOTE: a sink of -inf weighs 0, also on a dead row (lse = -inf there: exp(nan) otherwise)
            p_sink = torch.where(logit == float("-inf"), 0.0, torch.exp(logit - lse))
            dcaptured[i] = (p_sink * (dlse_t.float() - delta)).sum((0, 2)).to(captured[i].dtype)
    return None, dq, dk, dv, dcaptured, None, None, None, None, [None] * ctx.n_config


def _router_grad(region: AttentionRegion, router: Tensor, o: Tensor, do: Tensor) -> Tensor:
    """TopKHeads: d loss / d router logits through the softmax over each token's kept heads.

    ``o = w * attn`` so ``dL/dw = do . attn = (do . o) / w`` for kept heads (w > 0).
    """
    weights = launcher.head_weights(region, {region.head_select.router: router}, o.shape[1])  # [B, Hq, Lq]
    kept = weights > 0
    dw = torch.where(kept, (do.float() * o.float()).sum(-1) / torch.where(kept, weights, 1.0), 0.0)
    dlogit = weights * (dw - (weights * dw).sum(1, keepdim=True))
    return dlogit.permute(0, 2, 1).to(router.dtype)


def _reference_backward(region: AttentionRegion, q: Tensor, k: Tensor, v: Tensor, captured: list[Tensor],
                        names: list[str], do: Tensor, dlse: Tensor | None, scale: float, q_offset: int,
                        reason: str) -> tuple[Tensor | None, ...]:
    """Gradients by recomputing through the reference backend under autograd (slow, exact); with
    ``create_graph=True`` (grad mode on here) from views of the saved tensors, so that they are
    differentiable again."""
    from attncc.codegen.reference.attention import attention, recompute_input

    if (launcher.region_key(region), reason) not in _WARNED:
        _WARNED.add((launcher.region_key(region), reason))
        warnings.warn(f"attncc triton backend: {reason}; using the reference backward for this variant",
                      stacklevel=3)
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = [recompute_input(t, create) for t in (q, k, v)]
        caps = [recompute_input(c, create, c.is_floating_point() and c.requires_grad) for c in captured]
        # NOTE: the reference applies region.score_scale (and row_shift) itself.
        out, lse = attention(region, *leaves, dict(zip(names, caps, strict=True)), scale=scale, q_offset=q_offset)
        outputs, grads_out = [out], [do]
        if lse is not None and dlse is not None:  # NOTE: a dead row's lse (-inf) passes no gradient
            finite = torch.isfinite(lse)
            outputs.append(torch.where(finite, lse, 0.0))
            grads_out.append(torch.where(finite, dlse, 0.0))
        inputs = leaves + [c for c in caps if c.requires_grad]
        grads = list(torch.autograd.grad(outputs, inputs, grads_out, allow_unused=True, create_graph=create))
    dcaps: list[Tensor | None] = []
    it = iter(grads[3:])
    for c in caps:
        dcaps.append(next(it) if c.requires_grad else None)
    return (*grads[:3], *dcaps)


triton_attention.register_autograd(_backward, setup_context=_setup_context)


def attention(region: AttentionRegion, q: Tensor, k: Tensor, v: Tensor, tensors: dict[str, Tensor], *,
              scale: float, q_offset: int, want_lse: bool, splits: int = 1,
              config: space.Config | None = None) -> tuple[Tensor, Tensor]:
    """Call the custom op for ``region`` (registering it first)."""
    key = register_region(region)
    captured = [tensors[name] for name in captured_names(region)]
    # NOTE: the backward needs softmax's lse and a normalised pointwise row sum (same buffer).
    want = want_lse or isinstance(region.normalizer, nodes.SoftmaxNorm | nodes.PointwiseNorm)
    tiles = [] if config is None else [config.BLOCK_M, config.BLOCK_N, config.num_warps, config.num_stages]
    return triton_attention(key, q, k, v, captured, float(scale), int(q_offset), want, int(splits), tiles)
