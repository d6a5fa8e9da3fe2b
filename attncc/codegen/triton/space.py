"""The Triton backend's search space: data, a validity filter (``keep``) and a key.

Modelled on the config list of Triton's fused-attention tutorial: every candidate is a
``Config``; ``keep`` prunes what cannot run (tiles larger than the problem, shared memory
too small for the head dim, split counts without enough kv tiles); ``key`` is what a
tuned choice depends on. The sparsity tables are built per tile shape, so the choice is
made here, before the launch, rather than by ``triton.autotune``.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    splits: int = 1  # split-KV programs per (query tile, head); 1 = no split


BLOCK_MS = (16, 32, 64, 128)
BLOCK_NS = (16, 32, 64, 128)
NUM_WARPS = (4, 8)
NUM_STAGES = (1, 2, 3, 4)
SPLITS = (1, 2, 4, 8, 16, 32, 64)

GRID = [
    Config(m, n, w, s, k)
    for m, n, w, s, k in itertools.product(BLOCK_MS, BLOCK_NS, NUM_WARPS, NUM_STAGES, SPLITS)
]


def _tuning_space() -> object:
    """The forward kernel's space for ``attncc tune`` (attncc.autotune's Triton space), if importable."""
    try:
        from attncc.autotune import triton_space
    except ImportError:  # pragma: no cover - autotune is part of the package
        return None
    return triton_space()


# NOTE: ``attncc tune`` and ``select_config`` read ``SPACE`` (a SearchSpace with BLOCK_M,
# BLOCK_N, num_warps, num_stages, SPLIT_KV); ``GRID``/``keep``/``default_config`` below are the
# backend's own view, used for the backward kernels and under the interpreter.
SPACE = _tuning_space()


def from_tuned(config: dict) -> Config:
    """A tuning-cache config (``SPACE``'s parameter names) as the launcher's ``Config``."""
    return Config(int(config["BLOCK_M"]), int(config["BLOCK_N"]), int(config["num_warps"]),
                  int(config["num_stages"]), int(config.get("SPLIT_KV", 1)))


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def key(D: int, Dv: int, Lq: int, Lkv: int, dtype: str, kind: str) -> tuple:
    """What a tuned config depends on: head dims, dtype, kernel kind, power-of-two length buckets."""
    bucket = lambda n: 1 << max(n - 1, 0).bit_length()
    return (kind, D, Dv, dtype, bucket(Lq), bucket(Lkv))


def keep(config: Config, *, D: int, Lq: int, Lkv: int, kind: str) -> bool:
    """False for configs that cannot run well (or at all) on this problem."""
    if config.BLOCK_M > max(16, _pow2(Lq)) or config.BLOCK_N > max(16, _pow2(Lkv)):
        return False
    if D > 128 and config.BLOCK_M * config.BLOCK_N > 64 * 64:
        return False  # shared memory: q, k and v tiles of a wide head
    if config.BLOCK_M * config.BLOCK_N >= 128 * 128 and config.num_warps < 8:
        return False
    if kind == "split_kv":
        tiles = -(-Lkv // config.BLOCK_N)
        return config.BLOCK_M == 16 and config.splits <= max(1, tiles // 4)
    return config.splits == 1


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def default_config(*, D: int, Lq: int, Lkv: int, kind: str = "forward") -> Config:
    """A good untuned choice; the interpreter gets the smallest tiles (it is slow per element)."""
    if interpreted():
        # NOTE: the interpreter pays per operation, not per element: small problems get 16-wide
        # tiles (several tiles, so the multi-tile paths are exercised), long ones 64-wide.
        splits = 2 if kind == "split_kv" and Lkv > 16 else 1
        block_m = 16 if Lq <= 64 else 64
        block_n = 16 if Lkv <= 64 else 64
        return Config(block_m, block_n, 4, 1, splits)
    if kind == "split_kv":
        tiles = -(-Lkv // 64)
        splits = max(1, min(64, tiles // 4))
        return Config(16, 64, 4, 2, 1 << (splits.bit_length() - 1))
    if kind.startswith("backward"):
        # NOTE: checked with ptxas for sm_90 at D=128 bf16: 32x64 with 8 warps keeps dK/dV in
        # registers (4 warps or 64-row tiles spill).
        if _pow2(Lq) < 64:
            return Config(16, 32, 4, 1)
        return Config(64, 64, 4, 2) if D <= 64 else Config(32, 64, 8, 2)
    block_m = min(128, max(16, _pow2(Lq)))
    block_n = 64 if D <= 128 else 32
    warps = 8 if block_m >= 128 else 4
    return Config(block_m, min(block_n, max(16, _pow2(Lkv))), warps, 3 if D <= 128 else 2)


def candidates(*, D: int, Lq: int, Lkv: int, kind: str) -> list[Config]:
    """The pruned space for one problem (what an autotuner would search)."""
    return [c for c in GRID if keep(c, D=D, Lq=Lq, Lkv=Lkv, kind=kind)]
