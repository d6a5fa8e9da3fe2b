"""What a tuned config is valid for: the shape bucket and the full tuning key.

A config tuned for one shape is reused for every shape in the same bucket: lengths and the
batch*heads parallelism are rounded up to a power of two, head dims and the GQA ratio are
exact (they change the generated code). The full key adds what makes a timing meaningful:
the plan's fingerprint, the backend, the device fingerprint and the dtype.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

DTYPES = ("float32", "float16", "bfloat16", "float64")
_SHAPE_RE = re.compile(r"^bh(\d+)_q(\d+)_kv(\d+)_d(\d+)_dv(\d+)_g(\d+)_(\w+)$")


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.float16`` or ``"float16"`` -> ``"float16"``; anything else is a ValueError."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} (or the torch dtype), got {dtype!r}")
    return name


@dataclass(frozen=True, order=True)
class ShapeKey:
    """A shape bucket. ``keep``/``default`` of a search space see this, never exact shapes."""

    batch_heads: int  # next_pow2(B * Hq): the parallelism across programs / threads
    q_len: int  # next_pow2(Lq)
    kv_len: int  # next_pow2(Lkv)
    head_dim: int  # D, exact
    value_dim: int  # Dv, exact
    gqa: int  # Hq // Hkv, exact
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("batch_heads", "q_len", "kv_len", "head_dim", "value_dim", "gqa"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ShapeKey.{name} must be a positive int, got {value!r}")
        dtype_name(self.dtype)

    @classmethod
    def of(cls, B: int, Hq: int, Lq: int, D: int, *, Hkv: int | None = None, Lkv: int | None = None,
           Dv: int | None = None, dtype: torch.dtype | str = "float32") -> ShapeKey:
        """The bucket of q [B,Hq,Lq,D], k [B,Hkv,Lkv,D], v [B,Hkv,Lkv,Dv] (k/v default to q's)."""
        Hkv = Hq if Hkv is None else Hkv
        if Hkv < 1 or Hq % Hkv:
            raise ValueError(f"Hq={Hq} must be a positive multiple of Hkv={Hkv}")
        return cls(
            batch_heads=next_pow2(B * Hq),
            q_len=next_pow2(Lq),
            kv_len=next_pow2(Lq if Lkv is None else Lkv),
            head_dim=int(D),
            value_dim=int(D if Dv is None else Dv),
            gqa=Hq // Hkv,
            dtype=dtype_name(dtype),
        )

    @classmethod
    def from_tensors(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> ShapeKey:
        B, Hq, Lq, D = q.shape
        return cls.of(B, Hq, Lq, D, Hkv=k.shape[1], Lkv=k.shape[2], Dv=v.shape[-1], dtype=q.dtype)

    @property
    def tag(self) -> str:
        """Stable text form, e.g. ``bh8_q128_kv128_d64_dv64_g1_float32`` (the cache column)."""
        return (f"bh{self.batch_heads}_q{self.q_len}_kv{self.kv_len}_d{self.head_dim}"
                f"_dv{self.value_dim}_g{self.gqa}_{self.dtype}")

    @classmethod
    def parse(cls, tag: str) -> ShapeKey:
        match = _SHAPE_RE.match(tag)
        if not match:
            raise ValueError(f"not a shape bucket tag: {tag!r} (expected e.g. bh8_q128_kv128_d64_dv64_g1_float32)")
        *ints, dtype = match.groups()
        return cls(*(int(i) for i in ints), dtype=dtype)

    def distance(self, other: ShapeKey) -> float:
        """How far apart two buckets are; ``inf`` when a config cannot carry over.

        Head dims, the GQA ratio and the dtype change the kernel itself, so only buckets that
        agree on them are neighbours; otherwise the log2 distance of lengths and parallelism.
        """
        if (self.head_dim, self.value_dim, self.gqa, self.dtype) != (
            other.head_dim, other.value_dim, other.gqa, other.dtype,
        ):
            return math.inf
        # NOTE: crossing the decode boundary (q_len <= 16) changes strategy; weigh it heavily.
        decode_jump = 8.0 if (self.q_len <= 16) != (other.q_len <= 16) else 0.0
        return decode_jump + sum(
            abs(math.log2(a) - math.log2(b))
            for a, b in ((self.q_len, other.q_len), (self.kv_len, other.kv_len),
                         (self.batch_heads, other.batch_heads))
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TuningKey:
    """One row of the tuning cache, one Optuna study."""

    fingerprint: str  # KernelPlan.fingerprint (the variant's structural key)
    backend: str
    device: str  # attncc.autotune.device.fingerprint()
    shape: ShapeKey

    @property
    def dtype(self) -> str:
        return self.shape.dtype

    @property
    def text(self) -> str:
        """``fingerprint/backend/device/shape-tag``: the study name and the CLI's KEY."""
        return f"{self.fingerprint}/{self.backend}/{self.device}/{self.shape.tag}"

    @classmethod
    def parse(cls, text: str) -> TuningKey:
        parts = text.split("/")
        if len(parts) != 4 or not all(parts):
            raise ValueError(f"a tuning key is FINGERPRINT/BACKEND/DEVICE/SHAPE, got {text!r}")
        return cls(parts[0], parts[1], parts[2], ShapeKey.parse(parts[3]))

    def __str__(self) -> str:
        return self.text
