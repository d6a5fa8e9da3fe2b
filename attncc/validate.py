"""Argument checks for ``var(q, k, v)``: run before any backend, each error names its argument."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have rank 4 ([B, H, L, D]), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    return t


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: tuple[str, str, str] = ("q", "k", "v")) -> None:
    qn, kn, vn = names
    for name, t in zip(names, (q, k, v), strict=True):
        check_tensor(name, t)
    for name, t in ((kn, k), (vn, v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but {qn} is on {q.device}; {qn}, {kn}, {vn} must share a device")
        if t.dtype != q.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {qn} has dtype {q.dtype}; {qn}, {kn}, {vn} must share a dtype"
            )
    B, Hq, _, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: {qn} has {B}, {kn} {k.shape[0]}, {vn} {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{kn} and {vn} must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    if k.shape[1] == 0 or Hq % k.shape[1] != 0:
        raise ValueError(f"{qn} heads ({Hq}) must be a multiple of {kn} heads ({k.shape[1]}) for GQA/MQA")
    if k.shape[3] != D:
        raise ValueError(f"{kn} head dim {k.shape[3]} must equal {qn} head dim {D}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{kn} and {vn} must have the same length, got {k.shape[2]} and {v.shape[2]}")


def check_options(scale: object, q_offset: object) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if isinstance(q_offset, bool) or not isinstance(q_offset, int) or q_offset < 0:
        raise ValueError(f"q_offset must be a non-negative int, got {q_offset!r}")


def check_captured(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"captured tensor {name!r} is on {t.device} but q is on {device}; move it to {device}")
