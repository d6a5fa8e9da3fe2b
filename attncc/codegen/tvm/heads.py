"""TopKHeads (MoH) on the TVM kernel: a head's kernel rows are only the tokens that kept it.

Per ``(b, h)`` the tokens that kept head ``h`` are gathered, in order, into a compacted query
``[B, Hq, P, D]`` (``P`` the largest count; shorter lists are padded and their padding tiles
are never listed). The region's ``q_idx`` becomes a load from a side table of each compacted
row's real ``q_idx``, so scores, masks and the mask's tile classes stay those of the real
token. Outputs are scaled by the routing weights and scattered back; skipped pairs are zero
(their lse is ``-inf``: no work was done for them, SEMANTICS.md leaves it to the backend).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attncc.codegen.tvm import rows as rw
from attncc.codegen.tvm.autograd import routed_backward
from attncc.passes.lower_routing import head_selection
from attncc.passes.plan import AttentionRegion

Tensor = torch.Tensor


@dataclass(frozen=True, eq=False)
class HeadCompaction:
    """Per ``(b, h)``: ``count`` kept tokens, ``tokens [B, Hq, P]`` their rows (ascending, then
    padding), ``weights [B, Hq, P]`` (0 on padding)."""

    count: Tensor
    tokens: Tensor
    weights: Tensor

    @property
    def valid(self) -> Tensor:
        return torch.arange(self.tokens.shape[2]) < self.count.unsqueeze(-1)


def compact_heads(router: Tensor, k: int, Hq: int) -> HeadCompaction:
    heads, weights = head_selection(router, k)  # [B, Lq, k]
    B, Lq, _ = heads.shape
    dense = torch.zeros(B, Lq, Hq, dtype=torch.float32)
    dense.scatter_(-1, heads, weights.float())
    kept = torch.zeros(B, Lq, Hq, dtype=torch.bool).scatter_(-1, heads, True)
    kept, dense = kept.permute(0, 2, 1), dense.permute(0, 2, 1)  # [B, Hq, Lq]
    count = kept.sum(-1)
    P = max(1, int(count.max()))
    order = torch.sort((~kept).to(torch.int8), dim=-1, stable=True).indices[..., :P]
    valid = torch.arange(P) < count.unsqueeze(-1)
    gathered = torch.where(valid, torch.gather(dense, -1, order), 0.0)
    return HeadCompaction(count, order, gathered)


def run_topk_heads(region: AttentionRegion, q: Tensor, k: Tensor, v: Tensor, tensors: dict[str, Tensor],
                   config: dict, *, scale: float, q_offset: int, grad: bool = False) -> tuple[Tensor, Tensor] | str:
    """(o, lse) of a TopKHeads region; the kernel sees only kept (token, head) pairs.

    ``grad``: the kernel runs under the generated backward kernels, on the compacted rows and the
    tables it visited, and everything around it (the gather of the kept rows, the routing weights'
    softmax, the scatter back) is torch ops that autograd differentiates, the router's gradient
    included; a str says why the backward cannot be generated (the caller falls back)."""
    select = region.head_select
    B, Hq, Lq, D = q.shape
    Lkv = k.shape[2]
    compact = compact_heads(tensors[select.router], select.k, Hq)
    P = compact.tokens.shape[2]
    config = rw.fit_config(config, block_m=16 if P <= 16 else config["block_m"])
    block_m, block_n = config["block_m"], config["block_n"]
    padded_rows = -(-P // block_m) * block_m
    valid = compact.valid
    # NOTE: the compacted query is float32: the kernel's output then is too, and the routing
    # weight multiplies it before the one rounding to q's dtype, as the reference does.
    qc = torch.gather(q.float(), 2, compact.tokens.unsqueeze(-1).expand(B, Hq, P, D))
    real = torch.full((B, Hq, padded_rows), q_offset, dtype=torch.int32)
    real[:, :, :P] = compact.tokens + q_offset
    kernel_region, side = rw.gathered_rows_region(region, real)
    classes = rw.row_classes(region, B, Hq, Lq, Lkv, block_n, q_offset, tensors)
    gathered = torch.gather(classes, 2, compact.tokens.unsqueeze(-1).expand(B, Hq, P, classes.shape[-1]))
    gathered = torch.where(valid.unsqueeze(-1), gathered, torch.tensor(-1, dtype=torch.int8))
    tables = rw.tile_tables(gathered, block_m)
    live = {**tensors, **side}

    def forward(qc: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return rw.launch_region(kernel_region, qc, k, v, live, tables, config, scale=scale, q_offset=0,
                                total_lkv=Lkv)

    if grad:
        got = routed_backward(kernel_region, forward, qc, k, v, live, tables, config, scale=scale, q_offset=0)
        if isinstance(got, str):
            return got
        oc, lse_c = got
    else:
        oc, lse_c = forward(qc, k, v)
    weighted = torch.where(valid.unsqueeze(-1), oc * compact.weights.unsqueeze(-1), 0.0)
    out = torch.zeros(B, Hq, Lq, v.shape[-1], dtype=torch.float32)
    out.scatter_(2, compact.tokens.unsqueeze(-1).expand_as(weighted), weighted)
    lse = torch.full((B, Hq, Lq), -torch.inf, dtype=torch.float32)
    lse.scatter_(2, compact.tokens, torch.where(valid, lse_c, -torch.inf))
    return out.to(q.dtype), lse
