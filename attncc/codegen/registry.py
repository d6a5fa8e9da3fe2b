"""Backends by name, and the automatic choice between them.

Each backend subpackage exposes a module-level ``BACKEND`` object with ``name``,
``unavailable() -> str | None`` (why it cannot run on this machine), ``checker(plan, q)
-> str | None`` (why it cannot run this plan) and ``run(...)``; this module only asks.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

import torch

from attncc.passes.plan import KernelPlan

BACKEND_MODULES = {
    "reference": "attncc.codegen.reference",
    "tvm": "attncc.codegen.tvm",
    "triton": "attncc.codegen.triton",
}


class Backend(Protocol):
    name: str

    def unavailable(self) -> str | None: ...

    def checker(self, plan: KernelPlan, q: torch.Tensor) -> str | None: ...

    def run(
        self, plan: KernelPlan, operands: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
        *, scale: float | None, q_offset: int, return_lse: bool,
    ) -> Any: ...


@dataclass(frozen=True)
class Choice:
    backend: Backend
    reason: str


def load(name: str) -> Backend | str:
    """The backend object, or the reason it cannot be loaded (asked again on every call: whether
    a backend can run may change, e.g. with ``TRITON_INTERPRET``)."""
    try:
        module = _module(name)
    except ImportError as err:
        return f"{name} backend not importable: {err}"
    backend = getattr(module, "BACKEND", None)
    if backend is None:
        return f"{name} backend not implemented yet"
    reason = backend.unavailable()
    return reason if reason else backend


@functools.cache
def _module(name: str) -> ModuleType:
    """The backend's module, imported once (a failed import raises and is tried again next time)."""
    return importlib.import_module(BACKEND_MODULES[name])


def choose(requested: str | None, plan: KernelPlan, q: torch.Tensor) -> Choice:
    if requested is not None:
        if requested not in BACKEND_MODULES:
            raise ValueError(f"backend={requested!r} is unknown; expected one of {sorted(BACKEND_MODULES)} or None")
        backend = load(requested)
        if isinstance(backend, str):
            raise RuntimeError(f"backend={requested!r} cannot run here: {backend}")
        why_not = backend.checker(plan, q)
        if why_not:
            raise NotImplementedError(f"backend={requested!r} cannot run this variant: {why_not}")
        return Choice(backend, f"requested backend={requested!r}")
    device = q.device.type
    preferred = "triton" if device == "cuda" else "tvm"
    backend = load(preferred)
    if isinstance(backend, str):
        return Choice(load("reference"), f"automatic: {device} tensors; {backend}; fell back to reference")
    why_not = backend.checker(plan, q)
    if why_not:
        return Choice(load("reference"), f"automatic: {preferred} declined ({why_not}); fell back to reference")
    return _automatic(backend, preferred, device)


@functools.lru_cache(maxsize=8)
def _automatic(backend: Backend, name: str, device: str) -> Choice:
    """The automatic choice of a backend that accepted the call, one object per backend and
    device: every call makes it, and building it cost as much as the checks before it."""
    return Choice(backend, f"automatic: {name} for {device} tensors")
