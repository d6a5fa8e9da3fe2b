"""The dense PyTorch reference backend: the oracle every other backend is tested against."""

from __future__ import annotations

from typing import Any

import torch

from attncc.codegen.reference.attention import run_plan
from attncc.passes.plan import KernelPlan


class ReferenceBackend:
    name = "reference"

    def unavailable(self) -> str | None:
        return None

    def checker(self, plan: KernelPlan, q: torch.Tensor) -> str | None:
        return None

    def run(self, plan: KernelPlan, operands: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
            *, scale: float | None, q_offset: int, return_lse: bool, **kwargs: Any) -> Any:
        return run_plan(plan, operands, tensors, scale=scale, q_offset=q_offset, return_lse=return_lse, **kwargs)


BACKEND = ReferenceBackend()
