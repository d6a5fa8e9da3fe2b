"""The dense meaning of the contract in SEMANTICS.md, as plain torch on whole tensors.

The reference backend is built from these helpers, and so are the runtime steps of the passes
that lower to dense torch (decode splits, chunked linear attention, routed blocks). Passes may
not import a backend, so what both need lives here with the IR, beside ``evaluate``: the index
grid, the GQA head expansion, the feature maps and the normalizers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attncc.ir import nodes
from attncc.ir.evaluate import evaluate
from attncc.ir.expr import Expr

Tensor = torch.Tensor


def index_grid(B: int, H: int, Lq: int, Lkv: int, q_offset: int, device: torch.device) -> dict[str, Tensor]:
    """Broadcastable index tensors b, h, q_idx, kv_idx of shape [B|1, H|1, Lq|1, Lkv|1]."""
    arange = lambda n: torch.arange(n, device=device, dtype=torch.int64)
    return {
        "b": arange(B).view(B, 1, 1, 1),
        "h": arange(H).view(1, H, 1, 1),
        "q_idx": (arange(Lq) + q_offset).view(1, 1, Lq, 1),
        "kv_idx": arange(Lkv).view(1, 1, 1, Lkv),
    }


def expand_kv(t: Tensor, Hq: int) -> Tensor:
    """GQA: query head h reads kv head h // (Hq // Hkv)."""
    return t.repeat_interleave(Hq // t.shape[1], dim=1)


def feature_map(name_or_expr: str | Expr, x: Tensor, ctx: dict[str, Tensor]) -> Tensor:
    """``Linear``'s phi: a named map (``elu1``, ``relu``, ``identity``) or a traced one over ``x``."""
    if name_or_expr == "elu1":
        return F.elu(x) + 1
    if name_or_expr == "relu":
        return torch.relu(x)
    if name_or_expr == "identity":
        return x
    return evaluate(name_or_expr, {"x": x}, ctx, x.dtype)


def normalize_scores(
    norm: object, s: Tensor, keep: Tensor, ctx: dict[str, Tensor], Lkv: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """Weights ``p`` of the score rows ``s`` over the kept entries, and the lse for softmax (else None).

    ``norm`` is a score normalizer payload (not ``LinearNorm``, which has no scores); entries
    outside ``keep`` get weight 0.
    """
    safe = torch.where(keep, s, torch.zeros((), dtype=dtype, device=s.device))
    if isinstance(norm, nodes.SoftmaxNorm):
        return _softmax(norm, s, keep, ctx)
    if isinstance(norm, nodes.SigmoidNorm):
        bias = -math.log(max(Lkv, 1)) if norm.bias is None else norm.bias  # Lkv = 0: no keys, no weights
        return torch.where(keep, torch.sigmoid(safe + bias), 0.0), None
    if isinstance(norm, nodes.PointwiseNorm):
        phi = torch.where(keep, evaluate(norm.phi, {"score": safe}, ctx, dtype), 0.0)
        if not norm.normalize:
            return phi, None
        return divide_rows(phi), None
    if isinstance(norm, nodes.StickBreakingNorm):
        return _stick_breaking(safe, keep), None
    raise TypeError(f"no dense form of the normalizer {type(norm).__name__}")


def divide_rows(weights: Tensor) -> Tensor:
    """Row-normalise; a row summing to exactly 0 stays 0 (SEMANTICS.md)."""
    total = weights.sum(dim=-1, keepdim=True)
    nonzero = total != 0
    return torch.where(nonzero, weights / torch.where(nonzero, total, 1.0), 0.0)


def _softmax(norm: nodes.SoftmaxNorm, s: Tensor, keep: Tensor, ctx: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Softmax over the kept entries, plus ``exp(sink_h)`` in the denominator when present.

    A row with nothing kept (and no sink) has ``lse = -inf`` and zero weights. Its scores are
    replaced by zeros before the row max so that autograd never forms ``exp(-inf - -inf)``:
    fully masked rows get zero gradients, not NaN.

    Weights are ``exp(s - m) / sum``, not ``exp(s - lse)``: where scores are huge (``1e23``), an
    ulp of ``lse`` exceeds ``log(n)`` and the latter gave every one of ``n`` equal scores the
    weight 1. The max is detached: weights and ``lse`` do not depend on it.
    """
    masked = torch.where(keep, s, float("-inf"))
    if norm.sink is not None:
        sink = ctx[norm.sink.name].view(1, -1, 1, 1).expand(*masked.shape[:3], 1)
        masked = torch.cat([masked, sink], dim=-1)
        keep = torch.cat([keep, sink != float("-inf")], dim=-1)  # -inf: a head's sink switched off
    alive = keep.any(dim=-1, keepdim=True)
    safe = torch.where(alive, masked, 0.0)
    m = safe.amax(dim=-1, keepdim=True).detach() if safe.shape[-1] else safe.new_zeros((*safe.shape[:-1], 1))
    e = torch.where(keep & alive, torch.exp(safe - m), 0.0)
    total = e.sum(dim=-1, keepdim=True)
    weights = e / torch.where(alive, total, 1.0)
    lse = torch.where(alive, m + torch.log(torch.where(alive, total, 1.0)), float("-inf")).squeeze(-1)
    if norm.sink is not None:
        weights = weights[..., :-1]
    return weights, lse


def _stick_breaking(s: Tensor, keep: Tensor) -> Tensor:
    """log p_ij = logsigmoid(s_ij) + sum_{t in M, t > j} logsigmoid(-s_it) (Tan et al. 2024)."""
    log_stay = torch.where(keep, F.logsigmoid(-s), 0.0)
    suffix = torch.flip(torch.cumsum(torch.flip(log_stay, [-1]), dim=-1), [-1])
    later = torch.cat([suffix[..., 1:], torch.zeros_like(suffix[..., :1])], dim=-1)
    return torch.where(keep, torch.exp(F.logsigmoid(s) + later), 0.0)
