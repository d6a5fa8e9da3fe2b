"""A stand-in backend whose speed depends on its config: tests the tuner without a compiler.

``FakeBackend.run`` computes the true result with the reference backend, then sleeps for a
cost that is smallest at ``tile=32, unroll=2``. Two configs misbehave on purpose: ``tile=64,
unroll=4`` fails "to compile", and ``wrong=True`` is faster but adds an error, so a tuner
that skips the reference check would pick it.
"""

from __future__ import annotations

import math
import time
from typing import Any

from attncc.autotune.keys import ShapeKey
from attncc.autotune.space import Config, SearchSpace

BEST = {"tile": 32, "unroll": 2, "wrong": False}


def _keep(config: Config, shape: ShapeKey) -> bool:
    return config["tile"] <= max(8, shape.kv_len)


def _default(shape: ShapeKey) -> Config:
    return {"tile": 8, "unroll": 1, "wrong": False}


class FakeBackend:
    name = "fake"

    def __init__(self, unit_ms: float = 1.0) -> None:
        self.unit_ms = unit_ms
        self.calls: list[Config] = []
        self.search_space = SearchSpace(
            {"tile": (8, 16, 32, 64), "unroll": (1, 2, 4), "wrong": (False, True)}, _keep, _default, name="fake")

    def unavailable(self) -> str | None:
        return None

    def checker(self, plan: Any, q: Any) -> str | None:
        return None

    def cost_ms(self, config: Config) -> float:
        steps = abs(math.log2(config["tile"] / 32)) + abs(math.log2(config["unroll"] / 2))
        return self.unit_ms * (1.0 + steps - (0.9 if config["wrong"] else 0.0))

    def run(self, plan: Any, operands: Any, tensors: Any, *, scale: float | None, q_offset: int,
            return_lse: bool, config: Config) -> Any:
        from attncc.codegen.reference.attention import run_plan

        self.calls.append(dict(config))
        if config["tile"] == 64 and config["unroll"] == 4:
            raise RuntimeError("fake compile error for tile=64, unroll=4")
        out = run_plan(plan, operands, tensors, scale=scale, q_offset=q_offset, return_lse=return_lse)
        time.sleep(self.cost_ms(config) / 1e3)
        return out + 1e-2 if config["wrong"] else out


# NOTE: what ``attncc.codegen.registry`` loads when a test registers this module as a backend.
BACKEND = FakeBackend()
