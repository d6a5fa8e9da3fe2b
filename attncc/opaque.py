"""Calls that ``torch.compile`` runs as they are, without tracing into them: a variant's call.

Why: dynamo traced into the caches, locks and TVM calls behind a variant (dozens of graphs, calls
slower than eager) and failed on a sink's frozen payloads. Why lazy: ``torch.compiler.disable``
imports ``torch._dynamo``, which made ``import attncc`` 1.6 s slower. The wrapper carries dynamo's
own mark (``_torchdynamo_disable``: it breaks the graph at the call rather than inline it) and
asks for the disabled function only once dynamo is loaded, as it is under any ``torch.compile``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any


def opaque_to_dynamo(fn: Callable[..., Any]) -> Callable[..., Any]:
    disabled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if not disabled:
            import torch

            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    call._torchdynamo_disable = True  # type: ignore[attr-defined]
    return call
