"""Compile the generated kernels for a CUDA target without a GPU (ahead-of-time check).

The CPU interpreter runs kernels with Python semantics and accepts code the Triton compiler
rejects (non-constexpr globals, shape changes in loops, ...). ``compile_calls`` runs the
launcher on CPU tensors with the launches intercepted, then compiles each intercepted call
with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` down to a cubin: the same front
end, layouts and ptxas a GPU run would use. Needs TRITON_INTERPRET unset.

    python -m attncc.codegen.triton.compile_check   # the example variants, sm_90
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
          torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1"}


@contextlib.contextmanager
def intercepted_launches() -> Iterator[list[tuple[Any, tuple, dict]]]:
    """Collect ``kernel[grid](*args, **kwargs)`` calls instead of running them."""
    from triton.runtime.jit import KernelInterface

    calls: list[tuple[Any, tuple, dict]] = []
    original = KernelInterface.__getitem__

    def capture(self: Any, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: calls.append((self, args, kwargs))

    KernelInterface.__getitem__ = capture  # type: ignore[assignment]
    try:
        yield calls
    finally:
        KernelInterface.__getitem__ = original  # type: ignore[assignment]


def _arg_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for argument {value!r}")


def compile_call(fn: Any, args: tuple, kwargs: dict, arch: int = 90) -> Any:
    """``triton.compile`` one intercepted call for ``cuda:arch`` (returns the compiled kernel)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    constexprs = {k: v for k, v in kwargs.items() if k not in options}
    names = fn.arg_names
    signature = {name: _arg_type(value) for name, value in zip(names, args, strict=False)}
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def main() -> None:  # pragma: no cover - a command-line check
    import sys
    from pathlib import Path

    from attncc.codegen.triton import BACKEND
    from attncc.loader import import_file, load_all

    root = Path(__file__).resolve().parents[3] / "examples"
    failures = 0
    only = sys.argv[1:]
    for path in sorted(root.glob("*.py")):
        if path.name == "__init__.py" or (only and path.stem not in only):
            continue
        module = import_file(path)
        for name, program in load_all(module).items():
            plan = program.plan
            shapes = _example_operands(program, module)
            for dtype in (torch.bfloat16, torch.float32):
                operands = {n: t.to(dtype) for n, t in shapes.items()}
                with intercepted_launches() as calls:
                    try:
                        scalars = {n: torch.tensor(0.5) for n, r in program.operand_roles().items() if r == "scalar"}
                        tensors = {**program.tensors, **scalars}
                        BACKEND.run(plan, operands, tensors, scale=None, q_offset=0, return_lse=False)
                        _backward_calls(plan, operands, tensors)
                    except Exception as err:
                        print(f"{path.stem}.{name}: launcher failed: {err}")
                        failures += 1
                        continue
                for fn, args, kwargs in calls:
                    try:
                        compile_call(fn, args, kwargs)
                        print(f"{path.stem}.{name} {dtype}: {fn.__name__} compiled")
                    except Exception as err:
                        failures += 1
                        print(f"{path.stem}.{name} {dtype}: {fn.__name__} FAILED: {str(err)[:2000]}")
    sys.exit(1 if failures else 0)


def _backward_calls(plan: Any, operands: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Intercepted backward launches of every region with a fused backward."""
    from attncc.codegen.triton import launcher
    from attncc.codegen.triton.checker import backward_unsupported

    for region in plan.regions:
        if getattr(region, "linear", None) is not None or backward_unsupported(region) is not None:
            continue
        q, k, v = operands[region.q], operands[region.k], operands[region.v]
        o = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype)
        lse = torch.zeros(q.shape[:3])
        learn = tuple(s.name for s in (region.score.inputs() if region.score is not None else ())
                      if s.scalar_dtype == "float")
        launcher.backward(region, q, k, v, o, lse, torch.zeros_like(o), tensors, scale=None, q_offset=0,
                          learn=learn)


def _example_operands(program: Any, module: Any) -> dict[str, torch.Tensor]:
    """q/k/v-like inputs at the example's own sizes (BATCH, HEADS, SEQ_LEN or Q_LEN/KV_LEN, HEAD_DIM)."""
    B, H, D = (getattr(module, n, d) for n, d in (("BATCH", 1), ("HEADS", 4), ("HEAD_DIM", 32)))
    Lkv = getattr(module, "KV_LEN", getattr(module, "SEQ_LEN", 64))
    Lq = getattr(module, "Q_LEN", getattr(module, "SEQ_LEN", 64))
    operands = {}
    for name, role in program.operand_roles().items():
        if role not in ("q", "k", "v", "tensor"):
            continue
        length = Lq if name.startswith("q") else Lkv
        operands[name] = torch.randn(B, H, length, D)
    return operands


if __name__ == "__main__":  # pragma: no cover
    main()
