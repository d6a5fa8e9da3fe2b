"""The TVM backend's tuning knobs as data: values, a validity filter, a default.

``block_m`` x ``block_n`` is the score tile a task keeps in cache; ``rows`` x ``vector`` is
the register block of both products (``rows`` keys, or query rows, of ``vector`` floats
each); ``vector`` is a multiple of the SIMD width in float32 lanes (8 for AVX2, 16 for AVX-512).
"""

from __future__ import annotations

from typing import Any

from attncc.autotune.keys import ShapeKey
from attncc.autotune.space import SearchSpace

Config = dict[str, Any]

PARAMS: dict[str, tuple] = {
    "block_m": (64, 32, 16, 128, 8),
    "block_n": (64, 32, 128, 16),
    "rows": (4, 2, 6, 8),
    "vector": (16, 8, 32),
}
L1_BYTES = 48 * 1024


def working_set_bytes(c: Config, s: ShapeKey) -> int:
    """float32 bytes of the task's tiles: Q, K^T, V, S and the accumulator."""
    bm, bn = c["block_m"], c["block_n"]
    return 4 * (bm * s.head_dim + bn * (s.head_dim + s.value_dim) + bm * bn + bm * s.value_dim)


def fits(c: Config) -> bool:
    """The kernel's divisibility rules: whole register blocks of rows and keys, whole row vectors."""
    return not (c["block_m"] % c["rows"] or c["block_n"] % c["rows"] or c["block_m"] % c["vector"])


def keep(c: Config, s: ShapeKey) -> bool:
    return fits(c) and working_set_bytes(c, s) <= 4 * L1_BYTES


def default(s: ShapeKey) -> Config:
    """64 x 64 tiles; a few query rows (decoding) get a tile of one SIMD vector of rows, since
    every row of a tile costs the same work whether it exists or not, and register blocks of 8
    rows (one vector of rows times 4 keys keeps too few sums in flight to hide the multiply-add
    latency: 10-15% slower on GQA decoding steps over 4096-16384 keys)."""
    if s.q_len <= 8:
        return {"block_m": 8, "block_n": 64, "rows": 8, "vector": 8}
    block_m = 16 if s.q_len <= 16 else 64
    return {"block_m": block_m, "block_n": 64, "rows": 4, "vector": 16}


SPACE = SearchSpace(PARAMS, keep, default, name="tvm")
