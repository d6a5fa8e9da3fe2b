"""Argument checks for ``var(q, k, v)``: run before any backend, each error names its argument.

The checks read only the tensors' types, shapes, dtypes and devices, and run on every call, so
the shape/dtype/device part is memoized on exactly those values (a failed check is never
memoized: it raises again on the next call).
"""

from __future__ import annotations

import functools
import math
import numbers

import torch

from attncc.passes.plan import AttentionRegion

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check_layout(name, t.shape, t.dtype)
    return t


def _check_layout(name: str, shape: torch.Size, dtype: torch.dtype) -> None:
    if len(shape) != 4:
        raise ValueError(f"{name} must have rank 4 ([B, H, L, D]), got shape {tuple(shape)}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {dtype}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: tuple[str, str, str] = ("q", "k", "v")) -> None:
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        name, t = next((n, t) for n, t in zip(names, (q, k, v), strict=True) if not isinstance(t, torch.Tensor))
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check_qkv_layout(names, q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device)


@functools.lru_cache(maxsize=256)
def _check_qkv_layout(
    names: tuple[str, str, str], q_shape: torch.Size, k_shape: torch.Size, v_shape: torch.Size,
    q_dtype: torch.dtype, k_dtype: torch.dtype, v_dtype: torch.dtype,
    q_device: torch.device, k_device: torch.device, v_device: torch.device,
) -> None:
    """``check_qkv`` past the type checks: a pure function of these values, memoized."""
    qn, kn, vn = names
    for name, shape, dtype in zip(names, (q_shape, k_shape, v_shape), (q_dtype, k_dtype, v_dtype), strict=True):
        _check_layout(name, shape, dtype)
    for name, device, dtype in ((kn, k_device, k_dtype), (vn, v_device, v_dtype)):
        if device != q_device:
            raise ValueError(f"{name} is on {device} but {qn} is on {q_device}; {qn}, {kn}, {vn} must share a device")
        if dtype != q_dtype:
            raise TypeError(
                f"{name} has dtype {dtype} but {qn} has dtype {q_dtype}; {qn}, {kn}, {vn} must share a dtype"
            )
    B, Hq, _, D = q_shape
    if D == 0:
        raise ValueError(f"{qn} head dim must be at least 1, got shape {tuple(q_shape)}")
    if k_shape[0] != B or v_shape[0] != B:
        raise ValueError(f"batch sizes differ: {qn} has {B}, {kn} {k_shape[0]}, {vn} {v_shape[0]}")
    if k_shape[1] != v_shape[1]:
        raise ValueError(f"{kn} and {vn} must have the same number of heads, got {k_shape[1]} and {v_shape[1]}")
    if (k_shape[1] == 0 and Hq != 0) or (k_shape[1] != 0 and Hq % k_shape[1] != 0):
        raise ValueError(f"{qn} heads ({Hq}) must be a multiple of {kn} heads ({k_shape[1]}) for GQA/MQA")
    if k_shape[3] != D:
        raise ValueError(f"{kn} head dim {k_shape[3]} must equal {qn} head dim {D}")
    if k_shape[2] != v_shape[2]:
        raise ValueError(f"{kn} and {vn} must have the same length, got {k_shape[2]} and {v_shape[2]}")


def checked_options(scale: object, q_offset: object) -> tuple[float | None, int]:
    """``scale`` as a float (or None) and ``q_offset`` as an int, from any real / integral number
    (NumPy's included: ``q_offset=np.int64(3)`` was refused as if it were negative)."""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    if isinstance(q_offset, bool) or not isinstance(q_offset, numbers.Integral):
        raise TypeError(f"q_offset must be an int, got {type(q_offset).__name__}")
    if q_offset < 0:
        raise ValueError(f"q_offset must be non-negative, got {int(q_offset)}")
    return (None if scale is None else float(scale)), int(q_offset)


def check_captured(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"captured tensor {name!r} is on {t.device} but q is on {device}; move it to {device}")


def check_head_tensors(region: AttentionRegion, q: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
    """The captured tensors SEMANTICS.md shapes by q: a sink's and a decay's ``[Hq]`` values, a
    TopKHeads router's ``[B, Lq, Hq]`` logits. Why here, for every backend: a kernel reads them by
    q's indices, so a longer one was silently cut and a shorter router left tokens at 0 (the
    reference broadcast a ``[B, 1, Hq]`` router instead)."""
    B, Hq, Lq = q.shape[:3]
    norm = region.normalizer
    for what in ("sink", "decay"):
        spec = getattr(norm, what, None)
        if spec is not None and tensors[spec.name].numel() != Hq:
            raise ValueError(f"{what} tensor {spec.name!r} must hold one value per query head ({Hq}), "
                             f"got shape {tuple(tensors[spec.name].shape)}")
    selection = getattr(region, "head_select", None)
    if selection is not None and tuple(tensors[selection.router].shape) != (B, Lq, Hq):
        raise ValueError(f"TopKHeads router {selection.router!r} must be [B, Lq, Hq] = {[B, Lq, Hq]} for q of shape "
                         f"{tuple(q.shape)}, got {list(tensors[selection.router].shape)}")


def check_combined_shapes(regions: tuple[AttentionRegion, ...], operands: dict[str, torch.Tensor]) -> None:
    """The attention outputs a combine adds up are ``[B, Hq, Lq, Dv]`` alike: the error names the
    inputs that make them differ (torch's broadcasting error inside the combine named none)."""
    shapes = {(r.q, r.v): (*operands[r.q].shape[:3], operands[r.v].shape[3]) for r in regions}
    if len(set(shapes.values())) > 1:
        found = "; ".join(f"{q} and {v} give {list(s)}" for (q, v), s in shapes.items())
        raise ValueError(f"the combined attention outputs [B, Hq, Lq, Dv] must agree: {found}")
