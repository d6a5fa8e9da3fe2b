"""The Triton backend: fused attention kernels generated from the kernel plan (GPUs).

Pieces: ``render.py`` (Expr -> Triton text), ``source.py`` (templates filled from a region),
``templates/*.py.jinja`` (forward with split-KV decoding and GQA packing; backward for
softmax, sigmoid, pointwise and stick-breaking; chunked linear attention; the symbolic
d score_fn / d score comes from ``attncc.ir.derivative``),
``launcher.py`` (cache-dir modules, sparsity tables, grids), ``space.py`` (search space),
``checker.py`` (what runs here and why not), ``ops.py`` (torch.library ops + autograd).

On a machine without a GPU the kernels run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``): slow but exact, which is how the CPU test suite checks them.

GPU test suite (on an H100/H200 machine, CUDA float16/bfloat16 at realistic shapes)::

    ATTNCC_TRITON_GPU_TESTS=1 python -m pytest tests/test_triton_backend.py -q

(without ``TRITON_INTERPRET``; the tests then run on ``cuda`` tensors and add the
``gpu``-marked cases). Benchmarks: ``python benchmarks/gpu/bench_gpu.py --plot``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from attncc.passes.plan import KernelPlan


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend:
    name = "triton"

    def unavailable(self) -> str | None:
        try:
            import triton  # noqa: F401
        except ImportError as err:
            return f"triton is not installed ({err})"
        if _interpreting():
            return None
        if not torch.cuda.is_available():
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter)"
        return None

    def checker(self, plan: KernelPlan, q: torch.Tensor) -> str | None:
        from attncc.codegen.triton.checker import triton_checker

        if q.device.type != "cuda" and not _interpreting():
            return f"{q.device.type} tensors need TRITON_INTERPRET=1"
        if q.device.type == "cuda" and _interpreting():
            return "TRITON_INTERPRET=1 runs kernels on CPU tensors only"
        return triton_checker(plan, q)

    @property
    def search_space(self) -> Any:
        """The forward kernel's tuning space (``attncc tune``; ``select_config`` at run time)."""
        from attncc.codegen.triton import space

        return space.SPACE

    def run(self, plan: KernelPlan, operands: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], *,
            scale: float | None, q_offset: int, return_lse: bool, splits: int | None = None,
            config: dict | None = None, **kwargs: Any) -> Any:
        """``config``: forward tiles from a tuner (SPACE's names); else the tuning cache or the default."""
        from attncc.codegen.triton import ops

        outputs = {}
        for region in plan.regions:
            q, k, v = operands[region.q], operands[region.k], operands[region.v]
            B, Hq, Lq, D = q.shape
            tiles = _tiles(plan, q, k, v, config)
            n_splits = splits if splits is not None else _decode_splits(plan, B, Hq, Lq, k.shape[2], tiles)
            resolved = 1.0 / math.sqrt(D) if scale is None else float(scale)
            outputs[region.node] = ops.attention(region, q, k, v, tensors, scale=resolved, q_offset=q_offset,
                                                 want_lse=return_lse, splits=n_splits, config=tiles)
        if plan.combine is not None:
            return _combine(plan, outputs, tensors)
        out, lse = outputs[plan.regions[0].node]
        return (out, lse) if return_lse else out

    def source(self, plan: KernelPlan, dtype: str = "bfloat16") -> str:
        """The generated modules of every region: forward (or linear), and the fused backward."""
        from attncc.codegen.triton import launcher
        from attncc.codegen.triton.checker import backward_unsupported, region_checker

        parts = []
        for region in plan.regions:
            why = region_checker(region)
            if why:
                parts.append(f"# region %{region.node}: not generated ({why})")
                continue
            if getattr(region, "linear", None) is not None:
                parts.append(launcher.source(region, "linear", dtype))
                continue
            parts.append(launcher.source(region, "forward", dtype))
            if backward_unsupported(region) is None:
                parts.append(launcher.source(region, "backward", dtype))
        return "\n\n".join(parts)


def _combine(plan: KernelPlan, outputs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Elementwise combine of the regions' outputs (differential attention), in torch so autograd
    flows through it; each region ran its own fused kernel (no cross-region v sharing yet)."""
    # NOTE: the Expr evaluator lives with the reference backend; it is generic IR evaluation and
    # would better move to a shared module (attncc.ir) so backends need not import each other.
    from attncc.ir.evaluate import evaluate

    env = plan.combine_inputs(outputs)
    dtype = next(iter(env.values())).dtype
    compute = torch.promote_types(dtype, torch.float32)
    scalars = {n: (t.to(compute) if t.is_floating_point() else t) for n, t in tensors.items()}
    return evaluate(plan.combine, env, scalars, float_dtype=compute).to(dtype)


def _tiles(plan: KernelPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: dict | None) -> Any:
    """Forward tiles: a tuner's config, else the tuning cache on a GPU, else None (the default)."""
    from attncc.codegen.triton import space

    if config is not None:
        return space.from_tuned(config)
    if _interpreting() or space.SPACE is None:
        return None
    from attncc.autotune import ShapeKey, select_config

    chosen, _source = select_config("triton", space.SPACE, plan.fingerprint, q.dtype,
                                    ShapeKey.from_tensors(q, k, v), device=q.device)
    return space.from_tuned(chosen)


def _decode_splits(plan: KernelPlan, B: int, Hq: int, Lq: int, Lkv: int, tiles: Any = None) -> int:
    """Split-KV for decoding: a tuned SPLIT_KV, the decode pass's decision, else Lq <= 16 and long Lkv."""
    from attncc.ir import nodes

    if not isinstance(plan.regions[0].normalizer, nodes.SoftmaxNorm) or plan.regions[0].linear is not None:
        return 1
    if tiles is not None and Lq <= 16:
        return tiles.splits
    decode = getattr(plan, "decode_split", None)
    if decode is not None:
        return decode.num_splits(B, Hq, Lkv) if decode.applies(Lq, Lkv) else 1
    if Lq <= 16 and Lkv >= 1024:
        return max(1, min(64, Lkv // 256, -(-256 // max(1, B * Hq))))
    return 1


BACKEND = TritonBackend()
