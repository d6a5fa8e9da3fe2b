"""Autotuning: search spaces (data), tuning keys, the tuning cache and Optuna studies.

Backends import ``SearchSpace``/``ShapeKey`` to declare what can be tuned and call
``select_config`` at run time; ``attncc tune`` and ``attncc cache`` drive the rest. Optuna
is imported only by ``study.py``, so running a kernel never pays for it.
"""

from attncc.autotune.keys import ShapeKey, TuningKey
from attncc.autotune.space import SearchSpace, triton_space, tvm_space

__all__ = ["SearchSpace", "ShapeKey", "TuningKey", "select_config", "triton_space", "tvm_space"]


def __getattr__(name: str):
    if name == "select_config":
        from attncc.autotune.lookup import select_config

        return select_config
    raise AttributeError(f"module 'attncc.autotune' has no attribute {name!r}")
