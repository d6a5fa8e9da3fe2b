"""User-facing routing specs (SEMANTICS.md, "Routing"); each lowers to one IR payload."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attncc.ir import nodes
from attncc.ir.trace import Captures


@dataclass(frozen=True)
class TopKBlocks:
    """MoBA (Lu et al. 2025): each query keeps the ``k`` key blocks with the largest gate."""

    block: int
    k: int
    per: str = "token"
    causal: bool | None = None

    def lower(self, captures: Captures) -> nodes.TopKBlocksRoute:
        if not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"TopKBlocks(block={self.block!r}): expected a positive int")
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"TopKBlocks(k={self.k!r}): expected a positive int")
        if self.per not in ("token", "query_block"):
            raise ValueError(f"TopKBlocks(per={self.per!r}): expected 'token' or 'query_block'")
        if self.causal not in (None, True, False):
            raise ValueError(f"TopKBlocks(causal={self.causal!r}): expected None, True or False")
        return nodes.TopKBlocksRoute(self.block, self.k, self.per, self.causal)


@dataclass(frozen=True, eq=False)
class TopKHeads:
    """MoH (Jin et al. 2024): each token keeps its top ``k`` heads by ``router [B, Lq, Hq]``."""

    k: int
    router: torch.Tensor

    def lower(self, captures: Captures) -> nodes.TopKHeadsRoute:
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"TopKHeads(k={self.k!r}): expected a positive int")
        if not isinstance(self.router, torch.Tensor) or self.router.dim() != 3:
            raise TypeError("TopKHeads(router=...) expects a float tensor of shape [B, Lq, Hq]")
        if not self.router.is_floating_point():
            raise TypeError(f"TopKHeads(router=...) expects floating-point logits, got {self.router.dtype}")
        if self.k > self.router.shape[-1]:
            raise ValueError(f"TopKHeads(k={self.k}) exceeds the router's {self.router.shape[-1]} heads")
        return nodes.TopKHeadsRoute(self.k, captures.add(self.router, "router"))
