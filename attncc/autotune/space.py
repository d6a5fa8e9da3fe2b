"""Search spaces as data: the values of each knob, a validity filter, a heuristic default.

A backend builds one ``SearchSpace``; the tuner enumerates or samples it, the cache
validates stored configs against it, and ``select_config`` falls back to its default. The
``keep`` predicate sees a ``ShapeKey`` (a bucket), so validity never depends on the exact
shape inside a bucket. ``triton_space`` and ``tvm_space`` are ready-made spaces whose
filters encode the hardware limits (shared memory, registers, cache size).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from attncc.autotune.keys import ShapeKey

Config = dict[str, Any]
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def _always(config: Config, shape: ShapeKey) -> bool:
    return True


@dataclass
class SearchSpace:
    """``params`` maps each knob to its candidate values (in preference order).

    ``keep(config, shape)`` says whether a full config is valid for a shape bucket;
    ``default(shape)`` is the heuristic config used when nothing is tuned. A default that
    ``keep`` rejects is replaced by the first valid config, so the default is always valid.
    """

    params: dict[str, tuple]
    keep: Callable[[Config, ShapeKey], bool] = _always
    default: Callable[[ShapeKey], Config] | None = None
    name: str = field(default="space")

    def __post_init__(self) -> None:
        if not isinstance(self.params, dict) or not self.params:
            raise ValueError(f"SearchSpace.params must be a non-empty dict of knob -> tuple, got {self.params!r}")
        for knob, values in self.params.items():
            if not isinstance(knob, str) or not isinstance(values, tuple) or not values:
                raise ValueError(f"SearchSpace.params[{knob!r}] must be a non-empty tuple of values, got {values!r}")
            for value in values:
                if not isinstance(value, int | float | str | bool):
                    raise ValueError(f"SearchSpace.params[{knob!r}] values must be JSON scalars, got {value!r}")

    def __iter__(self) -> Iterator[Config]:
        """Every combination, valid or not (use ``configs(shape)`` for the valid ones)."""
        names = list(self.params)
        for values in itertools.product(*(self.params[n] for n in names)):
            yield dict(zip(names, values))

    def configs(self, shape: ShapeKey) -> list[Config]:
        """All valid configs for ``shape``, in the order of ``params``' values."""
        return [c for c in self if self._keep(c, shape)]

    def _keep(self, config: Config, shape: ShapeKey) -> bool:
        try:
            return bool(self.keep(config, shape))
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return False

    def value_problem(self, config: Any) -> str | None:
        """Why ``config`` is not a combination of this space's knob values (None when it is)."""
        if not isinstance(config, dict):
            return f"config must be a dict, got {type(config).__name__}"
        if set(config) != set(self.params):
            return f"config knobs {sorted(config)} != space knobs {sorted(self.params)}"
        for knob, value in config.items():
            if not any(type(value) is type(v) and value == v for v in self.params[knob]):
                return f"{knob}={value!r} is not one of {self.params[knob]}"
        return None

    def problem(self, config: Any, shape: ShapeKey) -> str | None:
        """Why ``config`` is not usable for ``shape`` (None when it is). Used on cache entries."""
        if problem := self.value_problem(config):
            return problem
        if not self._keep(config, shape):
            return f"config {config} violates the space's constraints for {shape.tag}"
        return None

    def problem_for_every_shape(self, config: Any) -> str | None:
        """Why ``config`` is usable for no shape bucket at all (None when some bucket accepts it).

        A pin for every shape (``*``) must pass this: otherwise it is stored, then rejected at
        every lookup. ``keep`` sees only buckets, so it is asked on ``probe_shapes()``, a grid
        wide enough that a rule which never holds (``block_m % rows``) fails on all of them.
        """
        if problem := self.value_problem(config):
            return problem
        if any(self._keep(config, shape) for shape in probe_shapes()):
            return None
        return f"config {config} violates the {self.name} space's constraints for every shape"

    def default_for(self, shape: ShapeKey) -> Config:
        """The heuristic default, or the first valid config if the heuristic is invalid."""
        if self.default is not None:
            config = dict(self.default(shape))
            if self.problem(config, shape) is None:
                return config
        for config in self:
            if self._keep(config, shape):
                return config
        raise ValueError(f"search space {self.name!r} has no valid config for shape {shape.tag}")

    def size(self, shape: ShapeKey | None = None) -> int:
        """Number of combinations (valid ones for ``shape`` when given)."""
        if shape is not None:
            return len(self.configs(shape))
        total = 1
        for values in self.params.values():
            total *= len(values)
        return total


@functools.cache
def probe_shapes() -> tuple[ShapeKey, ...]:
    """Buckets from tiny to huge in every length, parallelism, head dim and tuned dtype: a config
    no one of them accepts is valid for no shape (``SearchSpace.problem_for_every_shape``)."""
    grid = itertools.product((1, 16, 1024), (1, 16, 128, 4096, 65536), (16, 128, 4096, 65536),
                             (8, 16, 32, 64, 128, 256), ("float32", "float16", "bfloat16"))
    return tuple(ShapeKey(bh, q, kv, d, d, 1, dtype) for bh, q, kv, d, dtype in grid)


# ---------------------------------------------------------------- Triton (GPU)

def triton_smem_bytes(config: Config, shape: ShapeKey) -> int:
    """Shared memory of a flash-attention tile loop: q tile once, k and v tiles per stage."""
    elem = _BYTES[shape.dtype]
    stages = max(1, config["num_stages"])
    q_tile = config["BLOCK_M"] * shape.head_dim
    kv_tiles = config["BLOCK_N"] * (shape.head_dim + shape.value_dim)
    return (q_tile + kv_tiles * stages) * elem


def triton_regs_per_thread(config: Config, shape: ShapeKey) -> float:
    """fp32 registers per thread for the accumulator, the score tile and the q tile."""
    m, n = config["BLOCK_M"], config["BLOCK_N"]
    threads = 32 * config["num_warps"]
    live = m * shape.value_dim + m * n + m * shape.head_dim * _BYTES[shape.dtype] / 4
    return live / threads


def triton_space(
    *,
    smem_bytes: int = 101376,
    max_regs_per_thread: int = 200,
    block_m: tuple = (16, 32, 64, 128),
    block_n: tuple = (16, 32, 64, 128),
    num_warps: tuple = (2, 4, 8),
    num_stages: tuple = (1, 2, 3, 4),
    split_kv: tuple = (1, 2, 4, 8, 16, 32),
) -> SearchSpace:
    """Flash-attention knobs for Triton, pruned by shared memory and register pressure.

    ``smem_bytes`` is the per-block opt-in limit (``device.gpu_limits()``); 101376 is sm_86's.
    ``SPLIT_KV`` (flash-decoding's split count) is only tuned for decode buckets (q_len <= 16).
    """

    def keep(c: Config, s: ShapeKey) -> bool:
        if c["BLOCK_M"] > max(16, s.q_len) or c["BLOCK_N"] > max(16, s.kv_len):
            return False
        if triton_smem_bytes(c, s) > smem_bytes:
            return False
        if triton_regs_per_thread(c, s) > max_regs_per_thread:
            return False
        # NOTE: a warp needs at least 16 rows of the q tile for the tensor-core dot.
        if c["BLOCK_M"] < 16 * c["num_warps"] // 4:
            return False
        decode = s.q_len <= 16
        if not decode and c["SPLIT_KV"] != 1:
            return False
        # NOTE: a kv shorter than the smallest tile is padded to one tile, so it can still split once.
        return max(16, s.kv_len) // c["SPLIT_KV"] >= c["BLOCK_N"]

    def default(s: ShapeKey) -> Config:
        decode = s.q_len <= 16
        big_d = s.head_dim > 64
        split = 1
        if decode:
            split = min(split_kv[-1], max(1, s.kv_len // 256), max(1, 128 // max(1, s.batch_heads)))
            split = next_listed(split_kv, split)
        return {
            "BLOCK_M": 16 if decode else (64 if big_d or s.q_len < 128 else 128),
            "BLOCK_N": 64 if not big_d else 32,
            "num_warps": 4,
            "num_stages": 2,
            "SPLIT_KV": split,
        }

    params = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps,
              "num_stages": num_stages, "SPLIT_KV": split_kv}
    return SearchSpace(params, keep, default, name="triton")


def next_listed(values: tuple, target: int) -> int:
    """The largest listed value <= target (the smallest listed value if none is)."""
    below = [v for v in values if v <= target]
    return max(below) if below else min(values)


# ---------------------------------------------------------------- TVM (CPU)

def tvm_working_set_bytes(config: Config, shape: ShapeKey) -> int:
    """Bytes touched per tile step: q tile, k and v tiles, the score tile and the accumulator."""
    elem = _BYTES[shape.dtype]
    tq, tk = config["tile_q"], config["tile_kv"]
    return (tq * shape.head_dim + tk * (shape.head_dim + shape.value_dim)) * elem + (tq * tk + tq * shape.value_dim) * 4


def tvm_space(
    *,
    cache_bytes: int = 1 << 20,
    tile_q: tuple = (1, 4, 8, 16, 32, 64),
    tile_kv: tuple = (16, 32, 64, 128, 256),
    vector: tuple = (1, 4, 8, 16),
    unroll: tuple = (1, 2, 4),
    grain: tuple = (1, 2, 4, 8),
) -> SearchSpace:
    """CPU knobs for the TVM backend: tile sizes, vector width, unroll, parallel grain.

    A config is kept when its working set fits ``cache_bytes`` (a per-core L2), its vector
    width divides the head dims, and there is enough work to give each grain a task.
    """

    def keep(c: Config, s: ShapeKey) -> bool:
        if c["tile_q"] > max(1, s.q_len) or c["tile_kv"] > max(16, s.kv_len):
            return False
        if s.head_dim % c["vector"] or s.value_dim % c["vector"]:
            return False
        if c["unroll"] > 1 and c["tile_kv"] % c["unroll"]:
            return False
        if tvm_working_set_bytes(c, s) > cache_bytes:
            return False
        tasks = s.batch_heads * max(1, s.q_len // c["tile_q"])
        return c["grain"] == 1 or tasks >= 2 * c["grain"]

    def default(s: ShapeKey) -> Config:
        vec = next_listed(vector, min(16, s.head_dim & -s.head_dim))
        return {
            "tile_q": next_listed(tile_q, min(16, s.q_len)),
            "tile_kv": next_listed(tile_kv, min(64, max(16, s.kv_len))),
            "vector": vec,
            "unroll": 1,
            "grain": 1,
        }

    params = {"tile_q": tile_q, "tile_kv": tile_kv, "vector": vector, "unroll": unroll, "grain": grain}
    return SearchSpace(params, keep, default, name="tvm")
