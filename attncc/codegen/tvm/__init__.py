"""The TVM backend: fused attention kernels generated from the kernel plan (CPUs).

Pieces: ``render.py`` (Expr -> TVMScript expression text), ``kernels.py`` (the forward
kernel skeleton filled from a region), ``forward.py`` (config and tile geometry of one call:
tuned or default, GQA packing via ``packing.py``, smaller tiles for band masks),
``register_block.py`` (the register-blocked products every kernel is written with),
``launcher.py`` (compile with llvm, module cache in memory and on disk, DLPack calls),
``space.py`` (tuning knobs), ``checker.py`` (what runs here and why not), ``autograd.py``
(generated backward kernels from ``backward.py`` / ``backward_launch.py``, else the
reference backward after a one-time warning),
``linear.py`` / ``linear_launch.py`` / ``linear_backward.py`` (linear attention: chunked
recurrence or global form; its backward by the same kernel),
``plans.py`` (a whole plan: a path per region, then combine), ``routing.py`` /
``routing_tokens.py`` (TopKBlocks), ``heads.py`` (TopKHeads), ``decode.py`` (split-KV
decoding), ``rows.py`` (the forward kernel on re-indexed rows and keys, shared by those).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from types import ModuleType
from typing import Any

import torch

from attncc.codegen.call_ranges import check_call
from attncc.passes.plan import KernelPlan


class TVMBackend:
    name = "tvm"

    def unavailable(self) -> str | None:
        try:
            import tvm  # noqa: F401
        except ImportError as err:
            return f"apache-tvm is not installed ({err})"
        return None

    def checker(self, plan: KernelPlan, q: torch.Tensor) -> str | None:
        return _submodule("checker").tvm_checker(plan, q)

    def run(self, plan: KernelPlan, operands: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], *,
            scale: float | None, q_offset: int, return_lse: bool, config: dict | None = None,
            **kwargs: Any) -> Any:
        for each in plan.regions:  # an index past a captured tensor's end raises, as in the reference
            shape, keys = operands[each.q].shape, operands[each.k].shape[2]
            check_call(each, shape[0], shape[1], shape[2], keys, q_offset, tensors)
        region = plan.regions[0]
        q, k, v = operands[region.q], operands[region.k], operands[region.v]
        if plan.strategy in ("linear_chunked", "linear_global"):
            from attncc.codegen.tvm.linear_launch import run_linear

            return run_linear(region, q, k, v, tensors, q_offset=q_offset)
        plans = _submodule("plans")  # routing, split-KV decoding, combine
        return plans.run_plan(plan, operands, tensors, scale=scale, q_offset=q_offset, return_lse=return_lse,
                              config=config)

    def source(self, plan: KernelPlan) -> str:
        from attncc.codegen.tvm.kernels import KernelShape, render_forward
        from attncc.codegen.tvm.space import PARAMS

        if plan.strategy in ("linear_chunked", "linear_global"):
            from attncc.codegen.tvm.linear import LinearShape, kernel_chunk, render_linear

            region = plan.regions[0]
            return render_linear(region, LinearShape(64, 64, "float32", chunk=kernel_chunk(region.linear.chunk)))
        from attncc.codegen.tvm.forward import uses_vector_exp
        from attncc.codegen.tvm.launcher import transpose_lanes

        config = {name: values[0] for name, values in PARAMS.items()}
        shape = KernelShape(64, 64, "float32", transpose_lanes=transpose_lanes(), **config)
        shape = dataclasses.replace(shape, vector_exp=uses_vector_exp(shape))
        return render_forward(plan.regions[0], shape)


@functools.cache
def _submodule(name: str) -> ModuleType:
    """``attncc.codegen.tvm.<name>``, imported on first use: the kernel modules load only when a
    call needs them, and an import statement in a method costs about a microsecond per call."""
    return importlib.import_module(f"{__name__}.{name}")


BACKEND = TVMBackend()
