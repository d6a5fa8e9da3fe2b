"""Compiler passes over the attention graph, and the registry of them by name.

Each pass is a function ``AttentionGraph -> PassResult`` named like its module
(``attncc.passes.simplify.simplify``), as xDSL names its passes after their modules.
The registry imports lazily: ``attncc.passes.plan`` is imported by backends and must not
pull the passes (and the reference backend they use) in with it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

PASS_MODULES = ("simplify", "sparsify", "fuse", "lower_routing", "lower_linear", "decode")


def get_all_passes() -> dict[str, Callable[[Any], Any]]:
    """Every available pass by name; a module that is not there (yet) is left out."""
    passes = {}
    for name in PASS_MODULES:
        try:
            module = importlib.import_module(f"attncc.passes.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"attncc.passes.{name}":
                raise
            continue
        passes[name] = getattr(module, name)
    return passes
