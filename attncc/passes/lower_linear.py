"""Lower linear attention: causal masks get a chunked recurrence, no mask one reassociation.

``Linear`` weights are ``a_ij = phi(q_i) . phi(k_j) * decay_h ** (q_idx - kv_idx)``
(SEMANTICS.md). Without a mask ``o = phi(Q) (phi(K)^T V)`` costs O(L * D * Dv). With a causal
mask the keys are cut into chunks of ``C``: inside a chunk the masked quadratic form, across
chunks a ``D x Dv`` state (and a ``D`` normaliser state) decayed by ``decay ** C`` per chunk,
so the decay is exact and the cost O(L * D * Dv + L * C * D) (RetNet; Lightning Attention,
Qin et al. 2024). Any other mask keeps the quadratic masked form (strategy "tiled").

``linear_attention`` is the runtime algorithm in plain torch; backends mirror it.
"""

from __future__ import annotations

from typing import Any

import torch

from attncc.ir.dense import expand_kv, feature_map
from attncc.ir.graph import AttentionGraph
from attncc.ir.nodes import LinearNorm
from attncc.passes.causality import exact_causal_kind
from attncc.passes.manager import PassResult, add_note, attach, facts_of
from attncc.passes.plan import LinearLowering

Tensor = torch.Tensor

DEFAULT_CHUNK = 64


def lower_linear(graph: AttentionGraph, chunk: int = DEFAULT_CHUNK) -> PassResult:
    """Give each Linear region a ``LinearLowering``; the plan strategy follows a single region."""
    out, modified = graph, False
    strategies = []
    for attention in graph.attention_nodes():
        operands = graph.operands(attention)
        if not isinstance(graph.payload(operands["normalizer"]), LinearNorm):
            strategies.append("tiled")
            continue
        if "linear" in facts_of(graph, attention):
            strategies.append(facts_of(graph, attention)["linear"].strategy)
            continue
        mask = graph.payload(operands["mask"]).expr if "mask" in operands else None
        kind = exact_causal_kind(mask)
        if mask is None:
            lowering = LinearLowering("linear_global", chunk)
        elif kind is not None:
            lowering = LinearLowering("linear_chunked", chunk, causal_strict=kind == "strict")
        else:
            strategies.append("tiled")
            out = add_note(out, f"lower_linear: %{attention} has a non-causal mask; quadratic masked form")
            continue
        strategies.append(lowering.strategy)
        out = attach(out, attention, linear=lowering)
        out = add_note(out, f"lower_linear: %{attention} -> {lowering.strategy}"
                            + (f" (chunk {chunk})" if lowering.strategy == "linear_chunked" else ""))
        modified = True
    if modified and len(set(strategies)) == 1:
        out = attach(out, strategy=strategies[0])
    return PassResult(out, modified)


# ---- runtime ---------------------------------------------------------------------------


def divide_rows_by(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` per row; a denominator of exactly 0 gives 0 (SEMANTICS.md)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, 1.0), 0.0)


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    feature: Any = "elu1",
    normalize: bool = True,
    decay: Tensor | None = None,
    causal: str | None = None,
    chunk: int = DEFAULT_CHUNK,
    q_offset: int = 0,
    tensors: dict[str, Tensor] | None = None,
) -> Tensor:
    """Linear attention without an ``Lq x Lkv`` buffer (``causal`` None, "inclusive" or "strict")."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk}")
    if decay is not None and causal is None:
        raise ValueError("Linear(decay=...) requires a causal mask")
    dtype = torch.promote_types(q.dtype, torch.float32)
    ctx = {n: (t.to(dtype) if t.is_floating_point() else t) for n, t in (tensors or {}).items()}
    Hq = q.shape[1]
    fq = feature_map(feature, q.to(dtype), ctx)
    fk = feature_map(feature, expand_kv(k, Hq).to(dtype), ctx)
    vv = expand_kv(v, Hq).to(dtype)
    if causal is None:
        num = fq @ (fk.transpose(-1, -2) @ vv)
        den = fq @ fk.sum(dim=2).unsqueeze(-1)
    else:
        gamma = torch.ones(Hq, dtype=dtype, device=q.device) if decay is None else decay.to(dtype)
        num, den = _chunked(fq, fk, vv, gamma.view(1, Hq, 1, 1), causal == "strict", chunk, q_offset)
    out = divide_rows_by(num, den) if normalize else num
    return out.to(q.dtype)


def _chunked(
    fq: Tensor, fk: Tensor, v: Tensor, gamma: Tensor, strict: bool, chunk: int, q_offset: int
) -> tuple[Tensor, Tensor]:
    """Numerator ``[B, H, Lq, Dv]`` and denominator ``[B, H, Lq, 1]`` of causal linear attention.

    ``state`` holds ``sum_{j < start} gamma ** (start - 1 - j) phi(k_j) v_j^T``, so a query at
    ``q_idx >= start`` reads it times ``gamma ** (q_idx - start + 1)``.
    """
    B, H, Lq, D = fq.shape
    Lkv, Dv = fk.shape[2], v.shape[-1]
    q_idx = torch.arange(Lq, device=fq.device) + q_offset
    num = torch.zeros(B, H, Lq, Dv, dtype=fq.dtype, device=fq.device)
    den = torch.zeros(B, H, Lq, 1, dtype=fq.dtype, device=fq.device)
    state = torch.zeros(B, H, D, Dv, dtype=fq.dtype, device=fq.device)
    norm_state = torch.zeros(B, H, D, 1, dtype=fq.dtype, device=fq.device)
    for start in range(0, Lkv, chunk):
        end = min(start + chunk, Lkv)
        rows = ((q_idx >= start) & (q_idx < end)).nonzero().flatten()
        if rows.numel():
            _chunk_rows(fq, fk, v, gamma, strict, q_idx, rows, start, end, state, norm_state, num, den)
        kv_pos = torch.arange(start, end, device=fq.device, dtype=fq.dtype)
        weight = gamma ** (end - 1 - kv_pos).view(1, 1, -1, 1)  # [1, H, n, 1]
        state = gamma ** (end - start) * state + (fk[:, :, start:end] * weight).transpose(-1, -2) @ v[:, :, start:end]
        norm_state = gamma ** (end - start) * norm_state + (fk[:, :, start:end] * weight).sum(2).unsqueeze(-1)
    late = (q_idx >= Lkv).nonzero().flatten()  # queries past the last key see every key
    if late.numel():
        carry = gamma ** (q_idx[late] - Lkv + 1).to(fq.dtype).view(1, 1, -1, 1)
        num[:, :, late] = carry * (fq[:, :, late] @ state)
        den[:, :, late] = carry * (fq[:, :, late] @ norm_state)
    return num, den


def _chunk_rows(
    fq: Tensor, fk: Tensor, v: Tensor, gamma: Tensor, strict: bool, q_idx: Tensor, rows: Tensor,
    start: int, end: int, state: Tensor, norm_state: Tensor, num: Tensor, den: Tensor,
) -> None:
    """Queries whose ``q_idx`` falls in the chunk ``[start, end)``: carried state plus the chunk."""
    qi = q_idx[rows].to(fq.dtype)
    fq_rows = fq[:, :, rows]
    carry = gamma ** (qi - start + 1).view(1, 1, -1, 1)
    kv_pos = torch.arange(start, end, device=fq.device, dtype=fq.dtype)
    distance = qi.view(-1, 1) - kv_pos.view(1, -1)
    visible = distance > 0 if strict else distance >= 0
    decay = torch.where(visible, gamma ** distance.clamp_min(0), 0.0)  # [1, H, rows, n]
    scores = (fq_rows @ fk[:, :, start:end].transpose(-1, -2)) * decay
    num[:, :, rows] = carry * (fq_rows @ state) + scores @ v[:, :, start:end]
    den[:, :, rows] = carry * (fq_rows @ norm_state) + scores.sum(-1, keepdim=True)
